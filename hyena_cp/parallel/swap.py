"""Sequence <-> channel AllToAll swaps for context parallelism (autograd-correct).

Before the swap each rank holds its local sequence piece (in a layout from `layouts`) of
all C channels; after it, the full sequence in natural order of one channel block
``[rank*C/P, (rank+1)*C/P)``. This lets a global operator (the long FFT convolution) run
on whole sequences for C/P channels, then `channel_to_seq` puts the result back.

One ``all_to_all_single`` per call, through the ``hyena_cp::all_to_all`` custom op
(`traceable`: so ``torch.compile`` traces through it). The equal-split AllToAll permutation
is its own adjoint, so backward is the AllToAll of the gradient; the local chunk
reorderings around it are plain differentiable torch ops.
"""
from __future__ import annotations

from torch import Tensor
from torch.distributed import ProcessGroup

from .groups import group_size
from .layouts import check_divisible, check_layout, chunks_per_rank, from_rank_major, to_rank_major
from .traceable import all_to_all, group_name


def _channel_dim(x: Tensor, channel_dim: int, fn: str) -> int:
    """Normalized ``channel_dim``; the sequence must be the last dim and distinct from it."""
    if x.dim() < 2:
        raise ValueError(
            f"{fn}: input must have a channel dim and a last sequence dim, got shape {tuple(x.shape)}"
        )
    cdim = channel_dim % x.dim()
    if cdim == x.dim() - 1:
        raise ValueError(
            f"{fn}: channel_dim={channel_dim} is the last dim, which holds the sequence; "
            "pass the index of the channel dim"
        )
    return cdim


def seq_to_channel(x: Tensor, group: ProcessGroup | None, layout: str, channel_dim: int = 1) -> Tensor:
    """Sequence-sharded -> channel-sharded: ``[..., C, ..., S_local] -> [..., C/P, ..., S]``.

    ``x`` is this rank's LOCAL sequence piece (sequence in the last dim, in ``layout``) of all
    C channels along ``channel_dim``. Returns the FULL sequence in natural order for this
    rank's channel block ``[rank*C/P, (rank+1)*C/P)``. E.g. ``[B, C, S_local] -> [B, C/P, S]``,
    or ``[B, 3, C, S_local] -> [B, 3, C/P, S]`` with ``channel_dim=2`` (q, k, v swapped
    together, each keeping its own channel block). 2-D row blocks: flatten
    ``[B, C, H_local, W] -> [B, C, H_local*W]`` and use ``layout="rows"``.
    ``group=None`` or size 1: returns ``x`` unchanged, no communication.
    """
    check_layout(layout)
    cdim = _channel_dim(x, channel_dim, "seq_to_channel")
    world = group_size(group)
    if world == 1:
        return x
    channels, s_local = x.shape[cdim], x.shape[-1]
    if channels % world:
        raise ValueError(
            f"seq_to_channel: channel count C={channels} (dim {cdim}) must be divisible by "
            f"cp_size={world}; choose C (or the number of channels swapped) as a multiple of {world}"
        )
    if s_local % chunks_per_rank(layout):
        raise ValueError(
            f"seq_to_channel: local sequence length S_local={s_local} must be divisible by "
            f"{chunks_per_rank(layout)} for the {layout} layout; shard the global sequence with "
            "hyena_cp.parallel.layouts.shard"
        )
    blocks = x.unflatten(cdim, (world, channels // world))  # ..., P, C/P, ..., S_local
    send = blocks.movedim(cdim, 0).contiguous()  # P, ..., C/P, ..., S_local
    recv = all_to_all(send, group_name(group))  # recv[src]: rank src's sequence piece of my channel block
    pieces = recv.movedim(0, -2).flatten(-2)  # ..., C/P, ..., P*S_local (rank-major order)
    return from_rank_major(pieces, -1, layout, world)


def channel_to_seq(x: Tensor, group: ProcessGroup | None, layout: str, channel_dim: int = 1) -> Tensor:
    """Channel-sharded -> sequence-sharded, the inverse of `seq_to_channel`.

    ``x``: ``[..., C/P, ..., S]``, this rank's channel block of the FULL sequence in natural
    order (sequence in the last dim). Returns ``[..., C, ..., S_local]``: all channels of
    this rank's LOCAL sequence piece in ``layout``.
    ``group=None`` or size 1: returns ``x`` unchanged, no communication.
    """
    check_layout(layout)
    cdim = _channel_dim(x, channel_dim, "channel_to_seq")
    world = group_size(group)
    if world == 1:
        return x
    check_divisible(x.shape[-1], layout, world, "channel_to_seq: sequence length S")
    pieces = to_rank_major(x, -1, layout, world).unflatten(-1, (world, -1))  # ..., C/P, ..., P, S_local
    send = pieces.movedim(-2, 0).contiguous()  # P, ..., C/P, ..., S_local
    recv = all_to_all(send, group_name(group))  # recv[src]: channel block src of my sequence piece
    return recv.movedim(0, cdim).flatten(cdim, cdim + 1)  # ..., C, ..., S_local
