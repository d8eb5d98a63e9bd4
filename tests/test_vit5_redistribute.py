"""`parallel.redistribute`: routing on position-encoded tensors, exact adjoint, bytes, errors;
and the patch-merge source maps the vision models build on it."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from hyena_cp.models.token_grid import StageGrid, merge_source
from hyena_cp.parallel import count_comm, redistribute, shard, unshard


def random_source(n_in: int, n_out: int, seed: int) -> torch.Tensor:
    """A map with zeros (-1), duplicated sources and unused inputs."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(-1, n_in, (n_out,), generator=g)
    source[0] = source[-1]  # at least one duplicate
    return source


def encoded(n: int) -> torch.Tensor:
    """``[B=2, n, C=3]`` whose every entry names its (batch, token, channel)."""
    b, t, c = torch.meshgrid(torch.arange(2), torch.arange(n), torch.arange(3), indexing="ij")
    return (1000 * b + t + 0.01 * c).double()


def global_reference(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    keep = (source >= 0)[None, :, None]
    return torch.where(keep, x[:, source.clamp_min(0)], 0.0)


def worker_move(x_global: torch.Tensor, source: torch.Tensor, grad_global: torch.Tensor) -> dict:
    group = dist.group.WORLD
    world, rank = dist.get_world_size(), dist.get_rank()
    x = shard(x_global, 1, "rows", world, rank).requires_grad_(True)
    with count_comm() as stats:
        y = redistribute(x, source, group)
        y.backward(shard(grad_global, 1, "rows", world, rank))
    return {"y": y.detach(), "dx": x.grad, "bytes": stats.bytes_sent}


CASES = [(12, 8, 0), (8, 16, 1), (16, 16, 2), (24, 4, 3)]


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("n_in,n_out,seed", CASES)
def test_routing_and_adjoint(dist_run, world, n_in, n_out, seed):
    source = random_source(n_in, n_out, seed)
    x, grad = encoded(n_in), torch.randn(2, n_out, 3, dtype=torch.float64)
    results = dist_run(worker_move, world, x, source, grad)
    y = unshard([r["y"] for r in results], 1, "rows")
    assert torch.equal(y, global_reference(x, source))  # a pure copy: exact
    # Adjoint: the input gradient is the reverse move, summing the duplicates.
    x_ref = x.clone().requires_grad_(True)
    global_reference(x_ref, source).backward(grad)
    torch.testing.assert_close(unshard([r["dx"] for r in results], 1, "rows"), x_ref.grad, rtol=0, atol=1e-12)
    # Bytes: every token whose input lives on another rank crosses once forward, once backward.
    n_in_local, n_out_local = n_in // world, n_out // world
    for rank, r in enumerate(results):
        mine = (source >= 0) & (source // n_in_local == rank)
        remote = mine & (torch.arange(n_out) // n_out_local != rank)
        received = (source[rank * n_out_local:(rank + 1) * n_out_local] >= 0) & \
                   (source[rank * n_out_local:(rank + 1) * n_out_local] // n_in_local != rank)
        row = 2 * 3 * 8
        assert r["bytes"] == row * (int(remote.sum()) + int(received.sum())), rank


def test_single_process_is_a_local_gather():
    source = random_source(10, 6, 4)
    x = encoded(10)
    with count_comm() as stats:
        y = redistribute(x, source, None)
    assert torch.equal(y, global_reference(x, source)) and stats.bytes_sent == 0


def worker_local_only(world_tokens: int) -> int:
    """A map whose inputs all live on the output's own rank: no collective at all."""
    world, rank = dist.get_world_size(), dist.get_rank()
    source = torch.arange(world_tokens).flip(0).reshape(world, -1).flip(0).reshape(-1)  # reverse within blocks
    x = shard(encoded(world_tokens), 1, "rows", world, rank)
    with count_comm() as stats:
        y = redistribute(x, source, dist.group.WORLD)
    assert torch.equal(y, x.flip(1))
    return sum(stats.calls.values())


def test_rank_local_moves_do_not_communicate(dist_run):
    assert dist_run(worker_local_only, 2, 8) == [0, 0]


def worker_bad(n_local: int, source: torch.Tensor) -> None:
    redistribute(torch.randn(1, n_local, 2), source, dist.group.WORLD)


@pytest.mark.parametrize("n_local,source,match", [
    (3, torch.arange(5), "divisible by the cp_group size"),
    (3, torch.tensor([0, 6, 1, 2]), "outside the global input of 6"),
    (3, torch.arange(4).int(), "int64"),
])
def test_bad_maps_raise_on_every_rank_before_communicating(dist_run, n_local, source, match):
    errors = dist_run(worker_bad, 2, n_local, source, expect_error=ValueError)
    assert all(match in str(e) for e in errors), errors


# ------------------------------------------------------------ merge maps
@pytest.mark.parametrize("grid", [StageGrid(4, 6, 5), StageGrid(5, 3, 0), StageGrid(3, 3, 1), StageGrid(6, 2, 5)])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_merge_source_routes_swin_blocks_and_extras(grid, world):
    old, new = grid.layout(world), grid.merged().layout(world)
    source = merge_source(old, new).reshape(-1, 4)
    assert source.shape[0] == new.num_tokens and new.num_tokens % world == 0
    for pos in range(new.num_tokens):
        if pos < new.grid.num_patches:
            i, j = divmod(pos, new.grid.grid_w)
            for slot, (dy, dx) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
                r, c = 2 * i + dy, 2 * j + dx
                want = r * grid.grid_w + c if r < grid.grid_h and c < grid.grid_w else -1  # odd side: zero
                assert source[pos, slot] == want
        elif pos < new.grid.num_valid:
            assert source[pos].tolist() == [grid.num_patches + pos - new.grid.num_patches, -1, -1, -1]
        else:
            assert source[pos].tolist() == [-1] * 4
    used = source[source >= 0]
    assert used.numel() == used.unique().numel() == grid.num_valid  # every real token moves exactly once
