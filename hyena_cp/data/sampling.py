"""Which samples and positions a rank holds.

Samples: a global batch of ``G`` indices per step, drawn without replacement from a seeded
permutation per epoch. It is a pure function of ``(seed, step)``, so the data position
in a checkpoint is the step and a resumed run reads exactly the batches an uninterrupted
run reads. Each data-parallel replica takes a contiguous ``G / dp`` slice; the CP ranks of
a replica take the SAME slice (vision models get the full image; the LM gets its zigzag
share of every sequence through `cp_shard_tokens`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hyena_cp.parallel.layouts import shard

__all__ = ["GlobalBatchSampler", "dp_slice", "eval_range", "cp_shard_tokens"]


class GlobalBatchSampler:
    """Global batch indices for a step: epoch ``e`` is a permutation seeded by ``(seed, e)``,
    cut into ``num_samples // global_batch_size`` batches (the remainder is dropped)."""

    def __init__(self, *, num_samples: int, global_batch_size: int, seed: int):
        if global_batch_size < 1 or num_samples < global_batch_size:
            raise ValueError(f"global_batch_size={global_batch_size} must be in [1, {num_samples}] "
                             f"(the number of training samples)")
        self.num_samples, self.global_batch_size, self.seed = num_samples, global_batch_size, seed
        self.steps_per_epoch = num_samples // global_batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> Tensor:
        """``[global_batch_size]`` int64 sample indices of global step ``step`` (0-based)."""
        epoch = self.epoch(step)
        if epoch != self._epoch:  # one permutation per epoch, cached
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_samples, generator=gen)
        start = (step % self.steps_per_epoch) * self.global_batch_size
        return self._perm[start:start + self.global_batch_size]


def dp_slice(indices: Tensor, dp_size: int, dp_rank: int) -> Tensor:
    """This replica's contiguous ``len(indices) / dp_size`` of a global batch."""
    if len(indices) % dp_size:
        raise ValueError(f"global batch size {len(indices)} must be divisible by the data-parallel size "
                         f"dp={dp_size}; change train.global_batch_size or the number of processes")
    per = len(indices) // dp_size
    return indices[dp_rank * per:(dp_rank + 1) * per]


def eval_range(num_samples: int, dp_size: int, dp_rank: int) -> range:
    """Contiguous share of an evaluation set for one replica (sizes differ by at most one);
    results are summed over replicas, so every sample counts exactly once."""
    base, extra = divmod(num_samples, dp_size)
    start = dp_rank * base + min(dp_rank, extra)
    return range(start, start + base + (dp_rank < extra))


def cp_shard_tokens(tokens: Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """``[b, S]`` full sequences -> ``[b, S / cp_size]``, this rank's zigzag share (Megatron's
    ``get_batch_on_this_cp_rank`` layout, via the one layout helper)."""
    return shard(tokens, 1, "zigzag", cp_size, cp_rank)
