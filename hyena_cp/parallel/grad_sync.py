"""Gradient reduction after backward: one bucketed all-reduce over the ``dp x cp`` ranks of
this rank's TP shard.

DESIGN.md's invariant is "sum over CP, average over DP". Each rank's loss is its share
(the CP shares of one replica add up to that replica's loss), so a SUM over the ``dp * cp``
ranks divided by ``dp`` gives exactly that, in one collective instead of two.

Under tensor parallelism the group is the ``dp * cp`` ranks that share this rank's TP rank
(`ParallelGroups.grad_group`, megatron's ``get_data_parallel_group(with_context_parallel=True)``):
they hold the same shard of every TP-sharded parameter, so their gradients add up. Nothing
is reduced over TP: a TP-sharded parameter's shards are different tensors, and a replicated
one already has the whole gradient on every TP rank (the TP layers' backward all-reduces
their input gradient). All ranks of the group hold the same parameter list (same model,
same TP rank), so the buckets line up.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from .comm_stats import nbytes, record
from .groups import group_size

__all__ = ["sync_gradients"]

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size: few calls, bounded extra memory


def _buckets(grads: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive gradients of one dtype and device, up to ``bucket_bytes`` each (at least one)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        same_kind = out and out[-1][0].dtype == g.dtype and out[-1][0].device == g.device
        if not same_kind or size + nbytes(g) > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(g)
        size += nbytes(g)
    return out


def sync_gradients(params: Iterable[nn.Parameter], group: ProcessGroup | None, divide_by: int,
                   bucket_bytes: int = BUCKET_BYTES) -> None:
    """``p.grad = sum over group of p.grad / divide_by`` for every parameter, in place.

    A parameter without a gradient (unused this step on this rank) contributes zeros, so
    every rank all-reduces the same buckets in the same order. All ranks must pass the same
    parameters in the same order. ``group=None``: only the division (no communication).
    """
    if divide_by < 1:
        raise ValueError(f"divide_by={divide_by} must be >= 1 (the data-parallel size)")
    grads = []
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if group_size(group) == 1:
        if divide_by > 1:
            torch._foreach_div_(grads, divide_by)
        return
    world = group_size(group)
    for bucket in _buckets(grads, bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket])  # [sum of numels]
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        record("all_reduce", 2 * (world - 1) * nbytes(flat) // world)
        if divide_by > 1:
            flat.div_(divide_by)
        for g, piece in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(piece.view_as(g))
