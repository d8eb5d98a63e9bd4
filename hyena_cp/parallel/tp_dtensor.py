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

FSDP (`stored_view`): a parameter (or optimizer state) that FSDP shards over the ``dp_cp`` mesh
is a ``DTensor`` whose global value is this TP rank's shard. Its stored form is still the
FULL tensor: a DTensor over the 2-D ``(tp, dp_cp)`` mesh (`ParallelGroups.tp_dp_cp_mesh`) with
the TP placement first, so the FSDP chunk is cut from the TP shard, as FSDP cut it. When FSDP
cuts a strided partition along its partition dim (the q/k/v blocks of a 1-D bias or a conv
weight; `fsdp._shard_dim_fn` avoids it where it can), the chunk is no DTensor placement of
the full tensor: such an item is all-gathered over ``dp_cp`` for saving (one tensor's TP shard)
and loaded into a buffer of that size, from which each rank copies its chunk.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .tp_layout import TPPartition

__all__ = ["stored_view", "tp_full_view", "tp_unfold"]


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


def _folded_dim(dim: int, partition: TPPartition) -> int:
    """Where dim ``dim`` of a parameter lands in its folded shape (the stride factor is inserted
    at the partition dim, so later dims shift by one)."""
    return dim + 1 if partition.stride > 1 and dim > partition.dim else dim


def stored_view(value: Tensor, partition: TPPartition | None, tp_mesh: DeviceMesh | None,
                tp_dp_cp_mesh: DeviceMesh | None, *, loading: bool) -> tuple[Tensor, Callable[[], None] | None]:
    """How DCP stores ``value`` (a parameter or optimizer state of a parameter): its piece of
    the FULL tensor (folded by the TP partition's stride), and for loading into a buffer, the
    function that copies the buffer into ``value`` afterwards (None: loaded in place).

    Args:
        value: a plain tensor (this TP rank's shard, or the whole tensor) or FSDP's DTensor over
            the 1-D ``dp_cp`` mesh (``Shard`` or ``Replicate``), whose global value is that.
        partition: the parameter's TP partition (None: replicated over TP; stored as is).
        tp_mesh: the 1-D TP mesh (None for tp == 1).
        tp_dp_cp_mesh: the 2-D ``(tp, dp_cp)`` mesh (None for tp == 1).
        loading: True for a load (gathered items then get a buffer), False for a save.

    Collective (all-gather over ``dp_cp``) when saving an item that cannot be stored in place;
    every rank calls it for the same items in the same order.
    """
    if partition is None:
        return value, None
    if not isinstance(value, DTensor):
        return tp_full_view(value, partition, tp_mesh), None
    (place,) = value.placements
    dim = partition.dim % value.dim()
    if isinstance(place, Replicate):
        return tp_full_view(value.to_local(), partition, tp_mesh), None
    if partition.stride > 1 and place.dim == dim:  # FSDP's chunk mixes the stride blocks
        if not loading:
            return tp_full_view(value.full_tensor(), partition, tp_mesh), None
        buffer = torch.empty(value.shape, dtype=value.dtype, device=value.to_local().device)

        def finish() -> None:  # Replicate -> Shard is a local slice, no communication
            whole = DTensor.from_local(buffer, value.device_mesh, [Replicate()], run_check=False)
            value.to_local().copy_(whole.redistribute(value.device_mesh, value.placements).to_local())

        return tp_full_view(buffer, partition, tp_mesh), finish
    local = tp_full_view(value.to_local(), partition, None)  # folded, this rank's FSDP chunk of its TP shard
    shape = list(value.shape)  # this TP rank's shard (the DTensor's global shape), folded:
    if partition.stride > 1:
        shape[dim:dim + 1] = [partition.stride, shape[dim] // partition.stride]
    fsdp_place = Shard(_folded_dim(place.dim, partition))
    if tp_mesh is None or tp_mesh.size() == 1:
        mesh, placements = value.device_mesh, [fsdp_place]
    else:
        tp_dim = dim + 1 if partition.stride > 1 else dim
        shape[tp_dim] *= tp_mesh.size()
        mesh, placements = tp_dp_cp_mesh, [Shard(tp_dim), fsdp_place]  # TP cuts first, FSDP cuts the TP shard
    shape = torch.Size(shape)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape,
                              stride=_contiguous_strides(shape)), None
