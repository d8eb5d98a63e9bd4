"""Resharding FSDP checkpoints (`hyena_cp.train.checkpoint` through ``get_state_dict`` /
``set_state_dict``): a checkpoint the training loop writes with sharded model and AdamW state
loads, bitwise, into another layout:

- dp2 x cp2 under fsdp (4 ranks) -> cp2 (fsdp and ddp) and -> one process;
- tp2 x (fsdp over cp2) (4 ranks, `tp_helpers.TinyTPModel`: strided, plain and replicated TP
  parameters, so every stored form of `hyena_cp.parallel.stored_view` is used) -> one process,
  -> tp2 without data parallelism, and -> dp2 under fsdp at tp1.

"Bitwise" compares every full parameter and every AdamW state tensor (``step``, ``exp_avg``,
``exp_avg_sq``) after loading with those the saving ranks held after training.
"""
from __future__ import annotations

from pathlib import Path

import megatron.core.parallel_state  # noqa: F401  (imported before the dist_run workers fork)
import pytest
import torch
from omegaconf import DictConfig
from torch.distributed.tensor import DTensor

from hyena_cp.lazy import LazyConfig, instantiate
from hyena_cp.distributed.mesh import destroy_parallel, init_parallel
from hyena_cp.parallel.tp_layout import tp_partition, unshard_tp
from hyena_cp.train.config import ParallelConfig, with_defaults
from hyena_cp.train.loop import Trainer
from tp_helpers import tiny_tp_config
from train_helpers import VISION, load_config


def _config(kind: str, overrides: list[str], out: str) -> DictConfig:
    if kind == "vision":
        return load_config("digits_hyena_tiny.py", VISION + ["model.mixers=hyena", "train.steps=2"] + overrides, out)
    return LazyConfig.apply_overrides(with_defaults(tiny_tp_config()),
                                      ["train.steps=2"] + overrides + [f"train.output_dir={out}"])


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.detach().full_tensor() if isinstance(t, DTensor) else t.detach().clone()


def _state(kind: str, overrides: list[str], out: str, train: bool) -> dict:
    """Train (saving at the end) or only resume; then this rank's full (over dp x cp) state."""
    cfg = _config(kind, overrides, out)
    parallel = ParallelConfig(**instantiate(cfg.parallel))
    groups = init_parallel(parallel.cp, tp=parallel.tp, backend="gloo", megatron=parallel.megatron)
    try:
        trainer = Trainer.build(cfg, groups, Path(out), kind)
        if train:
            trainer.run()
        else:
            trainer.resume()
        model, names = trainer.model, {p: n for n, p in trainer.model.named_parameters()}
        return {"step": trainer.step, "tp_rank": groups.tp_rank,
                "partitions": {n: tp_partition(p) for n, p in model.named_parameters()},
                "params": {n: _full(p) for n, p in model.named_parameters()},
                "optim": {names[p]: {k: _full(v) for k, v in s.items()} for p, s in trainer.optimizer.state.items()}}
    finally:
        destroy_parallel(groups)


def _joined(results: list[dict]) -> dict:
    """Full single-process tensors: TP shards joined (every replica of a TP rank must agree)."""
    by_tp = {}
    for r in results:
        first = by_tp.setdefault(r["tp_rank"], r)
        for name, value in r["params"].items():
            assert torch.equal(value, first["params"][name]), f"{name} differs between replicas"
    parts, ranks = results[0]["partitions"], [by_tp[t] for t in sorted(by_tp)]

    def join(name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
        part = parts[name]
        return pieces[0] if part is None or pieces[0].dim() == 0 else unshard_tp(pieces, part.dim, part.stride)

    params = {n: join(n, [r["params"][n] for r in ranks]) for n in parts}
    optim = {n: {k: join(n, [r["optim"][n][k] for r in ranks]) for k in entries}
             for n, entries in ranks[0]["optim"].items()}
    return {"step": results[0]["step"], "params": params, "optim": optim}


def _assert_same(got: dict, want: dict) -> None:
    assert got["step"] == want["step"] == 2
    assert got["params"].keys() == want["params"].keys() and got["optim"].keys() == want["optim"].keys()
    for name, value in want["params"].items():
        assert torch.equal(got["params"][name], value), name
    for name, entries in want["optim"].items():
        assert got["optim"][name].keys() == entries.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in entries.items():
            assert torch.equal(got["optim"][name][key], value), (name, key)


@pytest.fixture(scope="module")
def vision_saved(dist_run, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("vision"))
    return out, _joined(dist_run(_state, 4, "vision", ["parallel.cp=2"], out, True))


@pytest.mark.parametrize("world,overrides", [(2, ["parallel.cp=2"]), (2, ["parallel.cp=2", "parallel.dp_mode=ddp"]),
                                             (1, ["parallel.cp=1"])], ids=["cp2", "cp2-ddp", "one-process"])
def test_dp2xcp2_checkpoint_loads_resharded(dist_run, vision_saved, world, overrides):
    out, saved = vision_saved
    _assert_same(_joined(dist_run(_state, world, "vision", overrides, out, False)), saved)


@pytest.fixture(scope="module")
def tp_saved(dist_run, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("tp"))
    return out, _joined(dist_run(_state, 4, "tp", ["parallel.tp=2", "parallel.cp=2"], out, True))


@pytest.mark.parametrize("world,overrides", [(1, ["parallel.tp=1"]), (2, ["parallel.tp=2"]),
                                             (2, ["parallel.tp=1"])], ids=["one-process", "tp2", "dp2-fsdp"])
def test_tp2_fsdp_checkpoint_loads_resharded(dist_run, tp_saved, world, overrides):
    out, saved = tp_saved
    _assert_same(_joined(dist_run(_state, world, "tp", overrides, out, False)), saved)
