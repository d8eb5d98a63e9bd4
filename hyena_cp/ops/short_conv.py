"""Short depthwise convolutions (pure math, no process groups).

Context parallelism hands these ops the neighbouring tokens that a shard needs (its halo)
as explicit tensors; without a halo they see zeros, exactly where the single-process conv
sees its zero padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_depthwise_conv1d", "depthwise_conv2d_same"]


def causal_depthwise_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    left_context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal depthwise conv: ``y[t] = sum_j weight[:, j] * x[t - (K-1) + j] + bias``.

    Args:
        x: ``[N, C, L]``.
        weight: ``[C, K]``; ``weight[:, -1]`` multiplies the current token.
        bias: ``[C]`` or None.
        left_context: ``[N, C, K-1]`` the K-1 tokens preceding ``x`` (a halo), or None
            for zeros (the start of the sequence).

    Returns:
        ``[N, C, L]``.
    """
    channels, kernel = weight.shape
    if left_context is None:
        padded = F.pad(x, (kernel - 1, 0))
    else:
        padded = torch.cat([left_context.to(x.dtype), x], dim=-1)
    return F.conv1d(padded, weight.unsqueeze(1), bias, groups=channels)


def depthwise_conv2d_same(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    rows_above: torch.Tensor | None = None,
    rows_below: torch.Tensor | None = None,
) -> torch.Tensor:
    """"Same" depthwise K x K conv (K odd) with zero padding, halo rows optional.

    Args:
        x: ``[B, C, H, W]`` (a block of rows of the global grid, or the whole grid).
        weight: ``[C, K, K]``.
        bias: ``[C]`` or None.
        rows_above, rows_below: ``[B, C, K//2, W]`` the grid rows just outside this block
            (a halo), or None for zeros (the grid edge).

    Returns:
        ``[B, C, H, W]``.
    """
    channels, kernel, _ = weight.shape
    if kernel % 2 != 1:
        raise ValueError(f"depthwise_conv2d_same needs an odd kernel size, got K={kernel}")
    pad = kernel // 2
    if rows_above is None and rows_below is None:
        padded = F.pad(x, (pad, pad, pad, pad))
    else:
        zeros = x.new_zeros(x.shape[0], x.shape[1], pad, x.shape[3])
        above = zeros if rows_above is None else rows_above.to(x.dtype)
        below = zeros if rows_below is None else rows_below.to(x.dtype)
        padded = F.pad(torch.cat([above, x, below], dim=2), (pad, pad, 0, 0))
    return F.conv2d(padded, weight.unsqueeze(1), bias, groups=channels)
