"""Tensor-parallel building blocks: the strided partition helpers and the two TP autograd ops
(`copy_to_group`, `gather_from_group`) against single-process references."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from hyena_cp.parallel import copy_to_group, count_comm, gather_from_group, shard_tp, tp_partition, unshard_tp
from references import rel_err


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("stride", [1, 3])
@pytest.mark.parametrize("dim", [0, 1])
def test_shard_unshard_roundtrip(world, stride, dim):
    full = torch.randn(12 * 2, 12 * 2).double()
    pieces = [shard_tp(full, dim, stride, world, r) for r in range(world)]
    assert all(p.shape[dim] == full.shape[dim] // world for p in pieces)
    assert torch.equal(unshard_tp(pieces, dim, stride), full)


def test_stride_three_keeps_q_k_v_blocks_together():
    """A [q; k; v] projection of 4 channels each over TP=2: rank t holds [q_t; k_t; v_t]."""
    rows = torch.arange(12)  # q = 0..3, k = 4..7, v = 8..11
    assert shard_tp(rows, 0, 3, 2, 0).tolist() == [0, 1, 4, 5, 8, 9]
    assert shard_tp(rows, 0, 3, 2, 1).tolist() == [2, 3, 6, 7, 10, 11]


def test_indivisible_size_raises():
    with pytest.raises(ValueError, match="stride\\*tp_size=3\\*2"):
        shard_tp(torch.zeros(9), 0, 3, 2, 0)


def test_tp_partition_reads_megatron_attributes():
    p = torch.nn.Parameter(torch.zeros(4))
    assert tp_partition(p) is None
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 3
    assert tp_partition(p) == (0, 3)


def worker_tp_ops(seed: int) -> dict:
    """Rank t uses rows t of a replicated ``w`` (copy_to_group) and all ranks use the gathered
    ``x`` identically (gather_from_group); returns grads and the counted bytes."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    w = torch.randn(world, 5, dtype=torch.float64, requires_grad=True)  # replicated
    xs = torch.randn(world, 3, 5, dtype=torch.float64)
    x = xs[rank].clone().requires_grad_()  # rank piece
    target = torch.randn(3, 5 * world, dtype=torch.float64)
    with count_comm() as stats:
        used = copy_to_group(w, dist.group.WORLD)[rank]  # this rank's disjoint part
        gathered = gather_from_group(x, 1, dist.group.WORLD)  # 3, 5*world, the same everywhere
        loss_part = (used**2).sum()  # each rank's own share of the first term
        loss_same = ((gathered - target) ** 2).sum()  # counted once, replicated on every rank
        (loss_part + loss_same).backward()
    return {"w_grad": w.grad, "x_grad": x.grad, "w": w.detach(), "xs": xs, "target": target,
            "bytes": dict(stats.by_op)}


@pytest.mark.parametrize("world", [2, 4])
def test_tp_ops_have_the_single_process_gradients(dist_run, world):
    results = dist_run(worker_tp_ops, world, 7)
    w, xs, target = results[0]["w"], results[0]["xs"], results[0]["target"]
    full_x = torch.cat(list(xs), dim=1)
    for rank, r in enumerate(results):
        assert rel_err(r["w_grad"], 2 * w) < 1e-14  # the sum of every rank's part: whole gradient
        expected = 2 * (full_x - target)[:, 5 * rank:5 * (rank + 1)]
        assert rel_err(r["x_grad"], expected) < 1e-14  # this rank's slice, not world x it
        assert set(r["bytes"]) == {"all_reduce", "all_gather"}, r["bytes"]
