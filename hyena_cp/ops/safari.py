"""The implicit filter of safari's Hyena operator, as HyenaDNA trained and ships it: a sine MLP
of a positional TABLE, times an exponential window plus a constant ``shift``.

For a table of ``N = l_max`` rows, ``bands = (emb_dim - 1) // 2``, row n holds
``[t_n, cos(f_b w_n)..., -sin(f_b w_n)...]`` with ``t_n = n / (N - 1)`` (positions normalised by
N - 1), ``w_n = 2π n / N`` (by N) and ``f = linspace(1e-4, bands - 1, bands)`` (a band at 1e-4,
then non-integer ones). The table ``z`` and the positions ``t`` are state (``z`` a parameter with
``learn_pos_emb``, else a buffer; ``t`` a buffer): a checkpoint's tables are LOADED, never
recomputed, since a trained (or rounded) table differs from the formula.

The filter at tap j < L (L <= l_max; integer offsets index the table rows):

    a_0 = z[j];  a_{i+1} = sin(freq * (W_i a_i + b_i))   for the embedding layer and num_inner_mlps layers
    h[g, j] = (W_out a)[g] * (exp(-t_j |deltas_g|) + shift)        (modulate; W_out has no bias)

with ONE ``freq [width]`` shared by every sine (safari appends one ``Sin`` module after each
layer), and ``deltas = linspace(ln(target)/slow_decay_pct, ln(target)/fast_decay_pct, G)``: group 0
decays slowest. ``deltas`` is a buffer. ``shift`` is 0 in safari's and HyenaDNA's training code and
0.05 in the HyenaDNA model HuggingFace ships (set it to match the checkpoint's code).
The operator's per-channel ``bias`` of safari is our Hyena's skip ``D``.

Protocol (`hyena_cp.ops.filters`): ``reference`` returns 1 (integer offsets) and refuses L > l_max,
``absolute`` is True (a shorter sequence sees the leading taps: decoding and packed documents).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hyena_cp.ops.filters import KernelGrid, group_major

__all__ = ["SafariFilter", "safari_positional_table", "safari_decays"]


def safari_positional_table(l_max: int, emb_dim: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z [l_max, emb_dim], t [l_max])`` of safari's ``PositionalEmbedding`` (see the module docstring)."""
    if emb_dim < 3 or emb_dim % 2 == 0:
        raise ValueError(f"emb_dim={emb_dim} must be odd and >= 3 (t, then cos and sin of each band)")
    if l_max < 2:
        raise ValueError(f"l_max={l_max} must be >= 2")
    bands = (emb_dim - 1) // 2
    n = torch.arange(l_max, dtype=torch.float64)
    t = torch.linspace(0, 1, l_max, dtype=torch.float64)  # n / (l_max - 1)
    w = 2 * math.pi * n / l_max
    f = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)
    angles = f[None, :] * w[:, None]  # N, bands
    z = torch.cat([t[:, None], torch.cos(angles), -torch.sin(angles)], dim=-1)  # real parts, then imaginary
    return z.to(dtype), t.to(dtype)


def safari_decays(num_groups: int, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5,
                  target: float = 1e-2) -> torch.Tensor:
    """``[G]`` safari's ``ExponentialModulation.deltas``: slowest first, fastest last (negative values)."""
    return torch.linspace(math.log(target) / slow_decay_pct, math.log(target) / fast_decay_pct, num_groups)


class SafariFilter(nn.Module):
    """safari's / HyenaDNA's ``HyenaFilter`` (see the module docstring).

    Args:
        num_groups: filters G (one per channel in safari's order-2 operator).
        spatial_dims: must be 1.
        l_max: rows of the positional table: the longest sequence accepted.
        emb_dim: table width (odd, >= 3).
        width: the MLP's width (safari's ``filter_order``).
        num_inner_mlps: hidden ``width x width`` layers after the embedding layer.
        sin_freq: initial value of the shared sine frequency (safari's ``w``).
        train_freq: the frequency is a parameter (else a buffer).
        shift: added to the window (0.0 safari, 0.05 HyenaDNA on HuggingFace).
        modulate: multiply the window in (safari's default) or not.
        learn_pos_emb: the table ``z`` is a parameter (safari) or a buffer (HyenaDNA).
        fast_decay_pct, slow_decay_pct, target: the window's rates (`safari_decays`).
    """

    def __init__(self, num_groups: int, spatial_dims: int = 1, *, l_max: int, emb_dim: int = 3, width: int = 16,
                 num_inner_mlps: int = 2, sin_freq: float = 1.0, train_freq: bool = True, shift: float = 0.0,
                 modulate: bool = True, learn_pos_emb: bool = False, fast_decay_pct: float = 0.3,
                 slow_decay_pct: float = 1.5, target: float = 1e-2):
        super().__init__()
        if spatial_dims != 1 or num_groups < 1 or width < 1 or num_inner_mlps < 0:
            raise ValueError(f"SafariFilter is causal 1-D: spatial_dims must be 1 (got {spatial_dims}), num_groups "
                             f"and width >= 1, num_inner_mlps >= 0 (got {num_groups}, {width}, {num_inner_mlps})")
        self.num_groups, self.spatial_dims, self.l_max = num_groups, 1, int(l_max)
        self.emb_dim, self.width, self.num_inner_mlps = emb_dim, width, num_inner_mlps
        self.shift, self.modulate = float(shift), modulate
        z, t = safari_positional_table(l_max, emb_dim)
        if learn_pos_emb:
            self.z = nn.Parameter(z)
        else:
            self.register_buffer("z", z)
        self.register_buffer("t", t)
        freq = torch.full((width,), float(sin_freq))
        if train_freq:
            self.freq = nn.Parameter(freq)
        else:
            self.register_buffer("freq", freq)
        self.layers = nn.ModuleList([nn.Linear(emb_dim, width)] +
                                    [nn.Linear(width, width) for _ in range(num_inner_mlps)])
        self.out = nn.Linear(width, num_groups, bias=False)
        self.register_buffer("deltas", safari_decays(num_groups, fast_decay_pct, slow_decay_pct, target))

    @property
    def absolute(self) -> bool:
        return True

    @property
    def max_size(self) -> tuple[int]:
        """The longest sequence: the table's rows (what decoding may reach)."""
        return (self.l_max,)

    def reference(self, size: Sequence[int]) -> tuple[float, ...]:
        """Integer offsets (divisor 1); ``ValueError`` beyond the table's ``l_max`` rows."""
        if len(size) != 1 or not 1 <= size[0] <= self.l_max:
            raise ValueError(f"sequence length {tuple(size)} must be between 1 and the positional table's l_max="
                             f"{self.l_max} (safari/HyenaDNA filters end there); use a model with a larger l_max")
        return (1.0,)

    def forward(self, grid: KernelGrid, groups: slice = slice(None)) -> torch.Tensor:
        rows = grid.coords[0].round().long()  # integer offsets index the table
        a = self.z[rows].to(self.out.weight.dtype)  # N, emb_dim
        for layer in self.layers:
            a = torch.sin(self.freq * layer(a))
        h = group_major(self.out, groups, a)  # G_sel, N
        if self.modulate:
            window = torch.exp(-self.deltas[groups, None].abs().to(h.dtype) * self.t[rows].to(h.dtype)) + self.shift
            h = h * window
        return h

    def flop_count(self, taps: int) -> int:
        """Matmul FLOPs (2 per MAC) of building all groups at ``taps`` positions."""
        macs = self.emb_dim * self.width + self.num_inner_mlps * self.width ** 2 + self.width * self.num_groups
        return 2 * taps * macs
