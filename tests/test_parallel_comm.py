"""Multi-process tests of hyena_cp.parallel's collectives against single-process references.

Rank functions build the GLOBAL tensors from a shared seed, run the sharded op on their own
piece, and return ``{name: (got, want)}`` pairs (plus byte counts) for the test to compare.
Routing is checked with position-encoded tensors (exact equality), gradients against
single-process autograd in float64 (1e-12; the sharded ops only move or add values).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hyena_cp import parallel as cp
from hyena_cp.parallel import layouts

F64 = 8  # bytes per float64 element
TOL = dict(rtol=1e-12, atol=1e-12)


def _ctx() -> tuple[dist.ProcessGroup, int, int]:
    group = dist.group.WORLD
    return group, dist.get_rank(group), dist.get_world_size(group)


def _assert_pairs(results: list[dict], exact: bool = True) -> None:
    for rank, pairs in enumerate(results):
        for name, (got, want) in pairs.items():
            if exact:
                assert torch.equal(got, want), f"rank {rank}: {name} differs"
            else:
                torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"rank {rank}: {name}: {m}")


def _coded(*shape: int) -> torch.Tensor:
    """float64 tensor whose value encodes its multi-index (distinct everywhere)."""
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)


# ----------------------------------------------------------------------------------- swaps
def _swap_routing(layout: str, kind: str) -> dict:
    group, rank, world = _ctx()
    B, C, S = 2, 12, 24
    if kind == "bcs":
        full, cdim = _coded(B, C, S), 1
        local = layouts.shard(full, -1, layout, world, rank)
    elif kind == "qkv":  # q, k, v swapped together, each keeps its own channel block
        full, cdim = _coded(B, 3, C, S), 2
        local = layouts.shard(full, -1, layout, world, rank)
    else:  # 2-D row blocks, flattened by the caller
        H, W = 12, 2
        full, cdim = _coded(B, C, H, W), 1
        local = layouts.shard(full, 2, "rows", world, rank).flatten(2)
        full = full.flatten(2)
    block = C // world
    with cp.count_comm() as fwd:
        y = cp.seq_to_channel(local, group, layout, channel_dim=cdim)
    with cp.count_comm() as back_stats:
        back = cp.channel_to_seq(y, group, layout, channel_dim=cdim)
    want = full.narrow(cdim, rank * block, block)
    expected_bytes = local.numel() * F64 * (world - 1) // world
    return {
        "pairs": {"seq_to_channel": (y, want), "round_trip": (back, local)},
        "bytes": (fwd.bytes_sent, back_stats.bytes_sent, expected_bytes),
        "calls": (dict(fwd.calls), dict(back_stats.calls)),
    }


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "layout,kind", [("zigzag", "bcs"), ("rows", "bcs"), ("zigzag", "qkv"), ("rows", "grid")]
)
def test_swap_routing_and_bytes(dist_run, world, layout, kind):
    results = dist_run(_swap_routing, world, layout, kind)
    _assert_pairs([r["pairs"] for r in results])
    for r in results:
        sent_fwd, sent_back, expected = r["bytes"]
        assert sent_fwd == sent_back == expected
        assert r["calls"] == (({"all_to_all": 1},) * 2 if world > 1 else ({}, {}))


def _swap_grads(layout: str) -> dict:
    """Loss = sum over ranks of <G_r, f(x)_r>: the single-process grad is G, placed by layout."""
    group, rank, world = _ctx()
    B, C, S = 2, 12, 24
    block = slice(rank * C // world, (rank + 1) * C // world)
    torch.manual_seed(0)
    x_full, g_full = torch.randn(B, C, S, dtype=torch.float64), torch.randn(B, C, S, dtype=torch.float64)

    x = layouts.shard(x_full, -1, layout, world, rank).requires_grad_()
    with cp.count_comm() as stats:
        y = cp.seq_to_channel(x, group, layout)
        (y * g_full[:, block]).sum().backward()
    pairs = {"seq_to_channel grad": (x.grad, layouts.shard(g_full, -1, layout, world, rank))}

    z = x_full[:, block].detach().clone().requires_grad_()
    (cp.channel_to_seq(z, group, layout) * layouts.shard(g_full, -1, layout, world, rank)).sum().backward()
    pairs["channel_to_seq grad"] = (z.grad, g_full[:, block])
    return {"pairs": pairs, "calls": dict(stats.calls), "bytes": stats.bytes_sent, "numel": x.numel()}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["zigzag", "rows"])
def test_swap_gradients_are_the_adjoint(dist_run, world, layout):
    results = dist_run(_swap_grads, world, layout)
    _assert_pairs([r["pairs"] for r in results])
    for r in results:  # backward is one more AllToAll of the same size
        assert r["calls"] == ({"all_to_all": 2} if world > 1 else {})
        assert r["bytes"] == 2 * r["numel"] * F64 * (world - 1) // world


# ------------------------------------------------------------------------------------ halos
def _causal_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Single-process reference: depthwise causal conv, [B, C, L] -> [B, C, L]."""
    return F.conv1d(F.pad(x, (w.shape[-1] - 1, 0)), w, groups=x.shape[1])


