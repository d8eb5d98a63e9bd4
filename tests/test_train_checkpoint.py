"""Checkpoints (`hyena_cp.train.checkpoint`): exact round trip of model, optimizer, RNG and
progress; atomicity (a crash mid-save leaves the last good checkpoint); the ``latest``
pointer and its fallback; pruning; refusal of pickled items; loading at another dp size (the
model and optimizer load, the per-replica RNG streams are left alone)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from hyena_cp.distributed.mesh import destroy_parallel, init_parallel
from hyena_cp.train.checkpoint import Checkpointer, load_model_state, read_tensor_metadata
from train_helpers import tiny_model_and_optimizer, tiny_steps

PROGRESS = {"step": 2, "epoch": 0, "global_batch_size": 8}


def _roundtrip(root: str, cp: int) -> dict:
    groups = init_parallel(cp)
    try:
        model, optimizer = tiny_model_and_optimizer(0)
        tiny_steps(model, optimizer, 2)
        torch.manual_seed(100 + groups.dp_rank)
        ckpt = Checkpointer(root, groups)
        ckpt.save(2, model, optimizer, PROGRESS)
        draw = torch.rand(3)  # what the RNG gives right after the saved state
        tiny_steps(model, optimizer, 1)
        reference = [p.detach().clone() for p in model.parameters()]

        fresh, fresh_opt = tiny_model_and_optimizer(7)  # other weights, no optimizer state
        torch.manual_seed(999)
        progress = ckpt.load(ckpt.latest_step(), fresh, fresh_opt)
        restored_draw = torch.rand(3)
        tiny_steps(fresh, fresh_opt, 1)  # Adam moments and step count must be restored too
        return {"progress": progress, "draws": (draw, restored_draw), "reference": reference,
                "resumed": [p.detach() for p in fresh.parameters()], "buffer": fresh.counter}
    finally:
        destroy_parallel(groups)


@pytest.mark.parametrize("world,cp", [(1, 1), (2, 2), (2, 1)])
def test_roundtrip_restores_model_optimizer_rng_and_progress(dist_run, tmp_path, world, cp):
    results = dist_run(_roundtrip, world, str(tmp_path), cp)
    for r in results:
        assert r["progress"] == PROGRESS
        assert torch.equal(*r["draws"])
        for ref, got in zip(r["reference"], r["resumed"]):
            assert torch.equal(ref, got)  # bitwise: same step from the same state
        assert torch.equal(r["buffer"], torch.arange(3.0))
    if world // cp == 2:  # each replica keeps its own RNG stream
        assert not torch.equal(results[0]["draws"][0], results[1]["draws"][0])
    saved = load_model_state(tmp_path / "step_00000002")  # readable without a process group
    assert set(saved) == {"0.weight", "0.bias", "2.weight", "2.bias", "counter"}


class Crash(Exception):
    """Stands for a process dying after its shards were written, before the commit."""


def _crash_mid_save(root: str) -> dict:
    groups = init_parallel(1)  # dp=2
    try:
        model, optimizer = tiny_model_and_optimizer(0)
        tiny_steps(model, optimizer, 1)
        ckpt = Checkpointer(root, groups)
        ckpt.save(1, model, optimizer, PROGRESS)
        good = [p.detach().clone() for p in model.parameters()]
        tiny_steps(model, optimizer, 1)

        def crash() -> None:
            raise Crash

        with pytest.raises(Crash):
            ckpt.save(2, model, optimizer, PROGRESS, before_commit=crash)
        root_path = Path(root)
        after_crash = (sorted(p.name for p in root_path.iterdir()), ckpt.latest_step())
        if groups.rank == 0:  # a crash at an arbitrary byte: a partial folder with garbage
            (root_path / "step_00000003.tmp").mkdir()
            (root_path / "step_00000003.tmp" / ".metadata").write_bytes(b"\x80garbage")
        dist.barrier()
        restarted = Checkpointer(root, groups)  # a new attempt removes stale partial saves
        listing = sorted(p.name for p in root_path.iterdir())
        fresh, fresh_opt = tiny_model_and_optimizer(3)
        restarted.load(restarted.latest_step(), fresh, fresh_opt)
        same = all(torch.equal(a, b) for a, b in zip(good, fresh.parameters()))
        restarted.save(2, model, optimizer, PROGRESS)
        return {"after_crash": after_crash, "after_restart": listing, "restored": same,
                "final": (sorted(p.name for p in root_path.iterdir()), restarted.latest_step())}
    finally:
        destroy_parallel(groups)


def test_crash_mid_save_keeps_the_last_good_checkpoint(dist_run, tmp_path):
    for r in dist_run(_crash_mid_save, 2, str(tmp_path)):
        assert r["after_crash"] == (["latest", "step_00000001", "step_00000002.tmp"], 1)
        assert r["after_restart"] == ["latest", "step_00000001"]
        assert r["restored"]
        assert r["final"] == (["latest", "step_00000001", "step_00000002"], 2)


def _save_steps(root: str, steps: list[int], keep: int) -> None:
    groups = init_parallel(1)
    try:
        model, optimizer = tiny_model_and_optimizer(0)
        ckpt = Checkpointer(root, groups, keep=keep)
        for step in steps:
            ckpt.save(step, model, optimizer, {**PROGRESS, "step": step})
    finally:
        destroy_parallel(groups)


def _latest(root: str) -> int:
    groups = init_parallel(1)
    try:
        return Checkpointer(root, groups).latest_step()
    finally:
        destroy_parallel(groups)


def test_pruning_pointer_and_fallback(dist_run, tmp_path):
    root = str(tmp_path)
    dist_run(_save_steps, 2, root, [1, 2, 3, 4], 2)
    assert sorted(os.listdir(root)) == ["latest", "step_00000003", "step_00000004"]
    assert (tmp_path / "latest").read_text() == "step_00000004\n"
    (tmp_path / "latest").write_text("step_00000003\n")  # the pointer decides ...
    assert dist_run(_latest, 2, root) == [3, 3]
    (tmp_path / "latest").unlink()  # ... and without it, the newest complete folder
    assert dist_run(_latest, 2, root) == [4, 4]
    shutil.rmtree(tmp_path / "step_00000004")
    (tmp_path / "step_00000004").mkdir()  # no meta.json: incomplete, never picked
    (tmp_path / "latest").write_text("step_00000004\n")
    assert dist_run(_latest, 2, root) == [3, 3]


def _load_with_other_dp(root: str) -> dict:
    groups = init_parallel(1)
    try:
        model, optimizer = tiny_model_and_optimizer(7)
        torch.manual_seed(123 + groups.dp_rank)
        before = torch.get_rng_state()
        ckpt = Checkpointer(root, groups)
        ckpt.load(ckpt.latest_step(), model, optimizer)
        return {"params": [p.detach() for p in model.parameters()], "saved_dp": ckpt.meta(ckpt.latest_step())["dp"],
                "rng_kept": torch.equal(torch.get_rng_state(), before),
                "optim": [{k: v for k, v in optimizer.state[p].items()} for p in model.parameters()]}
    finally:
        destroy_parallel(groups)


def _save_trained(root: str) -> dict:
    groups = init_parallel(1)
    try:
        model, optimizer = tiny_model_and_optimizer(0)
        tiny_steps(model, optimizer, 2)
        Checkpointer(root, groups).save(2, model, optimizer, PROGRESS)
        return {"params": [p.detach() for p in model.parameters()],
                "optim": [{k: v for k, v in optimizer.state[p].items()} for p in model.parameters()]}
    finally:
        destroy_parallel(groups)


def test_a_checkpoint_loads_at_another_dp_size_keeping_the_rng(dist_run, tmp_path):
    (saved,) = dist_run(_save_trained, 1, str(tmp_path))
    for r in dist_run(_load_with_other_dp, 2, str(tmp_path)):
        assert r["saved_dp"] == 1 and r["rng_kept"]  # replica 1 has no saved stream: nothing is restored
        assert all(torch.equal(a, b) for a, b in zip(r["params"], saved["params"]))
        for got, expected in zip(r["optim"], saved["optim"]):
            assert got.keys() == expected.keys() == {"step", "exp_avg", "exp_avg_sq"}
            assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_pickled_items_are_refused(tmp_path):
    dcp.save({"weight": torch.ones(2), "note": "a python object"}, checkpoint_id=str(tmp_path), no_dist=True)
    with pytest.raises(ValueError, match="non-tensor item 'note'"):
        read_tensor_metadata(tmp_path)
