"""Embedded-default data sets (no downloads) and their sharding over data- and context-parallel ranks.

- `load_digits_splits`: scikit-learn's handwritten digits, upsampled, train/validation split.
- `load_stdlib_text`: byte-level text made of the Python standard library's own sources.
- `GlobalBatchSampler`, `dp_slice`, `eval_range`, `cp_shard_tokens`: which samples and
  which positions this rank holds.
"""
from __future__ import annotations

from .digits import ImageSplits, load_digits_splits
from .sampling import GlobalBatchSampler, cp_shard_tokens, dp_slice, eval_range
from .stdlib_text import TokenSplits, load_stdlib_text

__all__ = ["GlobalBatchSampler", "ImageSplits", "TokenSplits", "cp_shard_tokens", "dp_slice", "eval_range",
           "load_digits_splits", "load_stdlib_text"]
