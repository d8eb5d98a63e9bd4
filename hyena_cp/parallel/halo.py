"""Halo exchange for short convolutions on a sequence shard (point-to-point, no all-gather).

Each function returns the neighbouring tokens a rank's shard needs, zeros exactly where
the single-process convolution sees padding (before global position 0, beyond the grid
edges). Gradients flow back to the owners of the halo tokens and are added into their
token gradients (see `p2p.p2p_exchange`).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from .groups import group_rank, group_size
from .p2p import p2p_exchange


def _received(
    sends: list[tuple[int, Tensor]], recvs: list[tuple[int, torch.Size]], group: ProcessGroup | None
) -> dict[int, Tensor]:
    """Run the exchange (if any) and index the received tensors by peer."""
    if group is None or not (sends or recvs):
        return {}
    return dict(zip([p for p, _ in recvs], p2p_exchange(sends, recvs, group)))


def causal_halo_1d(x: Tensor, halo: int, group: ProcessGroup | None) -> Tensor:
    """The ``halo`` tokens preceding each of this rank's two zigzag chunks.

    ``x: [B, C, L_local]`` is the LOCAL zigzag shard (chunks r and 2P-1-r of length
    ``c = L_local/2``; any leading dims work). Returns ``[B, C, 2, halo]``: index 0 holds the
    tokens before chunk r, index 1 those before chunk 2P-1-r, in global order, zeros before
    global position 0. Chunk r's predecessor is rank r-1's first chunk; chunk 2P-1-r's is
    rank r+1's second chunk, except on the last rank where it is the rank's own first chunk
    (a local copy). With one process, chunk 1's halo is the tail of chunk 0.
    """
    if halo < 0:
        raise ValueError(f"causal_halo_1d: halo={halo} must be >= 0")
    length = x.shape[-1]
    if length % 2:
        raise ValueError(
            f"causal_halo_1d: local length L_local={length} must be even (two zigzag chunks); "
            "shard the sequence with hyena_cp.parallel.layouts.shard(..., 'zigzag', ...)"
        )
    c = length // 2
    if c < halo:
        raise ValueError(
            f"causal_halo_1d: zigzag chunk length L_local/2={c} is shorter than the halo={halo} "
            "(kernel_size - 1); use a longer sequence, fewer CP ranks or a shorter kernel"
        )
    if halo == 0:
        return x.new_zeros(*x.shape[:-1], 2, 0)
    world, rank = group_size(group), group_rank(group)
    first_tail, second_tail = x[..., c - halo : c], x[..., length - halo :]
    shape = first_tail.shape
    sends, recvs = [], []
    if rank + 1 < world:  # my chunk r precedes rank r+1's chunk r+1; I need its chunk 2P-2-r
        sends.append((rank + 1, first_tail))
        recvs.append((rank + 1, shape))
    if rank > 0:  # my chunk 2P-1-r precedes rank r-1's chunk 2P-r; I need its chunk r-1
        sends.append((rank - 1, second_tail))
        recvs.append((rank - 1, shape))
    got = _received(sends, recvs, group)
    before_first = got[rank - 1] if rank > 0 else x.new_zeros(shape)
    before_second = got[rank + 1] if rank + 1 < world else first_tail
    return torch.stack([before_first, before_second], dim=-2)


def block_halo(x: Tensor, dim: int, before: int, after: int, group: ProcessGroup | None,
               wrap: bool = False) -> tuple[Tensor, Tensor]:
    """The ``before`` positions just before and the ``after`` just after this rank's block along ``dim``.

    ``x`` is the LOCAL block of a tensor split into P contiguous equal blocks along ``dim``, in rank
    order (the ``"rows"`` layout: rows of a 2-D grid, frames of a 3-D volume). Returns
    ``(before_part, after_part)`` in global order, shaped like ``x`` with ``before`` / ``after``
    positions along ``dim``. Beyond the first and last block: zeros, or with ``wrap`` (a periodic
    axis) the other end of the axis, so rank 0 and rank P-1 are neighbours. A rank sends one
    message to each neighbour (both halves in one when the neighbour before is also the one after:
    P = 2 with ``wrap``).

    A one-sided halo (``after == 0``, a causal axis) without ``wrap`` is refused: rank 0 would only
    send, and a rank that receives nothing has no output through which autograd runs its half of
    the backward (`p2p.p2p_exchange`); a causal axis is laid out in zigzag instead (`causal_halo_1d`).
    """
    if before < 0 or after < 0:
        raise ValueError(f"block_halo: before={before} and after={after} must be >= 0")
    world, rank = group_size(group), group_rank(group)
    if world > 1 and not wrap and (before == 0) != (after == 0):
        raise ValueError(f"block_halo: a one-sided halo (before={before}, after={after}) needs wrap=True; a causal "
                         f"axis is sharded in zigzag (hyena_cp.parallel.causal_halo_1d)")
    dim = dim % x.dim()
    rows = x.shape[dim]
    if rows < max(before, after):
        raise ValueError(
            f"block_halo: the local block's size along dim {dim} is {rows}, fewer than the halo "
            f"{max(before, after)} (the short conv's reach); use fewer CP ranks, a larger size or a smaller kernel"
        )
    head, tail = x.narrow(dim, 0, after), x.narrow(dim, rows - before, before)
    if world == 1 or before + after == 0:
        return (tail, head) if wrap else (torch.zeros_like(tail), torch.zeros_like(head))
    prev = (rank - 1) % world if (rank > 0 or wrap) and after else None  # who reads my head as its "after"
    succ = (rank + 1) % world if (rank + 1 < world or wrap) and before else None  # who reads my tail
    src_before = (rank - 1) % world if (rank > 0 or wrap) and before else None
    src_after = (rank + 1) % world if (rank + 1 < world or wrap) and after else None
    # a message to one peer holds its part as my successor, then as my predecessor, read in that order
    outgoing: dict[int, list[Tensor]] = {}
    incoming: dict[int, list[tuple[str, torch.Size]]] = {}
    if succ is not None:
        outgoing.setdefault(succ, []).append(tail)
    if prev is not None:
        outgoing.setdefault(prev, []).append(head)
    if src_before is not None:
        incoming.setdefault(src_before, []).append(("before", tail.shape))
    if src_after is not None:
        incoming.setdefault(src_after, []).append(("after", head.shape))
    sends = [(peer, torch.cat([t.flatten() for t in parts])) for peer, parts in outgoing.items()]
    recvs = [(peer, (sum(shape.numel() for _, shape in parts),)) for peer, parts in incoming.items()]
    got = _received(sends, recvs, group)
    halves = {"before": torch.zeros_like(tail), "after": torch.zeros_like(head)}
    for peer, parts in incoming.items():
        pieces = got[peer].split([shape.numel() for _, shape in parts])
        for (name, shape), piece in zip(parts, pieces):
            halves[name] = piece.view(shape)
    return halves["before"], halves["after"]


def row_halo_2d(x: Tensor, halo: int, group: ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """The ``halo`` grid rows just above and just below this rank's row block of ``x [..., H_local, W]``
    (zeros beyond the grid's top and bottom): `block_halo` along the rows."""
    if x.dim() < 2:
        raise ValueError(f"row_halo_2d: input must be [..., H_local, W], got shape {tuple(x.shape)}")
    return block_halo(x, -2, halo, halo, group)
