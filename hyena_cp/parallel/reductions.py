"""Reductions over a CP group as autograd ops with exact adjoints (their collectives are the
custom ops of `traceable`, so ``torch.compile`` traces through them).

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
from torch import Tensor
from torch.distributed import ProcessGroup

from .groups import group_size
from .traceable import (all_gather_op, all_reduce_max_op, all_reduce_sum_op, broadcast_op, group_name,
                        reduce_scatter_op, reduce_sum_op)

class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group_name = group_name(group)
        return all_reduce_sum_op(x, ctx.group_name)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return all_reduce_sum_op(grad, ctx.group_name), None


def all_reduce_sum(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Sum of ``x`` over the ranks of ``group``, on every rank (same shape as ``x``)."""
    if group_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


class _BroadcastFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, src: int, group: ProcessGroup) -> Tensor:
        ctx.src, ctx.group_name = src, group_name(group)
        return broadcast_op(x, src, ctx.group_name)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return reduce_sum_op(grad, ctx.src, ctx.group_name), None, None


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


def _gather(x: Tensor, dim: int, name: str) -> Tensor:
    # gather along dim 0, where pieces are contiguous
    return all_gather_op(x.movedim(dim, 0), name).movedim(0, dim)


def _reduce_scatter(grad: Tensor, dim: int, name: str) -> Tensor:
    return reduce_scatter_op(grad.movedim(dim, 0), name).movedim(0, dim)


class _AllGatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
        ctx.dim, ctx.group_name = dim, group_name(group)
        return _gather(x, dim, ctx.group_name)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _reduce_scatter(grad, ctx.dim, ctx.group_name), None, None


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


def group_max(values: Tensor, group: ProcessGroup | None) -> Tensor:
    """Non-differentiable elementwise maximum over ranks (a softmax's shift); ``values`` is not
    modified (returned as is for one process)."""
    if group_size(group) == 1:
        return values
    return all_reduce_max_op(values.detach(), group_name(group))



class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group_name = group_name(group)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return all_reduce_sum_op(grad, ctx.group_name), None


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
        ctx.dim, ctx.rank, ctx.size = dim, group.rank(), x.shape[dim]
        return _gather(x, dim, group_name(group))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size).contiguous(), None, None


def gather_from_group(x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
    """Concatenation along ``dim`` of every rank's ``x`` in rank order, used identically by every
    rank afterwards: backward takes this rank's slice of the grad (which every rank holds whole)."""
    if group_size(group) == 1:
        return x
    return _GatherFromGroup.apply(x, dim % x.dim(), group)
