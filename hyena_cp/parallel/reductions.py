"""Reductions over a CP group as autograd ops with exact adjoints.

- `all_reduce_sum`: y = sum_r x_r on every rank; adjoint: all_reduce_sum of the grads.
- `broadcast_from`: y = x_src on every rank; adjoint: grads summed onto ``src`` (reduce),
  zero grad elsewhere.
- `all_gather_seq`: y = cat_r x_r along ``dim``; adjoint: reduce-scatter-sum, each rank gets
  the sum over ranks of the grad of its own slice.

Tensor-parallel ops (megatron-core's ``copy_to`` / ``gather_from_tensor_model_parallel_region``,
which allocate on CUDA, so they cannot run on a CPU machine). The output of each is
REPLICATED over the group, with two different meanings of "replicated":

- `copy_to_group`: y = x (identity, x the same on every rank) feeding DIFFERENT work on each
  rank (e.g. the shared filter MLP, of which each TP rank builds its own filters): the grad
  of x is the sum of the ranks' grads (all-reduce in backward).
- `gather_from_group`: y = cat_r x_r feeding the SAME work on every rank (e.g. logits under
  TP, used identically by every TP rank): backward keeps this rank's slice of the (equal)
  grads, no communication.

``group=None`` or size 1: identities (a copy for `all_reduce_sum`/`broadcast_from` is not
made; the input is returned), no communication.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from .comm_stats import nbytes, record
from .groups import group_size

# torch 2.13 renamed the tensor-in/tensor-out collectives (the old names warn); keep both.
_all_gather_tensor = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def _all_reduce(x: Tensor, group: ProcessGroup) -> Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    world = group.size()
    record("all_reduce", 2 * (world - 1) * nbytes(out) // world)
    return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce(grad, ctx.group), None


def all_reduce_sum(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Sum of ``x`` over the ranks of ``group``, on every rank (same shape as ``x``)."""
    if group_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


class _BroadcastFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, src: int, group: ProcessGroup) -> Tensor:
        ctx.src, ctx.group = src, group
        out = x.contiguous().clone()
        dist.broadcast(out, group=group, group_src=src)
        record("broadcast", (group.size() - 1) * nbytes(out) if group.rank() == src else 0)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.contiguous().clone()
        dist.reduce(grad, group=ctx.group, group_dst=ctx.src, op=dist.ReduceOp.SUM)
        is_src = ctx.group.rank() == ctx.src
        record("reduce", 0 if is_src else nbytes(grad))
        return (grad if is_src else torch.zeros_like(grad)), None, None


def broadcast_from(x: Tensor, src: int, group: ProcessGroup | None) -> Tensor:
    """``x`` of rank ``src`` (a rank within ``group``) on every rank.

    Every rank passes a tensor of the same shape and dtype; only ``src``'s values are used,
    and only ``src``'s ``x`` receives gradient (the sum of all ranks' output grads).
    """
    world = group_size(group)
    if not 0 <= src < world:
        raise ValueError(f"broadcast_from: src={src} is not a rank of the CP group of size {world}")
    if world == 1:
        return x
    return _BroadcastFrom.apply(x, src, group)


def _gather(x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
    world = group.size()
    piece = x.movedim(dim, 0).contiguous()  # gather along dim 0, where pieces are contiguous
    out = piece.new_empty((world * piece.shape[0], *piece.shape[1:]))
    _all_gather_tensor(out, piece, group=group)
    record("all_gather", (world - 1) * nbytes(piece))
    return out.movedim(0, dim)


def _reduce_scatter(grad: Tensor, dim: int, group: ProcessGroup) -> Tensor:
    world = group.size()
    full = grad.movedim(dim, 0).contiguous()
    out = full.new_empty((full.shape[0] // world, *full.shape[1:]))
    _reduce_scatter_tensor(out, full, op=dist.ReduceOp.SUM, group=group)
    record("reduce_scatter", (world - 1) * nbytes(out))
    return out.movedim(0, dim)


class _AllGatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


def all_gather_seq(x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
    """Concatenation along ``dim`` of every rank's LOCAL ``x``, in rank order (GLOBAL result).

    ``[..., L_local, ...] -> [..., P*L_local, ...]``; all ranks must pass the same shape. The
    result is in rank-major order: undo a zigzag layout with `layouts.from_rank_major`.
    """
    if group_size(group) == 1:
        return x
    return _AllGatherSeq.apply(x, dim % x.dim(), group)


def group_sum(values: Tensor, group: ProcessGroup | None) -> Tensor:
    """Non-differentiable sum over ranks (metrics, loss logging); ``values`` is not modified."""
    with torch.no_grad():
        return all_reduce_sum(values.detach(), group)



class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce(grad, ctx.group), None


def copy_to_group(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """``x`` itself (the same on every rank), with its gradient summed over ``group`` in backward.

    For a tensor replicated over a group whose ranks use it for disjoint parts of the
    computation: every rank's ``x.grad`` becomes the whole gradient."""
    if group_size(group) == 1:
        return x
    return _CopyToGroup.apply(x, group)


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
        ctx.dim, ctx.group, ctx.size = dim, group, x.shape[dim]
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad.narrow(ctx.dim, ctx.group.rank() * ctx.size, ctx.size).contiguous(), None, None


def gather_from_group(x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
    """Concatenation along ``dim`` of every rank's ``x`` in rank order, used identically by every
    rank afterwards: backward takes this rank's slice of the grad (which every rank holds whole)."""
    if group_size(group) == 1:
        return x
    return _GatherFromGroup.apply(x, dim % x.dim(), group)
