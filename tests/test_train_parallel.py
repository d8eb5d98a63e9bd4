"""dp x cp process groups (`hyena_cp.parallel.dims`) and the gradient all-reduce
(`hyena_cp.parallel.grad_sync`): group membership in Megatron's rank order with both
builders, and "sum over CP, average over DP" on every parameter."""
from __future__ import annotations

import megatron.core.parallel_state  # noqa: F401  (imported before the dist_run workers fork: they inherit it)
import pytest
import torch
import torch.distributed as dist
from torch import nn

from hyena_cp.parallel import count_comm
from hyena_cp.parallel.dims import ParallelDims, broadcast_int, destroy_parallel, init_parallel
from hyena_cp.parallel.grad_sync import sync_gradients


def _ranks(group) -> list[int] | None:
    return None if group is None else dist.get_process_group_ranks(group)


def test_parallel_dims_validate_before_any_group():
    dims = ParallelDims(world=8, cp=4)
    assert (dims.dp, dims.coords(5)) == (2, (1, 1))
    with pytest.raises(ValueError, match="parallel.cp=3 must be >= 1 and divide the world size 8"):
        ParallelDims(world=8, cp=3)
    with pytest.raises(ValueError, match="parallel.cp=0"):
        ParallelDims(world=2, cp=0)


def _group_layout(cp: int, megatron: bool) -> tuple:
    groups = init_parallel(cp, megatron=megatron)
    try:
        return (groups.dp_rank, groups.cp_rank, _ranks(groups.cp_group), _ranks(groups.dp_group),
                groups.owns_default_group, broadcast_int(10 + dist.get_rank(), groups))
    finally:
        destroy_parallel(groups)


@pytest.mark.parametrize("megatron", [False, True], ids=["torch", "megatron"])
@pytest.mark.parametrize("world,cp", [(2, 2), (2, 1), (4, 2)])
def test_groups_follow_megatron_rank_order(dist_run, world, cp, megatron):
    results = dist_run(_group_layout, world, cp, megatron)
    for rank, (dp_rank, cp_rank, cp_ranks, dp_ranks, owns, agreed) in enumerate(results):
        assert (dp_rank, cp_rank) == divmod(rank, cp)
        assert cp_ranks == (None if cp == 1 else list(range(dp_rank * cp, (dp_rank + 1) * cp)))
        assert dp_ranks == (None if world == cp else list(range(cp_rank, world, cp)))
        assert not owns and agreed == 10  # the harness owns WORLD; rank 0's value everywhere


def _bad_cp() -> None:
    init_parallel(3)


def test_cp_not_dividing_world_raises_on_every_rank(dist_run):
    errors = dist_run(_bad_cp, 2, expect_error=ValueError)
    assert all("divide the world size 2" in str(e) for e in errors)


def _sync(cp: int, bucket_bytes: int) -> tuple[list[torch.Tensor], int]:
    groups = init_parallel(cp)
    rank = dist.get_rank()
    params = [nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(3, 2)),
              nn.Parameter(torch.zeros(4, dtype=torch.float64)), nn.Parameter(torch.zeros(2)),
              nn.Parameter(torch.zeros(2), requires_grad=False)]
    for i, p in enumerate(params[:3]):
        p.grad = torch.arange(p.numel(), dtype=p.dtype).view_as(p) * (rank + 1) + i  # differs per rank
    try:
        with count_comm() as stats:
            sync_gradients(params, groups.grad_group, divide_by=groups.dims.dp, bucket_bytes=bucket_bytes)
        return [p.grad for p in params[:4]] + [params[4].grad], stats.calls["all_reduce"]
    finally:
        destroy_parallel(groups)


@pytest.mark.parametrize("world,cp", [(2, 2), (2, 1), (4, 2), (1, 1)])
@pytest.mark.parametrize("bucket_bytes", [16, 2**20])
def test_gradients_are_summed_over_cp_and_averaged_over_dp(dist_run, world, cp, bucket_bytes):
    results = dist_run(_sync, world, cp, bucket_bytes)
    dp = world // cp
    shapes = [(5,), (3, 2), (4,)]
    for grads, calls in results:
        for i, shape in enumerate(shapes):
            base = torch.arange(torch.Size(shape).numel(), dtype=grads[i].dtype).view(shape)
            # sum over ranks of base * (r + 1) + i, divided by dp
            expected = (base * sum(r + 1 for r in range(world)) + i * world) / dp
            torch.testing.assert_close(grads[i], expected, rtol=0, atol=1e-12)
        assert torch.equal(grads[3], torch.zeros(2))  # no gradient on any rank: zeros
        assert grads[4] is None  # frozen parameters are left alone
        # buckets hold consecutive grads of one dtype (f32 f32 | f64 | f32); tiny ones one each
        assert calls == (0 if world == 1 else 3 if bucket_bytes > 64 else 4)
