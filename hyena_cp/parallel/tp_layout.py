"""Tensor-parallel partitions: which part of a FULL parameter a TP rank holds.

Pure tensor reordering, no communication (the TP counterpart of `layouts`). A TP-sharded
parameter follows megatron-core's convention, three attributes set on the tensor by
``tensor_parallel.set_tensor_model_parallel_attributes``:

- ``tensor_model_parallel``: True when the parameter is split over the TP group (absent or
  False: every TP rank holds the whole tensor, a replica);
- ``partition_dim``: the split dimension;
- ``partition_stride``: the full dimension is cut into ``stride * world`` equal blocks and
  rank t holds blocks ``t, t + world, t + 2 * world, ...`` concatenated. Stride 1 is a plain
  contiguous split; stride 3 is how a ``[q; k; v]`` projection keeps matching q, k and v
  channel blocks together on one rank (rank t holds ``[q_t; k_t; v_t]``).

Megatron's ``ColumnParallelLinear`` / ``RowParallelLinear`` set these on their weights (and
the column-parallel bias); `hyena_cp.megatron` sets them on the Hyena mixer's own
per-channel parameters. Everything that moves between full and TP-sharded tensors (parity
tests, checkpoints) goes through `tp_partition`, `shard_tp` and `unshard_tp`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["TPPartition", "shard_tp", "tp_partition", "unshard_tp"]


class TPPartition(NamedTuple):
    dim: int
    stride: int


def tp_partition(param: Tensor) -> TPPartition | None:
    """How ``param`` is split over the TP group (megatron's attributes), or None for a replica."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return TPPartition(int(param.partition_dim), int(getattr(param, "partition_stride", 1)))


def _check(size: int, dim: int, stride: int, world: int) -> None:
    if stride < 1 or world < 1 or size % (stride * world):
        raise ValueError(f"size {size} of dim {dim} must be divisible by stride*tp_size={stride}*{world} "
                         f"to be split over tensor parallelism")


def shard_tp(full: Tensor, dim: int, stride: int, world: int, rank: int) -> Tensor:
    """TP rank ``rank``'s piece of the FULL tensor ``full`` (a contiguous copy)."""
    dim = dim % full.dim()
    _check(full.shape[dim], dim, stride, world)
    blocks = full.unflatten(dim, (stride, world, full.shape[dim] // (stride * world)))  # .., stride, world, n, ..
    return blocks.select(dim + 1, rank).flatten(dim, dim + 1).contiguous()


def unshard_tp(pieces: Sequence[Tensor], dim: int, stride: int) -> Tensor:
    """The FULL tensor from every TP rank's piece, given in TP-rank order (inverse of `shard_tp`)."""
    if not pieces:
        raise ValueError("unshard_tp needs at least one TP piece")
    world, dim = len(pieces), dim % pieces[0].dim()
    local = pieces[0].shape[dim]
    if local % stride:
        raise ValueError(f"local size {local} of dim {dim} is not divisible by partition stride {stride}")
    per_rank = [p.unflatten(dim, (stride, local // stride)) for p in pieces]  # .., stride, n, ..
    return torch.stack(per_rank, dim=dim + 1).flatten(dim, dim + 2)  # .., stride, world, n, .. -> full
