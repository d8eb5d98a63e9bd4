"""Gradient-norm clipping under tensor parallelism: the norm of the FULL gradient on every rank.

``torch.nn.utils.clip_grad_norm_`` on one TP rank's parameters sees only that rank's shards
of the TP-sharded parameters, so every TP rank gets a different norm, clips by a different
factor, and the ranks drift apart from the single-process model. The global L2 norm is

    ||g||^2 = sum over TP ranks of ||g_sharded||^2  +  ||g_replicated||^2

where "sharded" are the parameters with megatron's ``tensor_model_parallel`` attribute
(`tp_partition` is not None: each rank holds a different piece) and "replicated" the rest
(every TP rank holds the same tensor with the same gradient, so it is counted once, not
``tp`` times). One scalar all-reduce over the TP group; the replicated part is added
locally, which keeps the result identical on every TP rank.

Call it after the data/context-parallel gradient reduction (`sync_gradients`): the
gradients are then the same on every rank of a TP shard's ``grad_group``, so the norm
is the same on every rank of the job.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from .groups import group_size
from .reductions import group_sum
from .tp_layout import tp_partition

__all__ = ["clip_grad_norm", "grad_norm"]


def grad_norm(params: Iterable[nn.Parameter], tp_group: ProcessGroup | None) -> Tensor:
    """Global L2 norm of the gradients of ``params`` (this TP rank's), the same on every TP rank.

    Every rank of ``tp_group`` must call it (collective when the group has > 1 rank);
    parameters without a gradient count as zeros. ``tp_group=None`` (or size 1):
    ``torch.nn.utils.get_total_norm`` of the local gradients, no communication.
    """
    params = list(params)  # iterated three times
    grads = [p.grad for p in params if p.grad is not None]
    if group_size(tp_group) == 1:
        return torch.nn.utils.get_total_norm(grads)
    sharded = [p.grad for p in params if p.grad is not None and tp_partition(p) is not None]
    replicated = [p.grad for p in params if p.grad is not None and tp_partition(p) is None]
    # squares in float64: the sum over ranks of squared norms then loses nothing before the sqrt
    total = group_sum(_squared_norm(sharded), tp_group) + _squared_norm(replicated)
    return total.sqrt().to(grads[0].dtype if grads else torch.float32)


def _squared_norm(grads: list[Tensor]) -> Tensor:
    if not grads:  # every TP rank still joins the all-reduce
        return torch.zeros((), dtype=torch.float64)
    return torch.nn.utils.get_total_norm(grads).double().square()


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float, tp_group: ProcessGroup | None) -> Tensor:
    """Scale the gradients of ``params`` in place so their GLOBAL norm is at most ``max_norm``
    (``torch.nn.utils.clip_grad_norm_`` semantics, ``inf`` = measure only); returns the norm
    before clipping. The same factor on every TP rank; see `grad_norm`."""
    params = list(params)  # iterated twice
    total = grad_norm(params, tp_group)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