def _halo_1d(chunk: int, kernel: int) -> dict:
    group, rank, world = _ctx()
    halo, B, C = kernel - 1, 2, 3
    L = 2 * world * chunk
    torch.manual_seed(0)
    x_full = torch.randn(B, C, L, dtype=torch.float64, requires_grad=True)
    w, g_full = torch.randn(C, 1, kernel, dtype=torch.float64), torch.randn(B, C, L, dtype=torch.float64)
    _causal_conv(x_full, w).mul(g_full).sum().backward()

    x = layouts.shard(x_full.detach(), -1, "zigzag", world, rank).requires_grad_()
    with cp.count_comm() as fwd:
        h = cp.causal_halo_1d(x, halo, group)  # B, C, 2, halo
    padded = [torch.cat([h[:, :, i], piece], -1) for i, piece in enumerate(x.chunk(2, -1))]
    y = torch.cat([F.conv1d(p, w, groups=C) for p in padded], -1)  # B, C, L_local
    with cp.count_comm() as bwd:
        (y * layouts.shard(g_full, -1, "zigzag", world, rank)).sum().backward()

    padded_full = F.pad(x_full.detach(), (halo, 0))  # position p of x is p + halo here
    ids = layouts.chunk_ids("zigzag", world, rank)
    want_h = torch.stack([padded_full[..., j * chunk : j * chunk + halo] for j in ids], -2)
    with torch.no_grad():
        want_y = layouts.shard(_causal_conv(x_full, w), -1, "zigzag", world, rank)
    return {
        "halo": {"halo": (h.detach(), want_h)},
        "conv": {
            "output": (y.detach(), want_y),
            "input grad": (x.grad, layouts.shard(x_full.grad, -1, "zigzag", world, rank)),
        },
        "bytes": (fwd.bytes_sent, bwd.bytes_sent, dict(fwd.calls)),
        "sends": (rank + 1 < world) + (rank > 0),
        "payload": B * C * halo * F64,
    }


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("chunk,kernel", [(4, 4), (3, 4), (5, 2)])
def test_causal_halo_1d(dist_run, world, chunk, kernel):
    results = dist_run(_halo_1d, world, chunk, kernel)
    _assert_pairs([r["halo"] for r in results])
    _assert_pairs([r["conv"] for r in results], exact=False)
    for r in results:  # backward sends each received halo's gradient back: same traffic
        sent = r["sends"] * r["payload"]
        assert r["bytes"] == (sent, sent, {"p2p": r["sends"]} if r["sends"] else {})


