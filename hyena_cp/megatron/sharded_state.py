"""megatron-core ``dist_checkpointing`` for hyena_cp's modules: sharded state dicts with TRUE
global offsets, so a checkpoint saved at one tensor-parallel size loads exactly at any other.

Why megatron's defaults are not enough here: ``MegatronModule.sharded_state_dict`` treats every
tensor of a child that is not itself a megatron module as a replica, so the Hyena mixer's
TP-sharded in_proj, short conv, skip ``D`` and out_proj were saved by TP rank 0 alone and
loaded as rank 0's on every TP rank; and ``ColumnParallelLinear.sharded_state_dict`` ignores
``partition_stride``, so it would store a stride-3 weight as if it were cut contiguously.

`tp_sharded_state_dict` places each tensor by its megatron TP attributes
(`hyena_cp.parallel.tp_partition`, the layout every other full <-> TP mapping here uses):

- replica (no attributes): the tensor itself, written once (TP rank 0 of DP x CP rank 0);
- stride 1 on dim d: the full tensor, this rank's block at offset ``tp_rank * local`` on d;
- stride s > 1 on dim d: dim d viewed as ``(s, n)``. The full in_proj weight ``[q; k; v]``
  ``[3C, C_in]`` is stored as ``[3, C, C_in]`` and TP rank t holds ``[:, t*C/T:(t+1)*C/T]`` of
  it, its ``[q_t; k_t; v_t]`` (the short conv ``[3C, 1, K]`` likewise). A
  ``ShardedTensorFactory`` makes the view at save and flattens the loaded tensor back.

The stored shapes do not depend on the TP size, so TP=2 -> TP=1 and TP=1 -> TP=2 reshard in
megatron's loader. Tested in tests/test_megatron_dist_checkpoint.py.
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.distributed import ProcessGroup

from hyena_cp.megatron.compat import ShardedObject, ShardedTensor, ShardedTensorFactory, dp_cp_group_of
from hyena_cp.parallel import group_rank, group_size, tp_partition

__all__ = ["tp_sharded_state_dict"]

Offsets = tuple[tuple[int, int, int], ...]


def tp_sharded_state_dict(module: nn.Module, prefix: str, tp_group: ProcessGroup | None,
                          sharded_offsets: Offsets = (), metadata: dict | None = None) -> dict:
    """megatron's sharded state dict of ``module``'s whole ``state_dict`` (keys ``prefix + name``),
    each tensor placed by its TP partition (see the module docstring). ``sharded_offsets``: axes
    prepended by an enclosing module (megatron's layer axis); ``metadata``: megatron's, read for
    its ``dp_cp_group`` (the replicas of this TP rank)."""
    tp_rank, tp_size = group_rank(tp_group), group_size(tp_group)
    dp_cp_rank = group_rank(dp_cp_group_of(metadata))
    sharded = {}
    for name, value in module.state_dict(prefix="", keep_vars=True).items():
        key = f"{prefix}{name}"
        if not isinstance(value, Tensor):  # megatron's linears keep an `_extra_state` (None)
            sharded[key] = _replicated_object(key, value, sharded_offsets, (0, tp_rank, dp_cp_rank))
            continue
        part = tp_partition(value)
        if part is None:
            sharded[key] = ShardedTensor.from_rank_offsets(key, value, *sharded_offsets,
                                                           replica_id=(0, tp_rank, dp_cp_rank),
                                                           prepend_axis_num=len(sharded_offsets))
        else:
            sharded[key] = _tp_sharded(key, value, part.dim, part.stride, tp_rank, tp_size, sharded_offsets,
                                       (0, 0, dp_cp_rank))
    return sharded


def _tp_sharded(key: str, tensor: Tensor, dim: int, stride: int, tp_rank: int, tp_size: int, offsets: Offsets,
                replica_id: tuple[int, int, int]) -> ShardedTensor | ShardedTensorFactory:
    prepend = len(offsets)
    if stride == 1:
        return ShardedTensor.from_rank_offsets(key, tensor, *offsets, (prepend + dim, tp_rank, tp_size),
                                               replica_id=replica_id, prepend_axis_num=prepend)
    if tensor.shape[dim] % stride:
        raise ValueError(f"{key}: local size {tensor.shape[dim]} of dim {dim} is not divisible by its partition "
                         f"stride {stride}")

    def build(key: str, data: Tensor, replica_id, flattened_range) -> ShardedTensor:
        if flattened_range is not None:  # megatron-core >= 0.16 has no flattened ShardedTensors
            raise ValueError(f"{key}: flattened (distributed-optimizer) ranges are not supported for strided "
                             f"TP weights")
        view = data.unflatten(dim, (stride, data.shape[dim] // stride))  # .., stride, n_local, ..
        return ShardedTensor.from_rank_offsets(key, view, *offsets, (prepend + dim + 1, tp_rank, tp_size),
                                               replica_id=replica_id, prepend_axis_num=prepend)

    def merge(loaded: Tensor) -> Tensor:
        return loaded.flatten(dim, dim + 1)  # .., stride * n_local, .. (this rank's [q_t; k_t; v_t])

    return ShardedTensorFactory(key, tensor, build, merge, replica_id)


def _replicated_object(key: str, obj: object, offsets: Offsets, replica_id: tuple[int, int, int]) -> ShardedObject:
    """A replicated non-tensor entry, one per position of the prepended axes (megatron's layout)."""
    if not offsets:
        return ShardedObject(key, obj, (1,), (0,), replica_id)
    axes = sorted(offsets)
    return ShardedObject(key, obj, tuple(n for _, _, n in axes), tuple(i for _, i, _ in axes), replica_id)
