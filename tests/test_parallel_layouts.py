"""Routing tests for hyena_cp.parallel.layouts with position-encoded tensors (value = global index)."""
from __future__ import annotations

import re

import pytest
import torch

from hyena_cp.parallel import layouts

WORLDS = [1, 2, 3, 4]
LAYOUTS = ["zigzag", "rows"]


def positions(length: int, shape: tuple[int, ...], dim: int) -> torch.Tensor:
    """A tensor of ``shape`` (with ``length`` at ``dim``) whose value is the index along ``dim``."""
    full = list(shape)
    full[dim] = length
    view = [1] * len(full)
    view[dim] = length
    return torch.arange(length).view(view).expand(full).contiguous()


def megatron_zigzag(x: torch.Tensor, seq_dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Megatron-LM's get_batch_on_this_cp_rank body, transcribed (without pin_memory)."""
    val = x.view(
        *x.shape[0:seq_dim], 2 * cp_size, x.shape[seq_dim] // (2 * cp_size), *x.shape[(seq_dim + 1):]
    )
    index = torch.tensor([cp_rank, (2 * cp_size - cp_rank - 1)])
    val = val.index_select(seq_dim, index)
    return val.view(*val.shape[0:seq_dim], -1, *val.shape[(seq_dim + 2):])


@pytest.mark.parametrize("world", WORLDS)
def test_chunk_ids(world):
    for rank in range(world):
        assert layouts.chunk_ids("zigzag", world, rank) == (rank, 2 * world - 1 - rank)
        assert layouts.chunk_ids("rows", world, rank) == (rank,)
    assert layouts.num_chunks("zigzag", world) == 2 * world
    assert layouts.num_chunks("rows", world) == world
    for layout in LAYOUTS:  # every chunk is held by exactly one rank
        held = sorted(c for r in range(world) for c in layouts.chunk_ids(layout, world, r))
        assert held == list(range(layouts.num_chunks(layout, world)))


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("shape,dim", [((24,), 0), ((2, 24, 3), 1), ((3, 2, 24), -1)])
def test_zigzag_matches_megatron(world, shape, dim):
    x = torch.randn(shape)
    for rank in range(world):
        expected = megatron_zigzag(x, dim % x.dim(), world, rank)
        torch.testing.assert_close(layouts.shard(x, dim, "zigzag", world, rank), expected, rtol=0, atol=0)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_holds_the_right_positions(world, layout):
    length = 24
    x = positions(length, (2, length), 1)
    c = length // layouts.num_chunks(layout, world)
    for rank in range(world):
        piece = layouts.shard(x, 1, layout, world, rank)
        want = torch.cat([torch.arange(i * c, (i + 1) * c) for i in layouts.chunk_ids(layout, world, rank)])
        assert piece.is_contiguous()
        assert torch.equal(piece, want.expand(2, -1))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,dim", [((24,), 0), ((2, 24, 3), 1), ((3, 2, 24), -1), ((24, 5), 0)])
def test_round_trip(world, layout, shape, dim):
    x = positions(24, shape, dim) * 10 + torch.randint(0, 10, shape)  # position-encoded, not constant
    pieces = [layouts.shard(x, dim, layout, world, r) for r in range(world)]
    assert torch.equal(layouts.unshard(pieces, dim, layout), x)
    rank_major = layouts.to_rank_major(x, dim, layout, world)
    assert torch.equal(rank_major, torch.cat(pieces, dim))
    assert torch.equal(layouts.from_rank_major(rank_major, dim, layout, world), x)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_single_rank_is_identity_for_any_length(layout):
    x = torch.randn(2, 7)
    assert torch.equal(layouts.shard(x, 1, layout, 1, 0), x)
    assert torch.equal(layouts.unshard([x], 1, layout), x)
    layouts.check_divisible(7, layout, 1)


def test_shard_is_differentiable():
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    pieces = [layouts.shard(x, 1, "zigzag", 2, r) for r in range(2)]
    layouts.unshard(pieces, 1, "zigzag").mul(torch.arange(8.0, dtype=torch.float64)).sum().backward()
    assert torch.equal(x.grad, torch.arange(8.0, dtype=torch.float64).expand(2, -1))


@pytest.mark.parametrize(
    "layout,world,needed",
    [("zigzag", 2, "2*cp_size=4"), ("zigzag", 4, "2*cp_size=8"), ("rows", 4, "cp_size=4")],
)
def test_indivisible_length_names_size_and_fix(layout, world, needed):
    message = rf"sequence length L=10 must be divisible by {re.escape(needed)}.*pad"
    with pytest.raises(ValueError, match=message):
        layouts.check_divisible(10, layout, world, "sequence length L")
    with pytest.raises(ValueError, match=re.escape(needed)):
        layouts.shard(torch.zeros(3, 10), 1, layout, world, 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="layout='ring'"):
        layouts.chunk_ids("ring", 2, 0)
    with pytest.raises(ValueError, match="rank=2"):
        layouts.shard(torch.zeros(8), 0, "zigzag", 2, 2)
    with pytest.raises(ValueError, match="same shape"):
        layouts.unshard([torch.zeros(4), torch.zeros(6)], 0, "rows")
    with pytest.raises(ValueError, match="chunks per rank"):
        layouts.unshard([torch.zeros(3), torch.zeros(3)], 0, "zigzag")
