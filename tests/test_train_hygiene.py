"""Training hygiene (`hyena_cp.train.optim`, the loop, checkpoints):

- weight decay: norms, biases, LayerScale gammas, position / CLS / register tokens and Hyena's
  filter get none (``train.weight_decay_policy="timm"``, the default), under FSDP2 (DTensor
  parameters) too; one step with decay leaves exactly those parameters where a step without
  decay puts them, and moves all the others; ``"all"`` decays everything; a bad key raises;
- parameters no forward uses keep gradient None under fsdp, ddp and one process: never decayed,
  never stepped (no optimizer state), and a run with them resumes from its checkpoint;
- drop-path under CP through the loop: CP=2 equals one process (fp64) with
  ``drop_path_rate=0.5``, which only holds if both CP ranks draw the single process's
  per-sample masks (one RNG stream per replica), while the same run without drop-path differs.

The resume of the grouped AdamW state at the same and at other layouts is held bitwise by
tests/test_train_fault.py and tests/test_train_fsdp_checkpoint.py (the default policy is on there).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.tensor import DTensor

from hyena_cp.lazy import LazyCall, instantiate
from hyena_cp.distributed.mesh import destroy_parallel, init_parallel
from hyena_cp.train.checkpoint import load_model_state, load_optimizer_state
from hyena_cp.train.config import TrainConfig
from hyena_cp.train.loop import Trainer, train
from hyena_cp.train.optim import param_groups
from references import rel_err
from train_helpers import VISION, load_config, run_config, run_config_fp64

CONFIG = "digits_hyena_tiny.py"
OVERRIDES = VISION + ["model.mixers=hyena", "optimizer.weight_decay=0.5"]


def _exempt(name: str) -> bool:
    """The categories the convention exempts, spelled out by name (not by ``ndim``)."""
    return (name in ("pos_embed", "cls_token", "reg_tokens") or ".filter." in name or ".mask." in name
            or name.endswith(".bias")
            or name.endswith(("norm.weight", "norm1.weight", "norm2.weight", ".gamma", "hyena.skip")))


def test_param_groups_follow_the_timm_convention():
    model = instantiate(load_config(CONFIG, OVERRIDES, "unused").model)
    decayed, exempt = (sorted(n for n, p in model.named_parameters() if any(p is q for q in g["params"]))
                       for g in param_groups(model, "timm", TrainConfig(steps=1).no_weight_decay))
    names = [n for n, _ in model.named_parameters()]
    assert sorted(decayed + exempt) == sorted(names)
    assert exempt == sorted(n for n in names if _exempt(n))
    assert set(decayed) == {"patch_embed.weight", "head.weight"} | {
        f"stages.0.0.{m}.weight" for m in ("mixer.inner_mixer.in_proj", "mixer.inner_mixer.short_conv",
                                           "mixer.inner_mixer.out_proj", "mlp.fc1", "mlp.fc2")}
    assert [len(g["params"]) for g in param_groups(model, "all", ())] == [len(names)]
    extra = param_groups(model, "timm", ("head.*",))[1]["params"]
    assert any(p is model.head.weight for p in extra)
    with pytest.raises(ValueError, match="weight_decay_policy='timmm'"):
        TrainConfig(steps=1, weight_decay_policy="timmm")
    with pytest.raises(TypeError, match="no_weight_decays"):
        TrainConfig(steps=1, no_weight_decays=["x"])


def _groups_under_fsdp(out: str) -> list[dict]:
    cfg = load_config(CONFIG, OVERRIDES + ["parallel.cp=2"], out)
    groups = init_parallel(2, backend="gloo")
    try:
        trainer = Trainer.build(cfg, groups, Path(out), "groups")
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        return [{"names": sorted(names[id(p)] for p in g["params"]), "weight_decay": g["weight_decay"],
                 "dtensor": all(isinstance(p, DTensor) for p in g["params"])} for g in trainer.optimizer.param_groups]
    finally:
        destroy_parallel(groups)


def test_fsdp_groups_hold_the_dtensor_shards(dist_run, tmp_path):
    for decayed, exempt in dist_run(_groups_under_fsdp, 2, str(tmp_path)):
        assert decayed["dtensor"] and exempt["dtensor"]
        assert (decayed["weight_decay"], exempt["weight_decay"]) == (0.5, 0.0)
        assert exempt["names"] and all(_exempt(n) for n in exempt["names"])
        assert not any(_exempt(n) for n in decayed["names"])


def test_one_step_decays_exactly_the_decayed_group(dist_run, tmp_path):
    one = ["parallel.cp=2", "train.steps=1"]
    dist_run(run_config, 2, CONFIG, OVERRIDES + one, str(tmp_path / "decay"))
    dist_run(run_config, 2, CONFIG, OVERRIDES + one + ["optimizer.weight_decay=0"], str(tmp_path / "none"))
    decay, none = (load_model_state(tmp_path / run / "checkpoints" / "step_00000001") for run in ("decay", "none"))
    for name, value in none.items():  # the same gradients (same start), so only decay tells them apart
        assert torch.equal(decay[name], value) == _exempt(name), name


# --------------------------------------------------------------------------- unused parameters
def add_unused(module: nn.Module) -> nn.Module:
    """Two 2-D parameters no forward uses, one in an FSDP block and one in the root's unit (2-D, so
    the default policy would decay them if they had a gradient)."""
    module.stages[0][0].unused = nn.Parameter(torch.ones(4, 4))
    module.unused = nn.Parameter(torch.ones(4, 4))
    return module


def _run_with_unused(overrides: list[str], out: str) -> dict:
    cfg = load_config(CONFIG, OVERRIDES + overrides, out)
    OmegaConf.resolve(cfg)
    cfg.model = LazyCall(add_unused)(module=cfg.model)
    return train(cfg, name="unused")


@pytest.mark.parametrize("world,mode", [(1, "fsdp"), (2, "fsdp"), (2, "ddp")], ids=["one-process", "fsdp", "ddp"])
def test_unused_parameters_are_never_decayed_or_stepped(dist_run, tmp_path, world, mode):
    layout = [f"parallel.cp={world}", f"parallel.dp_mode={mode}", "train.ckpt_every=1"]
    dist_run(_run_with_unused, world, layout + ["train.steps=2"], str(tmp_path))
    resumed = dist_run(_run_with_unused, world, layout + ["train.steps=3"], str(tmp_path))  # from step 2
    assert resumed[0]["resumed_from"] == 2 and resumed[0]["step"] == 3
    final = tmp_path / "checkpoints" / "step_00000003"
    params, optim = load_model_state(final), load_optimizer_state(final)
    for name in ("unused", "stages.0.0.unused"):
        assert torch.equal(params[name], torch.ones(4, 4)), name  # lr 2e-3 x decay 0.5 would have moved it
        assert not any(k.startswith(f"{name}/") for k in optim), name
    assert float(optim["head.weight/step"]) == 3  # the others were stepped


# --------------------------------------------------------------------------- drop-path under CP
@pytest.fixture(scope="module")
def drop_path_single(dist_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("drop_single")
    dist_run(run_config_fp64, 1, CONFIG, OVERRIDES + ["parallel.cp=1", "model.drop_path_rate=0.5"], str(out))
    return load_model_state(out / "checkpoints" / "step_00000003")


def test_drop_path_under_cp_equals_one_process(dist_run, tmp_path, drop_path_single):
    extra = ["parallel.cp=2", "model.drop_path_rate=0.5"]
    dist_run(run_config_fp64, 2, CONFIG, OVERRIDES + extra, str(tmp_path / "cp2"))
    dist_run(run_config_fp64, 1, CONFIG, OVERRIDES + ["parallel.cp=1"], str(tmp_path / "no_drop"))
    cp2, no_drop = (load_model_state(tmp_path / run / "checkpoints" / "step_00000003") for run in ("cp2", "no_drop"))
    assert max(rel_err(cp2[k], v) for k, v in drop_path_single.items()) < 1e-10  # fp64
    assert max(rel_err(no_drop[k], v) for k, v in drop_path_single.items()) > 1e-6  # drop-path did drop
