"""Implicit long filters: a kernel generator evaluated on the kernel's grid of offsets, times a mask.

A long filter is ``k[g, o] = mask[g, o] * generator(o)[g]`` at every tap offset ``o`` of the
kernel (`KernelGrid`: one offset per tap and axis, from the operator's geometry, normalised
to coordinates). One filter per *group* (``num_groups`` = Hyena's ``num_heads``); the channels
of a group share it. ``generator(grid, groups=slice)`` builds only the requested groups: under
context parallelism a rank slices the output layer's parameters (and the mask's) to its own
groups *before* building, so it never materialises the other ranks' filters.

Coordinates are offsets divided by a reference size per axis: the configured maximum
(``max_len`` / ``max_grid``) when given, so a smaller grid gets the central (1-D causal: the
leading) part of the larger one's filter — what a causal LM decoding past its prompt wants —
else the actual size at call time (resolution-relative filters, any size accepted). Exceeding a
configured maximum raises ``ValueError``.

Every generator has ``num_groups``, ``spatial_dims``, ``reference(size)`` (the per-axis divisors
that turn integer offsets into coordinates, raising ``ValueError`` for a size it does not accept),
``absolute`` (True when the coordinates do not depend on the size: then a shorter sequence sees
exactly the prefix of a longer one's filter — what decoding and packed documents need),
``forward(grid, groups, conditioning=None)`` and ``flop_count(taps)``; one whose taps are only defined
at the causal offsets 0, 1, 2, ... says ``causal_only = True`` (the operator then refuses other boundaries). A generator whose kernel is a
linear output layer ``out`` of hidden features also has ``features(grid, conditioning=None)`` (those
features, ``[N, W]`` or ``[B, N, W]``): the operator then transforms the W features instead of the G
filters (`hyena_cp.ops.fftconv.kernel_spectrum`). A mask has ``num_groups``,
``spatial_dims`` and ``forward(grid, groups)``, and is evaluated on the generator's coordinates.
A generator with ``fir_length = K`` is a finite impulse response: the operator builds only its K
taps and applies them as a direct causal convolution (under CP with a halo of K-1 tokens, no
AllToAll) instead of the FFT conv.

This module holds the generator of the original Hyena (`FourierFilter`: Fourier features -> MLP
with sin activations -> one output per group); the SIREN family and random Fourier features are in
`hyena_cp.ops.siren`, the windows in `hyena_cp.ops.masks`; StripedHyena 2's explicit taps and modal
filters in `hyena_cp.ops.explicit` and `hyena_cp.ops.modal`, safari/HyenaDNA's in `hyena_cp.ops.safari`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["KernelGrid", "kernel_grid", "check_size", "FourierFilter", "Sin", "fourier_features", "decay_rates",
           "group_major"]


@dataclass(frozen=True)
class KernelGrid:
    """Where a long kernel is evaluated. ``coords[a]``: ``[K_a]`` normalised offsets of axis a's taps
    (offset / reference size); the kernel is ``[G, K_0, ..., K_{n-1}]`` over their outer product.
    ``size``: the global grid the kernel convolves (per axis)."""

    coords: tuple[torch.Tensor, ...]
    size: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(c.numel() for c in self.coords)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def mesh(self) -> list[torch.Tensor]:
        """Per axis, the coordinate of every tap, flattened row-major: ``[numel]`` each."""
        return [g.reshape(-1) for g in torch.meshgrid(*self.coords, indexing="ij")]


def check_size(size: Sequence[int], maximum: Sequence[int | None] | None, names: Sequence[str]) -> tuple[float, ...]:
    """Reference sizes for a global grid ``size`` (the maximum where configured, else the size),
    or ``ValueError`` naming the setting a size exceeds."""
    refs = []
    for axis, n in enumerate(size):
        top = None if maximum is None else maximum[axis]
        if n < 1:
            raise ValueError(f"grid size {tuple(size)} must be >= 1 along every axis")
        if top is not None and n > top:
            raise ValueError(f"size {n} along axis {axis} exceeds the filter's configured {names[axis]}={top}; raise "
                             f"{names[axis].split('[')[0]} in the Hyena config, or set it to None for size-relative filters")
        refs.append(float(n if top is None else top))
    return tuple(refs)


def kernel_grid(offsets: Sequence[range], size: Sequence[int], refs: Sequence[float], *,
                device: torch.device, dtype: torch.dtype) -> KernelGrid:
    """The `KernelGrid` of taps at integer ``offsets`` per axis, normalised by ``refs``."""
    coords = tuple(torch.arange(o.start, o.stop, device=device, dtype=dtype) / ref for o, ref in zip(offsets, refs))
    return KernelGrid(coords, tuple(size))


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


def group_major(out: nn.Linear, groups: slice, h: torch.Tensor) -> torch.Tensor:
    """The output layer of a generator for ``groups``, group-major: ``h [..., N, W] -> [..., G_sel, N]``.
    ``W_out @ h^T`` rather than ``(h @ W_out^T)^T``: the kernel (2^dims times a channel's grid) is then
    born contiguous in the layout the FFT conv reads, instead of being transposed by a copy."""
    weight, h_t = out.weight[groups], h.transpose(-1, -2)
    if out.bias is None:
        return torch.matmul(weight, h_t)
    bias = out.bias[groups, None]  # added inside the matmul: no second pass over the kernel
    return torch.addmm(bias, weight, h_t) if h.dim() == 2 else torch.baddbmm(bias, weight.expand(h.shape[0], -1, -1), h_t)


def _check_dims(num_groups: int, spatial_dims: int, what: str) -> None:
    if num_groups < 1 or spatial_dims not in (1, 2, 3):
        raise ValueError(f"{what} needs num_groups >= 1 and spatial_dims in (1, 2, 3); got {num_groups}, {spatial_dims}")


class FourierFilter(nn.Module):
    """The original Hyena generator: per axis the features ``t, sin(pi f t), cos(pi f t)``
    (f = 1..num_bands) of the tap's coordinate, concatenated over axes, through ``depth`` layers
    ``Linear -> Sin`` of ``width`` and a last ``Linear(width, num_groups)``.

    Coordinates are offsets divided by ``max_size`` (one per axis) when given — absolute positions, a
    smaller grid sees the central (causal: leading) part of the largest one's filter, a larger grid is
    refused — else by the actual size at call time (size-relative filters, any size accepted).

    ``forward(grid, groups)`` -> ``[G_sel, *grid.shape]``.
    """

    def __init__(self, num_groups: int, spatial_dims: int, *, num_bands: int = 8, width: int = 64, depth: int = 2,
                 sin_freq: float = 1.0, max_size: Sequence[int] | None = None):
        super().__init__()
        _check_dims(num_groups, spatial_dims, "FourierFilter")
        if depth < 1 or width < 1 or num_bands < 0:
            raise ValueError(f"FourierFilter needs depth, width >= 1 and num_bands >= 0; got {depth}, {width}, {num_bands}")
        if max_size is not None and len(max_size) != spatial_dims:
            raise ValueError(f"max_size={tuple(max_size)} must give one size per spatial axis ({spatial_dims})")
        self.num_groups, self.spatial_dims, self.num_bands = num_groups, spatial_dims, num_bands
        self.width, self.depth = width, depth
        self.max_size = None if max_size is None else tuple(int(n) for n in max_size)
        self.in_features = spatial_dims * (1 + 2 * num_bands)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(self.in_features if i == 0 else width, width), Sin(width, sin_freq)]
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(width, num_groups)

    @property
    def absolute(self) -> bool:
        return self.max_size is not None

    def reference(self, size: Sequence[int]) -> tuple[float, ...]:
        """Divisors of the offsets: ``max_size`` where set (``ValueError`` beyond it), else the size."""
        names = ("max_len",) if self.spatial_dims == 1 else tuple(f"max_grid[{a}]" for a in range(self.spatial_dims))
        return check_size(size, self.max_size, names)

    def forward(self, grid: KernelGrid, groups: slice = slice(None), conditioning: torch.Tensor | None = None):
        return group_major(self.out, groups, self.features(grid, conditioning)).reshape(-1, *grid.shape)

    def features(self, grid: KernelGrid, conditioning: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden layer at every tap, ``[N, width]``: the kernel is ``out`` of it."""
        if conditioning is not None:
            raise ValueError("FourierFilter takes no conditioning; use SirenFilter(cond_dim=...) for FiLM")
        feats = torch.cat([fourier_features(t, self.num_bands) for t in grid.mesh()], dim=-1)  # N, F
        return self.hidden(feats)

    def flop_count(self, grid_numel: int) -> int:
        """Matmul FLOPs (2 per MAC) of building all groups at ``grid_numel`` taps."""
        macs = self.in_features * self.width + (self.depth - 1) * self.width ** 2 + self.width * self.num_groups
        return 2 * grid_numel * macs
