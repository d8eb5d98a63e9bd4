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


def row_halo_2d(x: Tensor, halo: int, group: ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """The ``halo`` grid rows just above and just below this rank's row block.

    ``x: [B, C, H_local, W]`` is the LOCAL block of whole grid rows (rank r holds rows
    ``[r*H_local, (r+1)*H_local)``; any leading dims work). Returns ``(above, below)``, each
    ``[B, C, halo, W]`` in global row order, zeros beyond the top/bottom grid edge.
    """
    if halo < 0:
        raise ValueError(f"row_halo_2d: halo={halo} must be >= 0")
    if x.dim() < 2:
        raise ValueError(f"row_halo_2d: input must be [..., H_local, W], got shape {tuple(x.shape)}")
    rows = x.shape[-2]
    if rows < halo:
        raise ValueError(
            f"row_halo_2d: the shard has H_local={rows} grid rows, fewer than the halo={halo} "
            "(kernel_size // 2); use fewer CP ranks, a taller grid or a smaller kernel"
        )
    if halo == 0:
        empty = x.new_zeros(*x.shape[:-2], 0, x.shape[-1])
        return empty, empty.clone()
    world, rank = group_size(group), group_rank(group)
    top, bottom = x[..., :halo, :], x[..., rows - halo :, :]
    shape = top.shape
    sends, recvs = [], []
    if rank > 0:
        sends.append((rank - 1, top))
        recvs.append((rank - 1, shape))
    if rank + 1 < world:
        sends.append((rank + 1, bottom))
        recvs.append((rank + 1, shape))
    got = _received(sends, recvs, group)
    above = got[rank - 1] if rank > 0 else x.new_zeros(shape)
    below = got[rank + 1] if rank + 1 < world else x.new_zeros(shape)
    return above, below
