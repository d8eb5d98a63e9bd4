"""Windows multiplied into a long kernel, ``k[g, o] * mask[g, o]``, evaluated on the generator's
coordinates ``t`` (`hyena_cp.ops.filters.KernelGrid`). Their parameters are in the ``state_dict``
(buffers when fixed, parameters when learned); none is a hidden setting.

- `ExponentialMask`: Hyena's decay ``exp(-r_g |t|)``, Euclidean distance over the axes, rates
  spread over the groups from ``fast_decay_pct`` to ``slow_decay_pct`` of the reference size.
- `AxisExponentialMask`: ``exp(-sum_a |w_ag| |t_a|)``, one learned rate per axis and group (a
  product of 1-D windows).
- `GaussianMask`: ``exp(-1/2 sum_a t_a^2 / σ_ag^2)``, learned widths per axis and group, kept in
  ``[min_std, max_std]``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hyena_cp.ops.filters import KernelGrid, decay_rates

__all__ = ["ExponentialMask", "AxisExponentialMask", "GaussianMask", "gaussian_std_bounds"]


def _check(num_groups: int, spatial_dims: int, what: str) -> None:
    if num_groups < 1 or spatial_dims not in (1, 2, 3):
        raise ValueError(f"{what} needs num_groups >= 1 and spatial_dims in (1, 2, 3); got {num_groups}, {spatial_dims}")


def _stack(grid: KernelGrid) -> torch.Tensor:
    """``[D, N]``: the coordinate of every tap along every axis."""
    return torch.stack(grid.mesh())


class ExponentialMask(nn.Module):
    """Hyena's decay window ``exp(-rate_g * r)`` with ``r`` the tap's Euclidean distance from offset 0
    (in 1-D ``|t|``). The rates span `decay_rates`: the fastest group falls to ``target`` at
    ``fast_decay_pct`` of the reference size, the slowest at ``slow_decay_pct``. A buffer (fixed, as in
    Hyena) or, with ``learnable``, a parameter."""

    def __init__(self, num_groups: int, spatial_dims: int, *, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5,
                 target: float = 1e-2, learnable: bool = False):
        super().__init__()
        _check(num_groups, spatial_dims, "ExponentialMask")
        if not (0 < target < 1 and fast_decay_pct > 0 and slow_decay_pct > 0):
            raise ValueError(f"ExponentialMask needs 0 < target < 1 and positive decay percentages; got target={target}, "
                             f"fast_decay_pct={fast_decay_pct}, slow_decay_pct={slow_decay_pct}")
        self.num_groups, self.spatial_dims = num_groups, spatial_dims
        rates = decay_rates(num_groups, fast_decay_pct, slow_decay_pct, target)
        if learnable:
            self.decay = nn.Parameter(rates)
        else:
            self.register_buffer("decay", rates)

    def forward(self, grid: KernelGrid, groups: slice = slice(None)) -> torch.Tensor:
        t = _stack(grid)
        r = t[0].abs() if t.shape[0] == 1 else torch.sqrt((t * t).sum(0))
        return torch.exp(-self.decay[groups, None].to(r.dtype) * r).reshape(-1, *grid.shape)


class AxisExponentialMask(nn.Module):
    """``exp(-sum_a |t_a| |w_ag|)``: learned rates ``decay [D, G]``, each axis's row initialised to
    ``linspace(slow, fast, G) / D`` (group 0 slowest)."""

    def __init__(self, num_groups: int, spatial_dims: int, *, slow: float = 2.3, fast: float = 13.81):
        super().__init__()
        _check(num_groups, spatial_dims, "AxisExponentialMask")
        self.num_groups, self.spatial_dims = num_groups, spatial_dims
        self.decay = nn.Parameter(torch.linspace(slow, fast, num_groups).repeat(spatial_dims, 1) / spatial_dims)

    def forward(self, grid: KernelGrid, groups: slice = slice(None)) -> torch.Tensor:
        t = _stack(grid).abs()  # D, N
        rates = self.decay[:, groups].abs().to(t.dtype)  # D, G_sel
        return torch.exp(-(rates.t() @ t)).reshape(-1, *grid.shape)


def _std_for(attenuation: float, position: float) -> float:
    """The σ at which ``exp(-x^2 / 2σ^2)`` equals ``attenuation`` at ``x = position``."""
    return position * math.sqrt(-1.0 / (2.0 * math.log(attenuation)))


def gaussian_std_bounds(grid_step: float, min_attenuation_at_step: float = 0.1,
                        max_attenuation_at_limit: float = 0.95) -> tuple[float, float]:
    """``(min_std, max_std)``: the narrowest window still at ``min_attenuation_at_step`` one grid step
    away, the widest at ``max_attenuation_at_limit`` at coordinate 1."""
    return _std_for(min_attenuation_at_step, grid_step), _std_for(max_attenuation_at_limit, 1.0)


class GaussianMask(nn.Module):
    """``exp(-1/2 sum_a t_a^2 / σ_ag^2)`` with learned widths ``σ`` from ``std [D, G]``:

    - ``parametrization="direct"``: ``σ = clamp(std, min_std, max_std)``;
    - ``"log"``: ``σ = clamp(exp(std), ...)``; ``"softplus"``: ``σ = clamp(softplus(std), ...)``.

    Bounds from `gaussian_std_bounds` (``grid_step``: the generator's coordinate step, e.g.
    ``1 / (L_cache - 1)``). Initial widths per axis: log-spaced over the groups from
    ``min_std * init_extent`` to ``σ(0.1 at 1) * init_extent`` (clamped), narrowest first, or widest
    first with ``widest_first`` (block-aligned with a block-diagonal generator's slow blocks).
    """

    def __init__(self, num_groups: int, spatial_dims: int, *, grid_step: float = 1 / 31,
                 min_attenuation_at_step: float = 0.1, max_attenuation_at_limit: float = 0.95,
                 init_extent: float | Sequence[float] = 1.0, parametrization: str = "direct",
                 widest_first: bool = False):
        super().__init__()
        _check(num_groups, spatial_dims, "GaussianMask")
        if parametrization not in ("direct", "log", "softplus"):
            raise ValueError(f"parametrization={parametrization!r} must be 'direct', 'log' or 'softplus'")
        self.num_groups, self.spatial_dims, self.parametrization = num_groups, spatial_dims, parametrization
        self.min_std, self.max_std = gaussian_std_bounds(grid_step, min_attenuation_at_step, max_attenuation_at_limit)
        extents = (float(init_extent),) * spatial_dims if isinstance(init_extent, (int, float)) else tuple(init_extent)
        if len(extents) != spatial_dims:
            raise ValueError(f"init_extent={init_extent!r} must be a float or one per spatial axis ({spatial_dims})")
        unit = _std_for(0.1, 1.0)
        rows = []
        for ext in extents:
            lo, hi = (min(max(v, self.min_std), self.max_std) for v in (self.min_std * ext, unit * ext))
            rows.append(torch.logspace(math.log10(lo), math.log10(hi), num_groups, dtype=torch.float64))
        std = torch.stack(rows)
        if widest_first:
            std = std.flip(-1)
        inverse = {"direct": lambda s: s, "log": torch.log, "softplus": lambda s: torch.log(torch.expm1(s))}
        self.std = nn.Parameter(inverse[parametrization](std).to(torch.get_default_dtype()))

    def widths(self, groups: slice = slice(None)) -> torch.Tensor:
        """``σ [D, G_sel]`` after the parametrization and the clamp."""
        raw = self.std[:, groups]
        sigma = {"direct": lambda s: s, "log": torch.exp, "softplus": F.softplus}[self.parametrization](raw)
        return sigma.clamp(self.min_std, self.max_std)

    def forward(self, grid: KernelGrid, groups: slice = slice(None)) -> torch.Tensor:
        t = _stack(grid)  # D, N
        inv_var = self.widths(groups).to(t.dtype).pow(-2)  # D, G_sel
        return torch.exp(-0.5 * (inv_var.t() @ (t * t))).reshape(-1, *grid.shape)
