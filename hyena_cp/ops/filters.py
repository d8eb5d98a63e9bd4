"""Implicit long filters: positional features -> MLP with sin activations -> decay window.

One filter per *group* (``num_groups`` = Hyena's ``num_heads``); the channels of a group
share it. ``forward(size, groups=slice)`` builds only the requested groups: under context
parallelism a rank slices the output layer's parameters (and decay rates) to its own
groups *before* building, so it never materialises the other ranks' filters.

Positions are normalised by a reference size: the configured maximum (``max_len`` /
``max_grid``) when given, so a shorter sequence gets a prefix of the longer filter (what a
causal LM wants), else the actual size at call time (resolution-relative filters, any
size accepted). Exceeding a configured maximum raises ``ValueError``.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["ImplicitFilter1d", "ImplicitFilter2d"]


class Sin(nn.Module):
    """``sin(freq * x)`` with a learned per-feature frequency (the Hyena filter activation)."""

    def __init__(self, dim: int, freq: float = 1.0):
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), float(freq)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


def fourier_features(t: torch.Tensor, num_bands: int) -> torch.Tensor:
    """``t: [N]`` in (-1, 1) -> ``[N, 1 + 2*num_bands]``: t, sin(pi f t), cos(pi f t), f=1..bands."""
    freqs = torch.arange(1, num_bands + 1, dtype=t.dtype, device=t.device)
    angles = math.pi * t[:, None] * freqs
    return torch.cat([t[:, None], torch.sin(angles), torch.cos(angles)], dim=-1)


def decay_rates(num_groups: int, fast_decay_pct: float, slow_decay_pct: float, target: float) -> torch.Tensor:
    """Per-group decay rates (Hyena's exponential modulation): the window falls to
    ``target`` after ``fast_decay_pct`` .. ``slow_decay_pct`` of the reference size."""
    fast, slow = math.log(1 / target) / fast_decay_pct, math.log(1 / target) / slow_decay_pct
    return torch.linspace(fast, slow, num_groups)


class _ImplicitFilter(nn.Module):
    """Shared MLP of the 1-D and 2-D filters; subclasses supply features and window."""

    def __init__(self, num_groups: int, in_features: int, width: int, depth: int, sin_freq: float,
                 fast_decay_pct: float, slow_decay_pct: float, target: float):
        super().__init__()
        if num_groups < 1 or depth < 1 or width < 1:
            raise ValueError(f"filter needs num_groups, depth, width >= 1; got {num_groups}, {depth}, {width}")
        self.num_groups, self.width, self.depth, self.in_features = num_groups, width, depth, in_features
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else width, width), Sin(width, sin_freq)]
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(width, num_groups)
        # Fixed (not learned) per-group decay, as in Hyena; a buffer so it follows .to().
        self.register_buffer("decay", decay_rates(num_groups, fast_decay_pct, slow_decay_pct, target), persistent=False)

    def _build(self, feats: torch.Tensor, dist: torch.Tensor, groups: slice) -> torch.Tensor:
        """feats ``[N, F]``, dist ``[N]`` (normalised distance from offset 0) -> ``[G_sel, N]``."""
        h = self.hidden(feats)
        k = F.linear(h, self.out.weight[groups], self.out.bias[groups])  # N, G_sel
        window = torch.exp(-dist[None, :] * self.decay[groups, None].to(k.dtype))  # G_sel, N
        return k.t() * window

    def mlp_flops(self, num_positions: int) -> int:
        """Matmul FLOPs (2 per MAC) of building all groups at ``num_positions`` positions."""
        macs = self.in_features * self.width + (self.depth - 1) * self.width**2 + self.width * self.num_groups
        return 2 * num_positions * macs


def _check_size(size: int, maximum: int | None, name: str, what: str) -> float:
    if size < 1:
        raise ValueError(f"{what} must be >= 1, got {size}")
    if maximum is not None and size > maximum:
        raise ValueError(f"{what}={size} exceeds the filter's configured {name}={maximum}; "
                         f"raise {name} in the Hyena config, or set {name}=None for size-relative filters")
    return float(maximum if maximum is not None else size)


class ImplicitFilter1d(_ImplicitFilter):
    """Causal implicit filter ``k: [G, L]``; ``k[:, 0]`` weights the current token."""

    def __init__(self, num_groups: int, *, num_bands: int = 8, width: int = 64, depth: int = 2, sin_freq: float = 1.0,
                 max_len: int | None = None, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5,
                 target: float = 1e-2):
        super().__init__(num_groups, 1 + 2 * num_bands, width, depth, sin_freq, fast_decay_pct, slow_decay_pct, target)
        self.num_bands, self.max_len = num_bands, max_len

    def forward(self, length: int, groups: slice = slice(None), dtype: torch.dtype | None = None) -> torch.Tensor:
        ref = _check_size(length, self.max_len, "max_len", "sequence length")
        t = torch.arange(length, device=self.out.weight.device, dtype=dtype or self.out.weight.dtype) / ref
        return self._build(fourier_features(t, self.num_bands), t, groups)

    def check_size(self, length: int) -> None:
        """Raise ``ValueError`` now (before any collective) if ``length`` is not buildable."""
        _check_size(length, self.max_len, "max_len", "sequence length")

    def flop_count(self, length: int) -> int:
        return self.mlp_flops(length)


class ImplicitFilter2d(_ImplicitFilter):
    """Centred 2-D implicit filter ``k: [G, 2H-1, 2W-1]`` (offset (0,0) at index (H-1, W-1)),
    radial decay window."""

    def __init__(self, num_groups: int, *, num_bands: int = 8, width: int = 64, depth: int = 2, sin_freq: float = 1.0,
                 max_grid: tuple[int, int] | None = None, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5,
                 target: float = 1e-2):
        super().__init__(num_groups, 2 * (1 + 2 * num_bands), width, depth, sin_freq, fast_decay_pct, slow_decay_pct,
                         target)
        self.num_bands = num_bands
        self.max_grid = None if max_grid is None else (int(max_grid[0]), int(max_grid[1]))

    def forward(self, height: int, width: int, groups: slice = slice(None),
                dtype: torch.dtype | None = None) -> torch.Tensor:
        ref_h, ref_w = self._reference_sizes(height, width)
        kw = dict(device=self.out.weight.device, dtype=dtype or self.out.weight.dtype)
        ty = torch.arange(-(height - 1), height, **kw) / ref_h  # 2H-1 offsets
        tx = torch.arange(-(width - 1), width, **kw) / ref_w  # 2W-1 offsets
        gy, gx = torch.meshgrid(ty, tx, indexing="ij")
        gy, gx = gy.reshape(-1), gx.reshape(-1)
        feats = torch.cat([fourier_features(gy, self.num_bands), fourier_features(gx, self.num_bands)], dim=-1)
        k = self._build(feats, torch.sqrt(gy**2 + gx**2), groups)
        return k.reshape(k.shape[0], 2 * height - 1, 2 * width - 1)

    def _reference_sizes(self, height: int, width: int) -> tuple[float, float]:
        max_h, max_w = self.max_grid if self.max_grid is not None else (None, None)
        return (_check_size(height, max_h, "max_grid[0]", "grid height"),
                _check_size(width, max_w, "max_grid[1]", "grid width"))

    def check_size(self, height: int, width: int) -> None:
        """Raise ``ValueError`` now (before any collective) if the grid is not buildable."""
        self._reference_sizes(height, width)

    def flop_count(self, height: int, width: int) -> int:
        return self.mlp_flops((2 * height - 1) * (2 * width - 1))