def _halo_2d(rows: int, kernel: int) -> dict:
    group, rank, world = _ctx()
    halo, B, C, W = kernel // 2, 2, 3, 5
    torch.manual_seed(0)
    x_full = torch.randn(B, C, world * rows, W, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, 1, kernel, kernel, dtype=torch.float64)
    g_full = torch.randn(B, C, world * rows, W, dtype=torch.float64)
    F.conv2d(x_full, w, padding=halo, groups=C).mul(g_full).sum().backward()

    x = layouts.shard(x_full.detach(), 2, "rows", world, rank).requires_grad_()
    with cp.count_comm() as fwd:
        above, below = cp.row_halo_2d(x, halo, group)
    y = F.conv2d(torch.cat([above, x, below], 2), w, padding=(0, halo), groups=C)
    with cp.count_comm() as bwd:
        (y * layouts.shard(g_full, 2, "rows", world, rank)).sum().backward()

    padded = F.pad(x_full.detach(), (0, 0, halo, halo))  # row p of x is row p + halo here
    top = rank * rows + halo
    with torch.no_grad():
        want_y = layouts.shard(F.conv2d(x_full, w, padding=halo, groups=C), 2, "rows", world, rank)
    return {
        "halo": {"above": (above.detach(), padded[:, :, top - halo : top]),
                 "below": (below.detach(), padded[:, :, top + rows : top + rows + halo])},
        "conv": {
            "output": (y.detach(), want_y),
            "input grad": (x.grad, layouts.shard(x_full.grad, 2, "rows", world, rank)),
        },
        "bytes": (fwd.bytes_sent, bwd.bytes_sent),
        "expected": ((rank > 0) + (rank + 1 < world)) * B * C * halo * W * F64,
    }


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("rows,kernel", [(2, 3), (2, 5), (3, 1)])
def test_row_halo_2d(dist_run, world, rows, kernel):
    results = dist_run(_halo_2d, world, rows, kernel)
    _assert_pairs([r["halo"] for r in results])
    _assert_pairs([r["conv"] for r in results], exact=False)
    for r in results:
        assert r["bytes"] == (r["expected"], r["expected"])


