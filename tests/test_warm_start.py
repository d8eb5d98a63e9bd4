"""`hyena_cp.train.warm_start`: a config whose model continues from another run's weights (the
recall curriculum over runs: configs/recall_ar_8k.py starts from configs/recall_ar_2k.py's run)
gets exactly that run's final weights; a model of another shape and a missing run are refused."""
from __future__ import annotations

import megatron.core.parallel_state  # noqa: F401  (imported before the dist_run workers fork)
import pytest
import torch
from megatron.core import parallel_state

from hyena_cp.lazy import LazyConfig, instantiate
from hyena_cp.train.checkpoint import load_model_state
from hyena_cp.train.config import with_defaults
from hyena_cp.train.warm_start import checkpoint_folder
from test_associative_recall import TINY
from train_helpers import CONFIGS, run_config

# TINY's model keys, moved under warm_start's ``model`` argument
MODEL = [f"model.{item}" for item in TINY if item.startswith("model.")]


def worker_build(name: str, overrides: list[str]) -> dict[str, torch.Tensor]:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=1)
    try:
        cfg = LazyConfig.apply_overrides(with_defaults(LazyConfig.load(CONFIGS / name)), overrides)
        torch.manual_seed(0)
        return {k: v for k, v in instantiate(cfg.model).state_dict().items() if isinstance(v, torch.Tensor)}
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def trained(dist_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("recall_ar_2k")
    dist_run(run_config, 1, "recall_ar_2k.py", TINY + ["parallel.cp=1", "train.steps=2"], str(out))
    return out


def test_the_model_starts_from_the_runs_last_weights(dist_run, trained):
    (warm,) = dist_run(worker_build, 1, "recall_ar_8k.py", MODEL + [f"model.checkpoint={trained}"])
    (fresh,) = dist_run(worker_build, 1, "recall_ar_2k.py", TINY)
    saved = load_model_state(checkpoint_folder(trained))
    assert checkpoint_folder(trained).name == "step_00000002"
    assert warm.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(warm[key], saved[key], rtol=0, atol=0)
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved)  # training moved them: the test can fail


def test_a_model_of_another_shape_is_refused(dist_run, trained):
    errors = dist_run.run(worker_build, 1, ("recall_ar_8k.py", MODEL + [f"model.checkpoint={trained}",
                                                                        "model.model.hidden_size=32"]),
                          expect_error=ValueError)
    assert "shape" in str(errors[0])


def test_a_missing_run_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train that run first"):
        checkpoint_folder(tmp_path / "outputs" / "recall_ar_2k")
