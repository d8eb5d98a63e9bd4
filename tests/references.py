"""Direct (non-FFT) float64 references, one per piece of math, used by the tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def direct_causal_conv1d(u: torch.Tensor, k: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """``u [B, C, L]``, ``k [C, L]``: y[t] = sum_{s<=t} k[t-s] u[s] (+ d u) by F.conv1d with full padding."""
    seqlen = u.shape[-1]
    y = F.conv1d(F.pad(u, (seqlen - 1, 0)), k.flip(-1).unsqueeze(1), groups=u.shape[1])
    return y if d is None else y + u * d[:, None]


def direct_conv2d_centered(u: torch.Tensor, k: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """``u [B, C, H, W]``, ``k [C, 2H-1, 2W-1]`` centred: y[i,j] = sum k[i-m+H-1, j-n+W-1] u[m,n] (+ d u)."""
    h, w = u.shape[-2:]
    y = F.conv2d(u, k.flip(-2, -1).unsqueeze(1), padding=(h - 1, w - 1), groups=u.shape[1])
    return y if d is None else y + u * d[:, None, None]


def expand_groups(k: torch.Tensor, channels: int) -> torch.Tensor:
    """``[G, ...]`` group filters -> ``[channels, ...]``: channel c uses group c // (channels/G)."""
    return k.repeat_interleave(channels // k.shape[0], dim=0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
