"""FLOP formulas shared by every ``flop_count`` (one place, so models and benchmarks agree).

Conventions (per *sample*, i.e. batch size 1, over the global sequence even under CP):
- matmuls and convolutions: 2 FLOPs per multiply-accumulate, bias adds not counted —
  the same convention as ``torch.utils.flop_counter.FlopCounterMode``, which the tests hold
  these terms against;
- a real FFT (rfft or irfft) of N points: 2.5 * N * log2(N);
- a complex pointwise product: 6 FLOPs per complex element;
- elementwise gating/skip terms are counted; norms and activations are not (as in
  FlopCounterMode and fvcore);
- training = 3 x forward (backward costs two forwards).
"""
from __future__ import annotations

import math

__all__ = ["linear", "attention", "depthwise_conv", "real_fft", "fft_conv", "train_multiplier", "total"]


def linear(tokens: int, in_features: int, out_features: int) -> int:
    return 2 * tokens * in_features * out_features


def attention(queries: int, keys: int, dim: int) -> int:
    """Softmax attention core: ``Q K^T`` and ``A V``, each ``queries * keys * dim`` MACs summed
    over heads (``dim`` = heads * head_dim); softmax and masking are not counted."""
    return 2 * 2 * queries * keys * dim


def depthwise_conv(tokens: int, channels: int, kernel_numel: int) -> int:
    """Depthwise conv with ``kernel_numel`` taps (K in 1-D, K*K in 2-D) per output token."""
    return 2 * tokens * channels * kernel_numel


def real_fft(n: int) -> float:
    return 2.5 * n * math.log2(n) if n > 1 else 0.0


def fft_conv(channels: int, groups: int, fft_numel: int) -> float:
    """FFT conv of ``channels`` signals padded to ``fft_numel`` points (2L or 2H*2W) with
    ``groups`` shared filters: input rfft + irfft per channel, one filter rfft per group,
    and a complex product on the half spectrum per channel."""
    half_spectrum = fft_numel // 2 + 1
    return channels * (2 * real_fft(fft_numel) + 6 * half_spectrum) + groups * real_fft(fft_numel)


def train_multiplier(inference: bool) -> int:
    return 1 if inference else 3


def total(parts: dict[str, float], inference: bool) -> int:
    """Sum a forward breakdown and scale it for training."""
    return int(round(sum(parts.values()))) * train_multiplier(inference)
