"""The run's dp x cp x tp DeviceMesh (`hyena_cp.distributed.mesh`) and the gradient reduction of
FSDP2 (`hyena_cp.distributed.fsdp`): group membership in megatron's rank order (tp innermost, then
cp, then dp) for the mesh and for megatron-core's ``parallel_state`` (the same ranks), and
"sum over CP, average over DP" per TP shard for both ``dp_mode`` s, with the negative twin of
FSDP's default reduction (an average over dp x cp)."""
from __future__ import annotations

import megatron.core.parallel_state  # noqa: F401  (imported before the dist_run workers fork: they inherit it)
import pytest
import torch
import torch.distributed as dist
from torch import nn

from megatron.core import parallel_state
from torch.distributed.tensor import DTensor

from hyena_cp.distributed.mesh import ParallelDims, broadcast_int, destroy_parallel, init_parallel
from hyena_cp.distributed.fsdp import apply_data_parallel, loss_scale


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
        out = {"coords": (groups.dp_rank, groups.cp_rank, groups.tp_rank), "tp": _ranks(groups.tp_group),
               "cp": _ranks(groups.cp_group), "dp": _ranks(groups.dp_group), "grad": _ranks(groups.grad_group),
               "mesh": None if mesh is None else mesh.mesh.tolist(), "owns": groups.owns_default_group,
               "world_mesh": groups.mesh.mesh.tolist(), "agreed": broadcast_int(10 + dist.get_rank(), groups)}
        if megatron:  # what megatron-core modules read (size-1 groups as None, like ours)
            theirs = {"tp": parallel_state.get_tensor_model_parallel_group(),
                      "cp": parallel_state.get_context_parallel_group(),
                      "dp": parallel_state.get_data_parallel_group(with_context_parallel=False),
                      "grad": parallel_state.get_data_parallel_group(with_context_parallel=True)}
            out["megatron"] = {k: _ranks(g) if g.size() > 1 else None for k, g in theirs.items()}
        return out
    finally:
        destroy_parallel(groups)


@pytest.mark.parametrize("dp,tp,cp", [(1, 1, 2), (2, 1, 1), (1, 2, 1), (1, 2, 2), (2, 2, 1), (2, 1, 2)])
def test_mesh_and_megatron_groups_hold_megatrons_rank_order(dist_run, dp, tp, cp):
    world = dp * tp * cp
    layouts = dist_run(_group_layout, world, cp, tp, True)
    for rank, got in enumerate(layouts):
        expected = _expected_layout(world, cp, tp, rank)
        assert {k: got[k] for k in expected} == expected, rank  # the mesh's groups
        assert got["megatron"] == {k: expected[k] for k in ("tp", "cp", "dp", "grad")}, rank  # parallel_state's
        assert got["mesh"] == expected["tp"]  # the TP DeviceMesh spans the TP group
        assert got["world_mesh"] == torch.arange(world).view(dp, cp, tp).tolist()
        assert not got["owns"] and got["agreed"] == 10  # the harness owns WORLD; rank 0's value everywhere
    if world == 4:  # without megatron the mesh is the same
        assert [{k: r[k] for k in expected} for r in dist_run(_group_layout, world, cp, tp, False)] == \
            [{k: r[k] for k in expected} for r in layouts]


def _bad_mesh(cp: int, tp: int) -> None:
    init_parallel(cp, tp=tp)


@pytest.mark.parametrize("cp,tp", [(3, 1), (1, 3), (2, 2)])
def test_mesh_not_dividing_world_raises_on_every_rank(dist_run, cp, tp):
    errors = dist_run(_bad_mesh, 2, cp, tp, expect_error=ValueError)
    assert all(f"parallel.cp={cp} x parallel.tp={tp}" in str(e) and "divide the world size 2" in str(e)
               for e in errors)


class _Scale(nn.Module):
    """``loss = <weight, x>``: the gradient of ``weight`` is ``x`` (the rank's own, below)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(*shape, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * x.view_as(self.weight)).sum()


class _Blocks(nn.Module):
    """Two FSDP units (uneven shards at dp x cp = 4: 5 and 3 rows) and a root parameter."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Scale(5), _Scale(3, 2)])
        self.root = _Scale(2)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.blocks[0](xs[0]) + self.blocks[1](xs[1]) + self.root(xs[2])


def _reduced(cp: int, tp: int, mode: str, scaled: bool) -> list[torch.Tensor]:
    """Each rank's loss share has the gradient ``base * (rank + 1) + i``; backward of the share
    times `loss_scale` (``scaled``, as the loop does) or of the share itself (FSDP's default
    alone); returns the reduced full gradients."""
    groups = init_parallel(cp, tp=tp)
    try:
        model = apply_data_parallel(_Blocks(), groups.dp_cp_mesh, mode=mode)
        rank, shapes = dist.get_rank(), [(5,), (3, 2), (2,)]
        xs = [torch.arange(torch.Size(s).numel(), dtype=torch.float64) * (rank + 1) + i for i, s in enumerate(shapes)]
        (model(xs) * (loss_scale(cp) if scaled else 1)).backward()
        grads = [p.grad for p in (model.blocks[0].weight, model.blocks[1].weight, model.root.weight)]
        assert all(isinstance(g, DTensor) for g in grads)
        return [g.full_tensor() for g in grads]
    finally:
        destroy_parallel(groups)


def _expected(world: int, tp: int, dp: int, rank: int) -> list[torch.Tensor]:
    same_shard = [r for r in range(world) if r % tp == rank % tp]  # the dp x cp ranks of this TP rank
    out = []
    for i, shape in enumerate([(5,), (3, 2), (2,)]):
        base = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).view(shape)
        # sum over the ranks of this TP shard of base * (r + 1) + i, divided by dp; never over TP
        out.append((base * sum(r + 1 for r in same_shard) + i * len(same_shard)) / dp)
    return out


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
@pytest.mark.parametrize("world,cp,tp", [(2, 2, 1), (2, 1, 1), (4, 2, 1), (4, 2, 2), (4, 1, 2)])
def test_gradients_are_summed_over_cp_and_averaged_over_dp(dist_run, world, cp, tp, mode):
    dp = world // (cp * tp)
    for rank, grads in enumerate(dist_run(_reduced, world, cp, tp, mode, True)):
        for got, want in zip(grads, _expected(world, tp, dp, rank)):
            torch.testing.assert_close(got, want.view_as(got), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_fsdp_default_average_over_cp_breaks_the_invariant(dist_run, mode):
    """Negative twin: without the loss scale, FSDP's mean over dp x cp averages over CP instead of summing."""
    for rank, grads in enumerate(dist_run(_reduced, 4, 2, 1, mode, False)):
        for got, want in zip(grads, _expected(4, 1, 2, rank)):
            torch.testing.assert_close(got * 2, want.view_as(got), rtol=0, atol=1e-12)  # off by exactly cp
            assert not torch.allclose(got, want.view_as(got))
