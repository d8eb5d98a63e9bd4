"""dp x cp x tp process groups (`hyena_cp.parallel.dims`) and the gradient all-reduce
(`hyena_cp.parallel.grad_sync`): group membership in megatron's rank order (tp innermost,
then cp, then dp) with both builders, and "sum over CP, average over DP" per TP shard."""
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
    dims = ParallelDims(world=8, cp=2, tp=2)
    assert (dims.dp, dims.coords(5), dims.rank(1, 0, 1)) == (2, (1, 0, 1), 5)
    assert [dims.rank(*dims.coords(r)) for r in range(8)] == list(range(8))
    assert ParallelDims(world=8, cp=4).coords(5) == (1, 1, 0)  # tp defaults to 1
    with pytest.raises(ValueError, match=r"parallel.cp=3 x parallel.tp=1 = 3 must divide the world size 8 "
                                         r"\(dp \* cp \* tp == world\)"):
        ParallelDims(world=8, cp=3)
    with pytest.raises(ValueError, match="parallel.cp=2 x parallel.tp=3 = 6 must divide the world size 8"):
        ParallelDims(world=8, cp=2, tp=3)
    for kwargs, key in ((dict(cp=0), "parallel.cp=0"), (dict(cp=1, tp=0), "parallel.tp=0")):
        with pytest.raises(ValueError, match=f"{key} must be >= 1"):
            ParallelDims(world=2, **kwargs)


def _expected_layout(world: int, cp: int, tp: int, rank: int) -> dict:
    """Megatron's order written out: global = dp_rank * cp * tp + cp_rank * tp + tp_rank."""
    coords = {r: (r // (cp * tp), (r // tp) % cp, r % tp) for r in range(world)}
    dp_rank, cp_rank, tp_rank = coords[rank]

    def members(same: tuple[int, ...]) -> list[int] | None:  # ranks agreeing on the coordinates in `same`
        ranks = [r for r, c in coords.items() if all(c[i] == coords[rank][i] for i in same)]
        return ranks if len(ranks) > 1 else None

    return {"coords": (dp_rank, cp_rank, tp_rank), "tp": members((0, 1)), "cp": members((0, 2)),
            "dp": members((1, 2)), "grad": members((2,))}


def _group_layout(cp: int, tp: int, megatron: bool) -> dict:
    groups = init_parallel(cp, tp=tp, megatron=megatron)
    try:
        mesh = groups.tp_mesh
        return {"coords": (groups.dp_rank, groups.cp_rank, groups.tp_rank), "tp": _ranks(groups.tp_group),
                "cp": _ranks(groups.cp_group), "dp": _ranks(groups.dp_group), "grad": _ranks(groups.grad_group),
                "mesh": None if mesh is None else mesh.mesh.tolist(), "owns": groups.owns_default_group,
                "agreed": broadcast_int(10 + dist.get_rank(), groups)}
    finally:
        destroy_parallel(groups)


@pytest.mark.parametrize("dp,tp,cp", [(1, 1, 2), (2, 1, 1), (1, 2, 1), (1, 2, 2), (2, 2, 1), (2, 1, 2)])
def test_both_builders_give_megatrons_rank_order(dist_run, dp, tp, cp):
    world = dp * tp * cp
    layouts = {megatron: dist_run(_group_layout, world, cp, tp, megatron) for megatron in (False, True)}
    assert layouts[False] == layouts[True]  # new_group and parallel_state: identical groups
    for rank, got in enumerate(layouts[False]):
        expected = _expected_layout(world, cp, tp, rank)
        assert {k: got[k] for k in expected} == expected, rank
        assert got["mesh"] == expected["tp"]  # the TP DeviceMesh spans the TP group
        assert not got["owns"] and got["agreed"] == 10  # the harness owns WORLD; rank 0's value everywhere


def _bad_mesh(cp: int, tp: int) -> None:
    init_parallel(cp, tp=tp)


@pytest.mark.parametrize("cp,tp", [(3, 1), (1, 3), (2, 2)])
def test_mesh_not_dividing_world_raises_on_every_rank(dist_run, cp, tp):
    errors = dist_run(_bad_mesh, 2, cp, tp, expect_error=ValueError)
    assert all(f"parallel.cp={cp} x parallel.tp={tp}" in str(e) and "divide the world size 2" in str(e)
               for e in errors)


def _sync(cp: int, tp: int, bucket_bytes: int) -> tuple[list[torch.Tensor], int]:
    groups = init_parallel(cp, tp=tp)
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


@pytest.mark.parametrize("world,cp,tp", [(2, 2, 1), (2, 1, 1), (4, 2, 1), (1, 1, 1), (4, 1, 2), (4, 2, 2)])
@pytest.mark.parametrize("bucket_bytes", [16, 2**20])
def test_gradients_are_summed_over_cp_and_averaged_over_dp(dist_run, world, cp, tp, bucket_bytes):
    results = dist_run(_sync, world, cp, tp, bucket_bytes)
    dp = world // (cp * tp)
    shapes = [(5,), (3, 2), (4,)]
    for rank, (grads, calls) in enumerate(results):
        same_shard = [r for r in range(world) if r % tp == rank % tp]  # the dp x cp ranks of this TP rank
        for i, shape in enumerate(shapes):
            base = torch.arange(torch.Size(shape).numel(), dtype=grads[i].dtype).view(shape)
            # sum over the ranks of this TP shard of base * (r + 1) + i, divided by dp; never over TP
            expected = (base * sum(r + 1 for r in same_shard) + i * len(same_shard)) / dp
            torch.testing.assert_close(grads[i], expected, rtol=0, atol=1e-12)
        assert torch.equal(grads[3], torch.zeros(2))  # no gradient on any rank: zeros
        assert grads[4] is None  # frozen parameters are left alone
        # buckets hold consecutive grads of one dtype (f32 f32 | f64 | f32); tiny ones one each
        assert calls == (0 if len(same_shard) == 1 else 3 if bucket_bytes > 64 else 4)
