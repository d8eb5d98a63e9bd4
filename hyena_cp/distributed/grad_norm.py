"""Gradient-norm clipping under tensor parallelism and FSDP: the norm of the FULL gradient on every rank.

``torch.nn.utils.clip_grad_norm_`` on one rank sees only that rank's pieces: its TP shards of
the TP-sharded parameters and, under FSDP, its ``dp_cp`` shard of every gradient. A gradient
is in one of four kinds, by how it is split over TP (megatron's ``tensor_model_parallel``
attribute, `tp_partition`) and over the data-parallel mesh (a ``DTensor`` with a ``Shard``
placement from FSDP; ``Replicate`` from FSDP's replicate, or a plain tensor, is whole)::

    ||g||^2 = sum_TP [ sum_dpcp a  +  b ]  +  sum_dpcp c  +  d

with ``a`` the squared local norm of TP-sharded, FSDP-sharded gradients, ``b`` TP-sharded
but whole over dp_cp, ``c`` TP-replicated and FSDP-sharded, ``d`` whole in both (each
counted once, not ``tp`` or ``dp*cp`` times). At most two scalar all-reduces (``[a, c]``
over the FSDP mesh's group, then ``a + b`` over TP), so every rank gets the same norm and
clips by the same factor. Squares are summed in float64.

Call it after backward: FSDP has reduced the gradients by then (its reduce-scatter, or
all-reduce for ``replicate``, runs in backward).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Shard

from hyena_cp.parallel.groups import group_size
from hyena_cp.parallel.reductions import group_sum
from hyena_cp.parallel.tp_layout import tp_partition

__all__ = ["clip_grad_norm", "grad_norm"]


def _local(grad: Tensor) -> Tensor:
    return grad.to_local() if isinstance(grad, DTensor) else grad


def _fsdp_group(grads: list[Tensor]) -> ProcessGroup | None:
    """The group of the data-parallel mesh the gradients are sharded over (None if none is)."""
    for g in grads:
        if isinstance(g, DTensor) and any(isinstance(p, Shard) for p in g.placements):
            return g.device_mesh.get_group()
    return None


def _is_sharded(grad: Tensor) -> bool:
    return isinstance(grad, DTensor) and any(isinstance(p, Shard) for p in grad.placements)


def _squared_norm(grads: list[Tensor]) -> Tensor:
    if not grads:  # every rank still joins the all-reduces
        return torch.zeros((), dtype=torch.float64)
    return torch.nn.utils.get_total_norm(grads).double().square()


def grad_norm(params: Iterable[nn.Parameter], tp_group: ProcessGroup | None) -> Tensor:
    """Global L2 norm of the gradients of ``params`` (this rank's pieces), the same on every rank.

    Every rank of ``tp_group`` and of the gradients' FSDP mesh must call it (collective when
    they have > 1 rank); parameters without a gradient count as zeros. Plain tensors and
    ``tp_group=None``: ``torch.nn.utils.get_total_norm`` of the local gradients, no communication.
    """
    pairs = [(p, p.grad) for p in params if p.grad is not None]
    grads = [g for _, g in pairs]
    fsdp_group = _fsdp_group(grads)
    if group_size(tp_group) == 1 and fsdp_group is None:
        return torch.nn.utils.get_total_norm([_local(g) for g in grads])
    kinds: dict[tuple[bool, bool], list[Tensor]] = {(t, f): [] for t in (True, False) for f in (True, False)}
    for p, g in pairs:
        kinds[(tp_partition(p) is not None and group_size(tp_group) > 1, _is_sharded(g))].append(_local(g))
    a, b, c, d = (_squared_norm(kinds[k]) for k in ((True, True), (True, False), (False, True), (False, False)))
    a, c = group_sum(torch.stack([a, c]), fsdp_group)  # over dp x cp (one mesh for every sharded gradient)
    total = group_sum(a + b, tp_group) + c + d
    return total.sqrt().to(grads[0].dtype if grads else torch.float32)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float, tp_group: ProcessGroup | None) -> Tensor:
    """Scale the gradients of ``params`` in place so their GLOBAL norm is at most ``max_norm``
    (``torch.nn.utils.clip_grad_norm_`` semantics and formula, ``inf`` = measure only); returns
    the norm before clipping. The same factor on every rank; see `grad_norm`."""
    params = list(params)  # iterated twice
    total = grad_norm(params, tp_group)
    grads = [_local(p.grad) for p in params if p.grad is not None]  # DTensor shards scale in place locally
    if grads and max_norm != float("inf"):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch.nn.utils.clip_grads_with_norm_'s
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total
