"""A straightforward Hyena layer written from the paper's formulation (Poli et al. 2023,
"Hyena Hierarchy", Sec. 3 and App. A), as a benchmark peer of `QKVSequenceMixer`.

It is deliberately independent of `hyena_cp.ops` (its own filter and FFT conv, plain
``nn.Conv1d`` short filter, no context parallelism, no packing): a peer that shares our
kernels would measure nothing. It is still exact: `tests/test_bench.py` holds its long conv
against a direct float64 causal convolution and checks that the layer is causal.

Order N (the paper's recurrence; N = 2 is the usual layer):
``u [B, L, C] -> in_proj -> [B, (N+1)C, L] -> short causal conv -> x_0 .. x_{N-1}, v``;
``z = v``; for n = N-1 .. 1: ``z = h_n * (x_n · z) + D_n · (x_n · z)`` (causal long conv);
``y = x_0 · z -> out_proj``. For N = 2: ``y = q · (h * (k · v) + D · (k · v))``.
The filters ``h_n`` are implicit and PER CHANNEL: positional embedding of ``t in [0, 1]``
-> MLP with sin activations -> ``[C, L]``, times an exponential decay window.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

__all__ = ["ReferenceHyenaLayer", "ReferenceHyenaFilter", "fft_long_conv"]


def fft_long_conv(u: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Causal long convolution ``y[t] = sum_{s<=t} h[s] u[t-s] + bias * u[t]`` by FFT.

    ``u: [B, C, L]``, ``h: [C, L]``, ``bias: [C]`` -> ``[B, C, L]`` in ``u``'s dtype. Zero
    padding to n = 2L makes the circular convolution of the FFT equal the linear one on the
    first L outputs. Computed in float32 at least (torch's CPU FFT has no bfloat16).
    """
    seq_len = u.shape[-1]
    dtype = torch.promote_types(u.dtype, torch.float32)
    u_f = torch.fft.rfft(u.to(dtype), n=2 * seq_len)  # B, C, L+1
    h_f = torch.fft.rfft(h.to(dtype), n=2 * seq_len)  # C, L+1
    y = torch.fft.irfft(u_f * h_f, n=2 * seq_len)[..., :seq_len]  # B, C, L
    return (y + u.to(dtype) * bias.to(dtype)[:, None]).to(u.dtype)


class Sin(nn.Module):
    """``sin(w · x)`` with a learned frequency per feature (the filter MLP's activation)."""

    def __init__(self, dim: int, w: float = 1.0):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class ReferenceHyenaFilter(nn.Module):
    """Implicit per-channel filters ``h: [channels, L]``.

    Positional embedding ``[t, cos(2 pi f t), sin(2 pi f t)]`` (f = 1 .. bands) of
    ``t = linspace(0, 1, L)``; MLP ``emb -> filter_order -> (Sin, Linear) x depth -> channels``;
    window ``exp(-alpha_c t)`` with per-channel rates spread so the window falls to
    ``target`` after between ``fast_decay_pct`` and ``slow_decay_pct`` of the sequence.
    """

    def __init__(self, channels: int, *, filter_order: int = 64, emb_bands: int = 1, depth: int = 2,
                 sin_freq: float = 1.0, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5,
                 target: float = 1e-2):
        super().__init__()
        self.emb_bands = emb_bands
        layers: list[nn.Module] = [nn.Linear(1 + 2 * emb_bands, filter_order), Sin(filter_order, sin_freq)]
        for _ in range(depth):
            layers += [nn.Linear(filter_order, filter_order), Sin(filter_order, sin_freq)]
        layers.append(nn.Linear(filter_order, channels, bias=False))
        self.mlp = nn.Sequential(*layers)
        rate_fast, rate_slow = math.log(1 / target) / fast_decay_pct, math.log(1 / target) / slow_decay_pct
        self.register_buffer("rates", torch.linspace(rate_slow, rate_fast, channels), persistent=False)

    def forward(self, seq_len: int) -> torch.Tensor:
        """``[channels, seq_len]`` filter taps, in the MLP's dtype."""
        dtype, device = self.rates.dtype, self.rates.device
        t = torch.linspace(0, 1, seq_len, dtype=dtype, device=device)  # L
        freqs = torch.arange(1, self.emb_bands + 1, dtype=dtype, device=device)
        angles = 2 * math.pi * t[:, None] * freqs  # L, bands
        emb = torch.cat([t[:, None], torch.cos(angles), torch.sin(angles)], dim=-1)  # L, 1 + 2 bands
        h = self.mlp(emb).t()  # channels, L
        return h * torch.exp(-t[None, :] * self.rates[:, None])


class ReferenceHyenaLayer(nn.Module):
    """Hyena operator of order ``order`` with projections; ``x: [B, L, C] -> [B, L, C]``, the
    full sequence in one process, causal, ``L <= l_max``.

    Args:
        d_model: channels C.
        l_max: longest sequence accepted (filters are built at the call's length L).
        order: N, the number of gates (N - 1 long convolutions).
        filter_order: width of the filter MLP.
        short_filter_order: K of the depthwise short filter.
    """

    def __init__(self, d_model: int, l_max: int, *, order: int = 2, filter_order: int = 64,
                 short_filter_order: int = 3):
        super().__init__()
        if order < 2:
            raise ValueError(f"order={order} must be >= 2 (one gate before and one after a long conv)")
        self.d_model, self.l_max, self.order = d_model, l_max, order
        width = (order + 1) * d_model
        self.in_proj = nn.Linear(d_model, width)
        # padding K-1 on both sides; keeping the first L outputs makes it causal
        self.short_filter = nn.Conv1d(width, width, short_filter_order, padding=short_filter_order - 1, groups=width)
        self.filter = ReferenceHyenaFilter((order - 1) * d_model, filter_order=filter_order)
        self.bias = nn.Parameter(torch.randn((order - 1) * d_model))
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[1]
        if seq_len > self.l_max:
            raise ValueError(f"sequence length {seq_len} exceeds l_max={self.l_max}; build the layer with a larger l_max")
        u = rearrange(self.in_proj(x), "b l d -> b d l")  # B, (N+1)C, L
        u = self.short_filter(u)[..., :seq_len]
        *gates, z = u.split(self.d_model, dim=1)  # N gates and v, each B, C, L
        h = self.filter(seq_len).split(self.d_model, dim=0)  # N-1 filters, each C, L
        bias = self.bias.split(self.d_model)
        for n in range(self.order - 1, 0, -1):
            z = fft_long_conv(gates[n] * z, h[n - 1], bias[n - 1])
        return self.out_proj(rearrange(gates[0] * z, "b d l -> b l d"))
