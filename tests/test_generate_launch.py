"""``launch/generate.py`` on a checkpoint of ``configs/lm_tiny.py`` trained for two steps at CP=1:
the prompt is kept verbatim (``"def "`` with its space), and the same checkpoint generates the
same greedy text at CP=2 and at TP=2 (checkpoints hold full tensors). Also the checkpoint
finder and the full-state loader's refusals."""
from __future__ import annotations

import contextlib
import importlib.util
import io

import pytest
import torch
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state  # noqa: F401

from hyena_cp.lazy import LazyConfig
from hyena_cp.train.config import with_defaults
from hyena_cp.train.generate import generate_text, latest_checkpoint, load_full_state, with_generate_defaults
from hyena_cp.train.loop import train
from train_helpers import CONFIGS, ROOT

SMALL = ["task.eval_samples=4", "task.eval_batch_size=4", "task.global_batch_size=2", "task.data.max_bytes=200000",
         "train.warmup_steps=0", "train.progress=false", "train.eval_every=0", "train.ckpt_every=0"]
GREEDY = ["generate.max_new_tokens=12", "generate.temperature=0"]


def _launcher(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker_train(out) -> None:
    cfg = LazyConfig.load(str(CONFIGS / "lm_tiny.py"))
    cfg = LazyConfig.apply_overrides(with_defaults(cfg), ["parallel.cp=1", "train.steps=2", f"train.output_dir={out}",
                                                          *SMALL])
    train(cfg, name="lm_tiny")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dist_run):
    out = tmp_path_factory.mktemp("lm")
    dist_run(worker_train, 1, out)
    return out


def config(out, overrides: list[str]):
    cfg = with_generate_defaults(with_defaults(LazyConfig.load(str(CONFIGS / "lm_tiny.py"))))
    return LazyConfig.apply_overrides(cfg, [f"train.output_dir={out}", *overrides])


def worker_generate(out, overrides: list[str]) -> list[str]:
    return generate_text(config(out, overrides), name="lm_tiny")


def worker_launch(argv: list[str]) -> tuple[int, str]:
    """``launch/generate.py``'s main on a rank (the pytest process itself never starts a group)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = _launcher("generate").main(argv)
    return code, printed.getvalue()


def test_generate_prints_the_verbatim_prompt_and_its_continuation(trained, dist_run, capsys):
    assert _launcher("generate").main([]) == 2 and "usage:" in capsys.readouterr().err
    argv = [str(CONFIGS / "lm_tiny.py"), f"train.output_dir={trained}", "parallel.cp=1", "generate.prompt=def ",
            *GREEDY]
    ((code, text),) = dist_run(worker_launch, 1, argv)
    assert code == 0 and text.startswith("def ") and len(text.rstrip("\n").encode()) <= 4 + 12, repr(text)


@pytest.mark.parametrize("layout", [["parallel.cp=2"], ["parallel.cp=1", "parallel.tp=2"]], ids=["cp2", "tp2"])
def test_a_checkpoint_generates_the_same_text_at_another_cp_or_tp_size(trained, dist_run, layout):
    (single,) = dist_run(worker_generate, 1, trained, ["parallel.cp=1", *GREEDY])
    texts = dist_run(worker_generate, 2, trained, [*layout, *GREEDY])
    assert texts == [single, single]


def test_latest_checkpoint_follows_the_pointer_and_needs_a_complete_one(trained, tmp_path):
    path = latest_checkpoint(trained / "checkpoints")
    assert path.name == "step_00000002" and (path / "meta.json").is_file()
    (tmp_path / "step_00000009.tmp").mkdir()  # an unfinished save is never chosen
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        latest_checkpoint(tmp_path)


def test_full_state_that_does_not_fit_the_model_is_refused():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="missing \\['bias'\\]"):
        load_full_state(model, {"weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="has shape \\(3, 3\\)"):
        load_full_state(model, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)})
