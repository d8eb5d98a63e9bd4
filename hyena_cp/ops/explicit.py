"""Explicit finite impulse responses: the filter IS its taps (StripedHyena 2's Hyena-SE and
Hyena-MR operators).

`ExplicitFilter` holds ``h [G, K]`` in time order (``h[g, 0]`` multiplies the current token,
``h[g, j]`` the token j steps back, as every long filter here) and, optionally, a fixed decay
window ``decay [G, K]`` (a buffer, in the ``state_dict``), so the taps are ``h * decay``:

- plain (``decay=None``): the taps of a converted checkpoint, any decay already baked in;
- ``decay="savanna"``: the training parametrization of Savanna's ``ExplicitSingleDecayFilter``
  for Hyena-MR, ``decay[g, n] = exp(-r_g * n / (L_cache - 1))`` with
  ``r = logspace(log_r_min, log_r_max, G / num_decay_repeats)`` (base 10) tiled
  ``num_decay_repeats`` times over the groups, and ``h ~ N(0, 1/L_cache) * 1e-5`` ("small init").
  ``L_cache`` is the training sequence length: the window is a function of ``n / (L_cache - 1)``.
  `baked_taps` gives the plain taps of such a filter (what a checkpoint converter stores).

Being finite, such a filter is applied as a DIRECT causal convolution of K taps, not by FFT:
it advertises ``fir_length = K`` and the operator (`hyena_cp.modules.hyena`) runs it through the
geometry's short-conv path — under context parallelism with a point-to-point halo of the K-1
tokens before each zigzag chunk and no AllToAll.

Protocol (`hyena_cp.ops.filters`): ``reference`` returns 1 (coordinates are integer offsets),
``absolute`` is True (a shorter sequence sees the leading taps), ``forward(grid, groups)`` returns
the taps at the grid's offsets ``[G_sel, K_grid]`` (offsets at or beyond K read 0).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hyena_cp.ops.filters import KernelGrid

__all__ = ["ExplicitFilter", "savanna_decay", "DECAY_PRESETS"]

# Savanna's explicit_filter_decay_preset -> (log_r_min, log_r_max); Evo 2 trains with "weak".
DECAY_PRESETS = {"strong": (0.0, 2.0), "normal": (-1.0, 2.0), "weak": (-2.0, 2.0)}


def savanna_decay(num_groups: int, length: int, L_cache: int, log_r_min: float, log_r_max: float,
                  num_decay_repeats: int = 1) -> torch.Tensor:
    """``[G, length]``: ``exp(-r_g * n / (L_cache - 1))``, ``r`` log-spaced over ``G / num_decay_repeats``
    groups and tiled ``num_decay_repeats`` times (group g uses ``r[g % (G / repeats)]``)."""
    if num_decay_repeats < 1 or num_groups % num_decay_repeats:
        raise ValueError(f"num_decay_repeats={num_decay_repeats} must divide the number of groups {num_groups}")
    if L_cache < 2 or length > L_cache:
        raise ValueError(f"L_cache={L_cache} must be >= 2 and >= the filter length {length} (the window is "
                         f"evaluated at n / (L_cache - 1) for n < length)")
    rates = torch.logspace(log_r_min, log_r_max, num_groups // num_decay_repeats, dtype=torch.float64)
    rates = rates.repeat(num_decay_repeats)  # tiled: g -> rates[g % (G / repeats)]
    t = torch.arange(length, dtype=torch.float64) / (L_cache - 1)
    return torch.exp(-rates[:, None] * t)


class ExplicitFilter(nn.Module):
    """``K`` free taps per group, optionally times a fixed decay window (see the module docstring).

    Args:
        num_groups: filters G (the operator's ``num_heads``; channels of a group share one).
        spatial_dims: must be 1 (a causal sequence).
        length: taps K (7 for Evo 2's SE, 128 for its MR).
        decay: None (plain taps) or ``"savanna"`` (Savanna's fixed exponential window).
        L_cache: with ``decay="savanna"``, the training sequence length the window is scaled by.
        decay_preset: with ``decay="savanna"``, ``"strong"``, ``"normal"`` or ``"weak"`` (log10 of the
            slowest and fastest rates, `DECAY_PRESETS`), or a pair ``(log_r_min, log_r_max)``.
        num_decay_repeats: with ``decay="savanna"``, how many times the rates repeat over the groups.
        init_std: std of the initial taps; None: ``1e-5 / sqrt(L_cache)`` with a decay (Savanna's small
            init), else ``1 / sqrt(length)``.
    """

    def __init__(self, num_groups: int, spatial_dims: int = 1, *, length: int, decay: str | None = None,
                 L_cache: int | None = None, decay_preset: str | Sequence[float] = "weak",
                 num_decay_repeats: int = 1, init_std: float | None = None):
        super().__init__()
        if spatial_dims != 1 or num_groups < 1:
            raise ValueError(f"ExplicitFilter is a causal 1-D FIR: spatial_dims must be 1 (got {spatial_dims}) and "
                             f"num_groups >= 1 (got {num_groups})")
        if length < 1:
            raise ValueError(f"ExplicitFilter length={length} must be >= 1")
        if decay not in (None, "savanna"):
            raise ValueError(f"decay={decay!r} must be None (plain taps) or 'savanna' (fixed exponential window)")
        if (decay is None) != (L_cache is None):
            raise ValueError("L_cache (the training length the window is scaled by) goes with decay='savanna', and "
                             "only with it")
        self.num_groups, self.spatial_dims, self.length = num_groups, 1, int(length)
        if init_std is None:
            init_std = 1e-5 / math.sqrt(L_cache) if decay is not None else 1 / math.sqrt(length)
        self.h = nn.Parameter(torch.randn(num_groups, length) * init_std)
        if decay is None:
            self.decay = None
        else:
            if isinstance(decay_preset, str):
                if decay_preset not in DECAY_PRESETS:
                    raise ValueError(f"decay_preset={decay_preset!r} must be one of {sorted(DECAY_PRESETS)} or a pair "
                                     f"(log_r_min, log_r_max)")
                decay_preset = DECAY_PRESETS[decay_preset]
            log_r_min, log_r_max = (float(v) for v in decay_preset)
            window = savanna_decay(num_groups, length, L_cache, log_r_min, log_r_max, num_decay_repeats)
            self.register_buffer("decay", window.to(torch.get_default_dtype()))

    @property
    def fir_length(self) -> int:
        """Taps K: the operator applies this filter as a direct causal conv of K taps."""
        return self.length

    @property
    def absolute(self) -> bool:
        return True

    def reference(self, size: Sequence[int]) -> tuple[float, ...]:
        """Integer offsets (divisor 1); any sequence length (taps beyond K are zero)."""
        if len(size) != 1 or size[0] < 1:
            raise ValueError(f"ExplicitFilter takes a 1-D size (L,) with L >= 1, got {tuple(size)}")
        return (1.0,)

    def baked_taps(self) -> torch.Tensor:
        """``[G, K]``: the taps with the decay window multiplied in (the plain form's ``h``)."""
        return self.h if self.decay is None else self.h * self.decay.to(self.h.dtype)

    def forward(self, grid: KernelGrid, groups: slice = slice(None)) -> torch.Tensor:
        taps = self.h[groups] if self.decay is None else self.h[groups] * self.decay[groups].to(self.h.dtype)
        offsets = grid.coords[0].round().long()  # integer positions (reference 1)
        inside = (offsets < self.length).to(taps.dtype)
        return taps[:, offsets.clamp(max=self.length - 1)] * inside

    def flop_count(self, taps: int) -> int:
        """Building the taps: one multiply per tap and group with a decay window, else none."""
        return 0 if self.decay is None else taps * self.num_groups