def _block_halo(rows: int, before: int, after: int, wrap: bool) -> dict:
    """`block_halo` along the frames of a 3-D block: routing against the padded (or wrapped) global
    tensor, and the adjoint: with rank r's loss sum(g_r * cat(halo, x_r, halo)), the gradient of
    every global position sums its uses on every rank (as halo and as interior)."""
    group, rank, world = _ctx()
    B, C, W = 2, 3, 4
    total, span = world * rows, rows + before + after
    x_full = _coded(B, C, total, W).requires_grad_()
    g_all = torch.randn(world, B, C, span, W, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    windows = []
    for r in range(world):  # what rank r's block with its halos reads of the global axis
        idx = torch.arange(r * rows - before, r * rows + rows + after)
        inside = ((idx >= 0) & (idx < total)) | torch.tensor(wrap)
        windows.append(x_full.index_select(2, idx % total) * inside.to(torch.float64).view(-1, 1))
    sum((wdw * g).sum() for wdw, g in zip(windows, g_all)).backward()
    x = layouts.shard(x_full.detach(), 2, "rows", world, rank).requires_grad_()
    with cp.count_comm() as fwd:
        halo_b, halo_a = cp.block_halo(x, 2, before, after, group, wrap=wrap)
    with cp.count_comm() as bwd:
        (torch.cat([halo_b, x, halo_a], 2) * g_all[rank]).sum().backward()
    mine = windows[rank].detach()
    return {"halo": {"before": (halo_b.detach(), mine[:, :, :before]),
                     "after": (halo_a.detach(), mine[:, :, before + rows:])},
            "grad": {"input grad": (x.grad, layouts.shard(x_full.grad, 2, "rows", world, rank))},
            "bytes": (fwd.bytes_sent, bwd.bytes_sent)}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("before,after,wrap", [(1, 1, True), (2, 1, True), (2, 2, False), (2, 0, True), (0, 1, True)])
def test_block_halo_routing_and_adjoint(dist_run, world, before, after, wrap):
    """Wrap-around (rank 0 <-> rank P-1, and P = 2 where both neighbours are one rank), uneven and
    one-sided halos on a ring."""
    results = dist_run(_block_halo, world, 2, before, after, wrap)
    _assert_pairs([r["halo"] for r in results])
    _assert_pairs([r["grad"] for r in results], exact=False)
    for rank, r in enumerate(results):
        fwd, bwd = r["bytes"]
        payload = 2 * 3 * 4 * F64  # one position of B x C x W
        if world == 1:
            assert fwd == bwd == 0
            continue
        # forward: the positions this rank's neighbours read of it; backward: the gradients of the
        # positions it read of them, sent back to their owners
        has_prev, has_succ = rank > 0 or wrap, rank + 1 < world or wrap
        sent = (before * has_succ + after * has_prev) * payload
        received = (before * has_prev + after * has_succ) * payload
        assert (fwd, bwd) == (sent, received), (rank, r["bytes"])


def _one_sided_halo() -> None:
    group, rank, world = _ctx()
    cp.block_halo(torch.zeros(1, 1, 4, 2), 2, 2, 0, group)


def test_one_sided_block_halo_without_wrap_is_refused_everywhere(dist_run):
    """Rank 0 would only send (no output to run its backward through): every rank refuses, no hang."""
    errors = dist_run(_one_sided_halo, 2, expect_error=ValueError)
    assert all("needs wrap=True" in str(e) for e in errors)


def test_block_halo_without_wrap_is_not_a_ring(dist_run):
    """Negative twin: without ``wrap`` rank 0 gets zeros before it, not rank P-1's last positions."""
    results = dist_run(_block_halo, 2, 2, 1, 1, False)
    assert not results[0]["halo"]["before"][0].any()
    wrapped = dist_run(_block_halo, 2, 2, 1, 1, True)
    assert not torch.equal(wrapped[0]["halo"]["before"][0], results[0]["halo"]["before"][0])


def test_halos_without_group():
    x = _coded(1, 2, 6)
    h = cp.causal_halo_1d(x, 2, None)
    assert torch.equal(h[:, :, 0], torch.zeros(1, 2, 2)) and torch.equal(h[:, :, 1], x[..., 1:3])
    assert cp.causal_halo_1d(x, 0, None).shape == (1, 2, 2, 0)
    above, below = cp.row_halo_2d(x.view(1, 2, 3, 2), 1, None)
    assert not above.any() and not below.any() and above.shape == (1, 2, 1, 2)


# ------------------------------------------------------------------------------- reductions
def _reductions() -> dict:
    group, rank, world = _ctx()
    src = world - 1
    shape = (3, 4)
    nb = 12 * F64

    def rank_tensors(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(r)  # every rank can rebuild every other rank's input and grad
        return torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)

    xs, gs = zip(*[rank_tensors(r) for r in range(world)])
    g_sum = sum(gs)
    pairs, stats = {}, {}

    x = xs[rank].clone().requires_grad_()
    with cp.count_comm() as s:
        y = cp.all_reduce_sum(x, group)
        (y * gs[rank]).sum().backward()
    pairs["all_reduce_sum"], pairs["all_reduce_sum grad"] = (y.detach(), sum(xs)), (x.grad, g_sum)
    stats["all_reduce"] = (dict(s.by_op), {"all_reduce": 2 * (2 * (world - 1) * nb // world)})

    x = xs[rank].clone().requires_grad_()
    with cp.count_comm() as s:
        y = cp.broadcast_from(x, src, group)
        (y * gs[rank]).sum().backward()
    pairs["broadcast"] = (y.detach(), xs[src])
    pairs["broadcast grad"] = (x.grad, g_sum if rank == src else torch.zeros(shape, dtype=torch.float64))
    stats["broadcast"] = (dict(s.by_op), {"broadcast": (world - 1) * nb if rank == src else 0,
                                          "reduce": 0 if rank == src else nb})

    x = xs[rank].clone().requires_grad_()
    with cp.count_comm() as s:
        y = cp.all_gather_seq(x, 1, group)  # 3, 4 * world
        g = torch.cat(gs, 0).reshape(3, 4 * world)  # any global grad, same on every rank's view
        (y * (rank + 1) * g).sum().backward()
    pairs["all_gather"] = (y.detach(), torch.cat(xs, 1))
    scale = world * (world + 1) / 2  # sum over ranks of (rank + 1)
    pairs["all_gather grad"] = (x.grad, scale * g[:, rank * 4 : (rank + 1) * 4])
    stats["all_gather"] = (dict(s.by_op), 
        {"all_gather": (world - 1) * nb, "reduce_scatter": (world - 1) * nb})

    pairs["group_sum"] = (cp.group_sum(xs[rank], group), sum(xs))
    if world == 1:  # no communication at all: nothing recorded
        stats = {k: (v[0], {}) for k, v in stats.items()}
    return {"pairs": pairs, "stats": stats}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_reductions(dist_run, world):
    results = dist_run(_reductions, world)
    _assert_pairs([r["pairs"] for r in results], exact=False)
    for rank, r in enumerate(results):
        for op, (got, want) in r["stats"].items():
            assert got == want, f"rank {rank}: {op} bytes"


def test_reductions_without_group():
    x = torch.randn(3)
    with cp.count_comm() as stats:
        assert cp.all_reduce_sum(x, None) is x
        assert cp.broadcast_from(x, 0, None) is x
        assert cp.all_gather_seq(x, 0, None) is x
        u = x.view(1, 3, 1)  # [B, C, S]
        assert cp.seq_to_channel(u, None, "zigzag") is u and cp.channel_to_seq(u, None, "rows") is u
    assert stats.bytes_sent == 0 and not stats.calls


# ------------------------------------------------------------------------------- validation
def _bad_call(case: str) -> None:
    group, rank, world = _ctx()
    if case == "channels":
        cp.seq_to_channel(torch.zeros(1, 2 * world + 1, 4), group, "zigzag")
    elif case == "odd_local":
        cp.seq_to_channel(torch.zeros(1, world, 3), group, "zigzag")
    elif case == "global_length":
        cp.channel_to_seq(torch.zeros(1, 1, 2 * world + 2), group, "zigzag")
    elif case == "short_chunk":
        cp.causal_halo_1d(torch.zeros(1, 1, 4), 3, group)
    elif case == "short_rows":
        cp.row_halo_2d(torch.zeros(1, 1, 1, 4), 2, group)
    elif case == "src":
        cp.broadcast_from(torch.zeros(2), world, group)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize(
    "case,words",
    [("channels", "channel count C="), ("odd_local", "S_local=3"), ("global_length", "2*cp_size"),
     ("short_chunk", "shorter than the halo=3"), ("short_rows", "size along dim 2 is 1"), ("src", "src=")],
)
def test_every_rank_raises_before_communicating(dist_run, world, case, words):
    errors = dist_run(_bad_call, world, case, expect_error=ValueError)
    assert all(words in str(e) for e in errors)


def test_count_comm_nests():
    with cp.count_comm() as outer:
        cp.record("all_to_all", 10)
        with cp.count_comm() as inner:
            cp.record("p2p", 5)
    cp.record("p2p", 7)  # outside every counter: dropped
    assert (outer.bytes_sent, dict(outer.by_op)) == (15, {"all_to_all": 10, "p2p": 5})
    assert dict(outer.calls) == {"all_to_all": 1, "p2p": 1}
    assert (inner.bytes_sent, dict(inner.calls)) == (5, {"p2p": 1})


# ------------------------------------------------------------------------------ the harness
def _raise_after(communicate: bool) -> None:
    if communicate:
        cp.all_reduce_sum(torch.ones(2), dist.group.WORLD)
    raise ValueError(f"rank {dist.get_rank()} gives up")


def _rank() -> int:
    return dist.get_rank()


def test_harness_reports_rank_errors_and_recovers(dist_run):
    with pytest.raises(AssertionError, match="rank 1 gives up"):
        dist_run(_raise_after, 2, False)
    assert dist_run(_rank, 2) == [0, 1]  # the pool was rebuilt
    # expect_error demands that nothing was communicated before the error
    with pytest.raises(AssertionError, match="before communicating"):
        dist_run(_raise_after, 2, True, expect_error=ValueError)
    assert [str(e) for e in dist_run(_raise_after, 2, False, expect_error=ValueError)] == [
        "rank 0 gives up", "rank 1 gives up"
    ]
