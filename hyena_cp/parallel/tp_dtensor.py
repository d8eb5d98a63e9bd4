"""TP shards as pieces of their FULL tensor (DTensors over the TP mesh), for checkpoints.

``torch.distributed.checkpoint`` treats tensors saved under one key by several ranks as
replicas and writes one copy, so TP shards saved under their parameter's name would
collide. `tp_full_view` instead presents a TP rank's shard as its piece of the FULL
(logical, single-process) tensor: a ``DTensor`` with a ``Shard`` placement on the TP mesh,
so DCP stores the full tensor once, in chunks, and reads any other TP size's chunks back
(resharding).

A strided partition (`tp_layout`: the full dim is ``stride * tp * n`` long and TP rank t
holds blocks ``t, t + tp, ...``) is not one contiguous chunk of the full dim, so the dim is
first viewed as ``[..., stride, tp * n, ...]``: there, rank t's piece is the contiguous
chunk t of the second factor, a plain ``Shard(dim + 1)``. The stored ("folded") shape
``[..., stride, full / stride, ...]`` depends on the stride but not on the TP size, so one
checkpoint reads back at every TP size; `tp_unfold` turns it into the parameter's own
layout. Stride 1 stores the full tensor in its own shape.

No communication: the views share storage with the local tensor (loading writes through
them in place) and the global shape is computed, not gathered.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .tp_layout import TPPartition

__all__ = ["tp_full_view", "tp_unfold"]


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def tp_full_view(local: Tensor, partition: TPPartition, mesh: DeviceMesh | None) -> Tensor:
    """This TP rank's shard ``local`` as its piece of the FULL tensor, in the stored (folded) shape.

    ``mesh``: the 1-D TP mesh (`ParallelGroups.tp_mesh`), or None for one TP rank, where the
    result is a plain view of ``local`` (which then IS the full tensor). Shares storage with
    ``local``."""
    dim = partition.dim % local.dim()
    if local.shape[dim] % partition.stride:
        raise ValueError(f"local size {local.shape[dim]} of dim {dim} is not divisible by the partition stride "
                         f"{partition.stride}")
    folded = local if partition.stride == 1 else local.unflatten(dim, (partition.stride, -1))
    if mesh is None or mesh.size() == 1:
        return folded
    shard_dim = dim if partition.stride == 1 else dim + 1
    shape = list(folded.shape)
    shape[shard_dim] *= mesh.size()
    shape = torch.Size(shape)
    return DTensor.from_local(folded, mesh, [Shard(shard_dim)], run_check=False, shape=shape,
                              stride=_contiguous_strides(shape))


def tp_unfold(stored: Tensor, partition: TPPartition) -> Tensor:
    """The full tensor in its own layout ``[..., full, ...]`` from its stored (folded) form
    (a plain tensor, e.g. read in one process). Stride 1: ``stored`` itself."""
    if partition.stride == 1:
        return stored
    dim = partition.dim % (stored.dim() - 1)
    return stored.flatten(dim, dim + 1)
