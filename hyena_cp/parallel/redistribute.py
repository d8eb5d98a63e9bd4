"""Move tokens between two row-block layouts: one exact-adjoint gather across ranks.

Both the input and the output are GLOBAL sequences cut into P equal contiguous blocks in
rank order (the "rows" layout); each rank holds its own block. A global ``source`` map
says where every output token comes from::

    out[j] = inp[source[j]]   if source[j] >= 0
    out[j] = 0                 if source[j] <  0

A token may feed several outputs, or none. The vision models use this for 2x2 patch
merging (a new row needs two old rows that may live on another rank) and to carry the
CLS/register row, which lives at the bottom of the grid, to the rank that holds it at the
next stage.

Forward: each rank gathers the tokens it sends, one ``all_to_all_single`` with uneven
splits, and places what it received. Backward is the reverse move: the same AllToAll with
the splits swapped, then the gradients of tokens sent more than once are added up
(``index_select``'s adjoint). Only the AllToAll is a custom autograd op; the gather and the
placement are ordinary differentiable torch ops.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from .groups import group_rank, group_size
from .traceable import all_to_all_uneven_op, group_name

__all__ = ["redistribute"]


class _AllToAllUneven(torch.autograd.Function):
    """An uneven AllToAll (`traceable.all_to_all_uneven_op`); its adjoint is the same exchange
    with the splits swapped."""

    @staticmethod
    def forward(ctx, x: Tensor, send_counts: list[int], recv_counts: list[int], group: ProcessGroup) -> Tensor:
        ctx.send_counts, ctx.recv_counts, ctx.group_name = send_counts, recv_counts, group_name(group)
        return all_to_all_uneven_op(x, send_counts, recv_counts, ctx.group_name)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return all_to_all_uneven_op(grad, ctx.recv_counts, ctx.send_counts, ctx.group_name), None, None, None


def _check(x: Tensor, dim: int, source: Tensor, world: int) -> None:
    """Raise ``ValueError`` (identically on every rank, before any communication)."""
    if source.dim() != 1 or source.dtype != torch.long:
        raise ValueError(f"redistribute: source must be a 1-D int64 tensor of global indices, got "
                         f"{source.dtype} of shape {tuple(source.shape)}")
    if source.numel() % world:
        raise ValueError(f"redistribute: the output length {source.numel()} must be divisible by the "
                         f"cp_group size {world}; pad the output layout to whole blocks")
    n_in = x.shape[dim] * world
    if source.numel() and int(source.max()) >= n_in:
        raise ValueError(f"redistribute: source index {int(source.max())} is outside the global input of "
                         f"{n_in} tokens ({x.shape[dim]} per rank x {world} ranks)")


def redistribute(x: Tensor, source: Tensor, group: ProcessGroup | None, dim: int = 1) -> Tensor:
    """This rank's block of ``out[j] = inp[source[j]]`` (zeros where ``source[j] < 0``).

    Args:
        x: this rank's LOCAL block ``[..., N_in / P, ...]`` (along ``dim``) of the GLOBAL input
            of ``N_in`` tokens; rank r holds tokens ``[r*N_in/P, (r+1)*N_in/P)``.
        source: ``[N_out]`` int64 GLOBAL map, identical on every rank (``N_out % P == 0``).
        group: the CP group; None or size 1 is a local gather, no communication.
        dim: the token dimension of ``x``.

    Returns:
        This rank's LOCAL block ``[..., N_out / P, ...]`` of the GLOBAL output.
    """
    world, rank = group_size(group), group_rank(group)
    dim = dim % x.dim()
    _check(x, dim, source, world)
    # The routing plan is integer bookkeeping on the host (``source`` as given, typically
    # CPU); only the two index vectors go to the tokens' device, so no device syncs.
    source, device = source.cpu(), x.device
    n_in, n_out = x.shape[dim], source.numel() // world
    tokens = x.movedim(dim, 0)  # N_in/P, ... (tokens first: the AllToAll splits rows)
    local_src = source[rank * n_out:(rank + 1) * n_out]
    owner = torch.where(source >= 0, source // n_in, -1)  # rank holding each output's input token
    dest = torch.arange(source.numel()) // n_out  # rank holding each output
    if world == 1 or not ((owner >= 0) & (owner != dest)).any():  # same answer on every rank
        keep = local_src >= 0
        index = torch.where(keep, local_src - rank * n_in, 0)
        return _local_gather(tokens, index.to(device), keep.to(device)).movedim(0, dim)
    # Outputs in increasing global order are grouped by destination rank (blocks are
    # contiguous), so the sends need no sorting; the receiver sorts its outputs by source
    # rank, then position, which is the order the AllToAll delivers them in.
    mine = owner == rank
    send_idx = source[mine] - rank * n_in
    send_counts = torch.bincount(dest[mine], minlength=world).tolist()
    local_owner = owner[rank * n_out:(rank + 1) * n_out]
    here = local_owner >= 0
    recv_pos = torch.nonzero(here).squeeze(1)
    recv_pos = recv_pos[torch.argsort(local_owner[here] * n_out + recv_pos)]
    recv_counts = torch.bincount(local_owner[here], minlength=world).tolist()
    sent = tokens.index_select(0, send_idx.to(device))
    received = _AllToAllUneven.apply(sent, send_counts, recv_counts, group)
    out = tokens.new_zeros((n_out, *tokens.shape[1:])).index_copy(0, recv_pos.to(device), received)
    return out.movedim(0, dim)


def _local_gather(tokens: Tensor, index: Tensor, keep: Tensor) -> Tensor:
    """``tokens[index]`` where ``keep``, zeros elsewhere (tokens along dim 0)."""
    picked = tokens.index_select(0, index)
    return torch.where(keep.view(-1, *[1] * (tokens.dim() - 1)), picked, 0)
