"""Checkpoints of TP-sharded models (`hyena_cp.train.checkpoint` with `hyena_cp.parallel.tp_full_view`):
every TP shard lands in the FULL tensor on disk (no collision of the ranks' shards under one
key), a resume in the same dp x tp x cp layout is bitwise, and a checkpoint written at one TP
size loads at another (tp2 -> tp1 and tp1 -> tp2) with identical full parameters and AdamW
state. The model is `tp_helpers.TinyTPModel` (strided, plain and replicated parameters)."""
from __future__ import annotations

import json

import megatron.core.parallel_state  # noqa: F401  (imported before the dist_run workers fork)
import pytest
import torch
import torch.distributed as dist

from hyena_cp.parallel import TPPartition, shard_tp, tp_full_view, tp_partition, unshard_tp
from hyena_cp.distributed.mesh import destroy_parallel, init_parallel
from hyena_cp.train.checkpoint import Checkpointer, load_model_state
from tp_helpers import FEATURES, TinyTPModel

PROGRESS = {"step": 2, "epoch": 0, "global_batch_size": 8}


def _model_and_optimizer(seed: int) -> tuple[TinyTPModel, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyTPModel()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _steps(model: TinyTPModel, optimizer: torch.optim.Optimizer, n: int) -> None:
    """The same data on every rank: the TP ranks of a position hold the same batch."""
    for i in range(n):
        optimizer.zero_grad()
        x = torch.linspace(-1.0, 1.0, 2 * FEATURES).view(2, FEATURES) * (i + 1)
        model(x).square().sum().backward()
        optimizer.step()


def _state(model: TinyTPModel, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's parameters, AdamW state and partitions, by parameter name."""
    names = {p: n for n, p in model.named_parameters()}
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "optim": {names[p]: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()},
            "partitions": {n: tp_partition(p) for n, p in model.named_parameters()}}


def _roundtrip(root: str, cp: int, tp: int) -> dict:
    groups = init_parallel(cp, tp=tp, megatron=True)
    try:
        model, optimizer = _model_and_optimizer(0)
        _steps(model, optimizer, 2)
        saved = _state(model, optimizer)
        torch.manual_seed(100 + groups.dp_rank)
        ckpt = Checkpointer(root, groups)
        ckpt.save(2, model, optimizer, PROGRESS)
        draw = torch.rand(3)
        _steps(model, optimizer, 1)
        reference = [p.detach().clone() for p in model.parameters()]

        fresh, fresh_opt = _model_and_optimizer(7)  # other weights, no optimizer state
        torch.manual_seed(999)
        progress = ckpt.load(ckpt.latest_step(), fresh, fresh_opt)
        restored = _state(fresh, fresh_opt)
        restored_draw = torch.rand(3)
        _steps(fresh, fresh_opt, 1)
        return {"progress": progress, "draws": (draw, restored_draw), "reference": reference, "saved": saved,
                "restored": restored, "resumed": [p.detach() for p in fresh.parameters()],
                "coords": (groups.dp_rank, groups.cp_rank, groups.tp_rank)}
    finally:
        destroy_parallel(groups)


def _full(pieces: list[torch.Tensor], partition) -> torch.Tensor:
    return pieces[0] if partition is None else unshard_tp(pieces, partition.dim, partition.stride)


@pytest.mark.parametrize("world,cp,tp", [(2, 1, 2), (4, 1, 2), (4, 2, 2)], ids=["tp2", "dp2xtp2", "cp2xtp2"])
def test_tp_roundtrip_is_bitwise_and_stores_full_tensors(dist_run, tmp_path, world, cp, tp):
    results = dist_run(_roundtrip, world, str(tmp_path), cp, tp)
    for r in results:
        assert r["progress"] == PROGRESS and torch.equal(*r["draws"])
        assert all(torch.equal(a, b) for a, b in zip(r["reference"], r["resumed"]))  # bitwise next step
        _assert_same_state(r["restored"], r["saved"])  # this rank's shards, bitwise
    path = tmp_path / "step_00000002"
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["tp"], meta["cp"], meta["dp"]) == (tp, cp, world // (cp * tp))
    partitions = meta["tp_partitions"]
    assert partitions["model/fc1.weight"] == [0, 3] and partitions["optim/fc2.weight/exp_avg"] == [1, 3]
    assert "optim/fc1.weight/step" not in partitions  # 0-dim state is a replica
    on_disk = load_model_state(path)  # one process, no group: the FULL single-process tensors
    first_position = [r for r in results if r["coords"][:2] == (0, 0)]  # its TP ranks, in TP order
    for name, partition in results[0]["saved"]["partitions"].items():
        full = _full([r["saved"]["params"][name] for r in first_position], partition)
        assert torch.equal(on_disk[name], full), name


def _save_at(root: str, tp: int) -> dict:
    groups = init_parallel(1, tp=tp, megatron=True)
    try:
        model, optimizer = _model_and_optimizer(0)
        _steps(model, optimizer, 2)
        Checkpointer(root, groups).save(2, model, optimizer, PROGRESS)
        return _state(model, optimizer)
    finally:
        destroy_parallel(groups)


def _load_at(root: str, tp: int) -> dict:
    groups = init_parallel(1, tp=tp, megatron=True)
    try:
        model, optimizer = _model_and_optimizer(7)
        ckpt = Checkpointer(root, groups)
        ckpt.load(ckpt.latest_step(), model, optimizer)
        return _state(model, optimizer)
    finally:
        destroy_parallel(groups)


def _full_state(states: list[dict]) -> dict:
    """Parameters and AdamW state as full tensors from the TP ranks' states (in TP order)."""
    parts = states[0]["partitions"]
    params = {n: _full([s["params"][n] for s in states], parts[n]) for n in parts}
    optim = {n: {k: (v if v.dim() == 0 else _full([s["optim"][n][k] for s in states], parts[n]))
                 for k, v in entries.items()} for n, entries in states[0]["optim"].items()}
    return {"params": params, "optim": optim}


def _assert_same_state(got: dict, expected: dict) -> None:
    assert got["params"].keys() == expected["params"].keys() and got["optim"].keys() == expected["optim"].keys()
    for name, value in expected["params"].items():
        assert torch.equal(got["params"][name], value), name
    for name, entries in expected["optim"].items():
        assert got["optim"][name].keys() == entries.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in entries.items():
            assert torch.equal(got["optim"][name][key], value), (name, key)


@pytest.mark.parametrize("save_tp,load_tp", [(2, 1), (1, 2), (4, 2)])
def test_a_checkpoint_loads_at_another_tp_size(dist_run, tmp_path, save_tp, load_tp):
    saved = _full_state(dist_run(_save_at, save_tp, str(tmp_path), save_tp))
    loaded = _full_state(dist_run(_load_at, load_tp, str(tmp_path), load_tp))
    _assert_same_state(loaded, saved)  # colliding shards would load one rank's shard in every place


def _stride_mismatch(root: str) -> str:
    groups = init_parallel(1, tp=1, megatron=True)
    try:
        model, optimizer = _model_and_optimizer(0)
        model.fc1.weight.partition_stride = 1  # as if the model's q/k/v layout had changed
        ckpt = Checkpointer(root, groups)
        with pytest.raises(ValueError, match="strided .folded. layouts differ") as info:
            ckpt.load(ckpt.latest_step(), model, optimizer)
        return str(info.value)
    finally:
        destroy_parallel(groups)


def test_a_changed_partition_stride_is_refused(dist_run, tmp_path):
    dist_run(_save_at, 1, str(tmp_path), 1)
    (message,) = dist_run(_stride_mismatch, 1, str(tmp_path))
    assert "model/fc1.weight" in message and "stride=3" in message


def _foreign_state(root: str, tp: int, action: str) -> str | torch.Tensor:
    """Adafactor-like state (not of its parameter's shape) on a TP-sharded parameter: fine at
    tp=1, where nothing collides; refused under TP, on save and on load, on every rank alike."""
    groups = init_parallel(1, tp=tp, megatron=True)
    try:
        model, optimizer = _model_and_optimizer(0)
        _steps(model, optimizer, 1)
        optimizer.state[model.fc1.weight]["factored"] = torch.arange(3.0)  # e.g. row statistics
        ckpt = Checkpointer(root, groups)
        if action == "save":
            with pytest.raises(ValueError, match="only state of the parameter's shape") as info:
                ckpt.save(1, model, optimizer, PROGRESS)
        elif action == "load":
            with pytest.raises(ValueError, match="cannot be split over tp=2") as info:
                ckpt.load(ckpt.latest_step(), model, optimizer)
        else:  # round trip at tp=1
            ckpt.save(1, model, optimizer, PROGRESS)
            fresh, fresh_opt = _model_and_optimizer(7)
            ckpt.load(1, fresh, fresh_opt)
            return fresh_opt.state[fresh.fc1.weight]["factored"]
        dist.barrier()  # every rank raised before DCP's collectives: the group is intact
        return str(info.value)
    finally:
        destroy_parallel(groups)


def test_optimizer_state_of_another_shape_is_refused_under_tp(dist_run, tmp_path):
    messages = dist_run(_foreign_state, 2, str(tmp_path / "tp2"), 2, "save")
    assert all("fc1.weight.factored" in m for m in messages)
    (restored,) = dist_run(_foreign_state, 1, str(tmp_path / "tp1"), 1, "roundtrip")
    assert torch.equal(restored, torch.arange(3.0))
    messages = dist_run(_foreign_state, 2, str(tmp_path / "tp1"), 2, "load")
    assert all("optim/fc1.weight/factored" in m for m in messages)


def test_tp_full_view_is_a_view_sharing_storage():
    local = torch.arange(12.0).view(6, 2)
    view = tp_full_view(local, TPPartition(0, 3), None)  # one TP rank: a plain folded view
    assert view.shape == (3, 2, 2) and view.data_ptr() == local.data_ptr()
    view.zero_()
    assert not local.any()


def test_shard_of_the_full_tensor_is_the_stored_chunk():
    """The folded view of `shard_tp`'s piece is chunk t of the folded full tensor (what DCP stores)."""
    full = torch.arange(24.0).view(12, 2)
    folded = full.unflatten(0, (3, 4))  # stride 3, full / stride = 4
    for rank in range(2):
        piece = tp_full_view(shard_tp(full, 0, 3, 2, rank), TPPartition(0, 3), None)
        assert torch.equal(piece, folded.chunk(2, dim=1)[rank])
