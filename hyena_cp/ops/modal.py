"""Modal long filters: a sum of real exponentials per channel (StripedHyena 2's Hyena-LI).

``h[g, j] = sum_s R[g, s] * exp(λ[g, s] * j)`` at INTEGER positions j = 0, 1, ... (no 1/L
scaling): S real poles ``p = exp(λ)`` per filter. Such a filter is the impulse response of a
diagonal linear recurrence, ``s_t = p * s_{t-1} + u_t``, ``y_t = sum_s R s_t``, which is what
decoding runs (`modal_state`, `modal_step`: O(S) per channel and token, not O(t)); training and
prefill convolve by FFT like every long filter.

`ModalFilter` parametrizations of λ:

- ``"poles"``: λ itself is the parameter (``log_poles [G, S]``), the form a converted checkpoint
  stores (vortex's ``filter.log_poles``, ``filter.residues``);
- ``"savanna"``: Savanna's ``ImplicitModalFilter`` training form ``λ = -exp(p) * exp(γ)``, always
  negative (every pole stable, 0 < p < 1), with ``p`` initialised to -1 and ``γ = log U(γ_min, γ_max)``.

Both initialise ``R ~ 0.1 N(0, 1/S)`` and (``"poles"``) λ from the same distribution as Savanna's.

`modal_kernel` and `modal_state` never evaluate one exponential per position: a position
``t = k m + n`` (blocks of ``m ~ sqrt(N)``) factors as ``exp(λ t) = exp(λ k m) * exp(λ n)``, so
the filter is one batched matmul of ``[G, N/m, S]`` block weights by ``[G, S, m]`` in-block
exponentials: ``G S (m + N/m)`` exponentials instead of ``G S N`` (64x fewer at 16k positions,
where one per position cost more than the rest of an LI layer on CPU), and autograd keeps only
those small factors for backward.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hyena_cp.ops.filters import KernelGrid

__all__ = ["ModalFilter", "modal_kernel", "modal_state", "modal_step", "MODAL_PARAMETRIZATIONS"]

MODAL_PARAMETRIZATIONS = ("poles", "savanna")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # as the FFT conv: float64 stays float64, everything else in float32
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _block(length: int) -> int:
    """In-block positions m: about sqrt(length), so the two exponential factors are equally small."""
    return max(1, math.isqrt(max(length - 1, 0)) + 1)


def _factors(log_poles: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``exp(λ k m) [G, S, ceil(length/m)]`` and ``exp(λ n) [G, S, m]``: ``exp(λ (k m + n))`` is their product."""
    m = _block(length)
    blocks = torch.arange(0, length, m, device=log_poles.device, dtype=log_poles.dtype)
    within = torch.arange(m, device=log_poles.device, dtype=log_poles.dtype)
    return torch.exp(log_poles[:, :, None] * blocks), torch.exp(log_poles[:, :, None] * within)


def modal_kernel(log_poles: torch.Tensor, residues: torch.Tensor, length: int) -> torch.Tensor:
    """``[G, length]``: ``h[g, t] = sum_s residues[g, s] * exp(log_poles[g, s] * t)`` at ``t = 0 .. length-1``.

    ``log_poles``, ``residues``: ``[G, S]``. Computed in float32 (float64 for float64 inputs) as
    one batched matmul of the factored exponentials (module docstring); differentiable by autograd,
    which saves ``O(G S sqrt(length))`` values.
    """
    if log_poles.dim() != 2 or residues.shape != log_poles.shape or length < 0:
        raise ValueError(f"modal_kernel expects log_poles and residues [G, S] and a length >= 0; got "
                         f"{tuple(log_poles.shape)}, {tuple(residues.shape)}, {length}")
    dtype = _compute_dtype(log_poles, residues)
    with torch.autocast(device_type=log_poles.device.type, enabled=False):
        poles, residues = log_poles.to(dtype), residues.to(dtype)
        across, within = _factors(poles, length)
        weights = (residues[:, :, None] * across).transpose(1, 2)  # G, blocks, S
        return torch.bmm(weights, within).flatten(1)[:, :length]


def modal_state(z: torch.Tensor, log_poles: torch.Tensor) -> torch.Tensor:
    """The recurrence's state after the whole history ``z [B, C, t]``:
    ``s[b, c, s] = sum_τ exp(λ[c, s] * (t-1-τ)) z[b, c, τ]`` -> ``[B, C, S]`` (``log_poles [C, S]``,
    one filter per channel). The lags ``t-1-τ`` factor into blocks as `modal_kernel`'s positions do:
    one batched matmul of the reversed history by the in-block exponentials, then a sum over blocks
    weighted by theirs. O(B*C*S*t) multiply-adds, O(C*S*sqrt(t)) exponentials, in float32 (float64
    for float64 inputs)."""
    if z.dim() != 3 or log_poles.dim() != 2 or log_poles.shape[0] != z.shape[1]:
        raise ValueError(f"modal_state expects z [B, C, t] and log_poles [C, S]; got {tuple(z.shape)}, "
                         f"{tuple(log_poles.shape)}")
    dtype = _compute_dtype(z, log_poles)
    length, poles = z.shape[-1], log_poles.to(dtype)
    with torch.autocast(device_type=z.device.type, enabled=False):  # the state keeps float32
        across, within = _factors(poles, length)  # C, S, blocks / m
        m = within.shape[-1]
        lags = F.pad(z.to(dtype).flip(-1), (0, across.shape[-1] * m - length))  # B, C, blocks * m: z at lag k m + n
        per_block = torch.einsum("bckn,csn->bcks", lags.unflatten(-1, (-1, m)), within)
        return torch.einsum("bcks,csk->bcs", per_block, across)


def modal_step(state: torch.Tensor, z: torch.Tensor, log_poles: torch.Tensor,
               residues: torch.Tensor, d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence: ``s' = exp(λ) * s + z``, ``y = sum_s R s' + D z``.

    ``state [B, C, S]`` (float32, or float64 for float64 inputs), ``z [B, C]``, ``log_poles``,
    ``residues [C, S]``, ``d [C]`` or None -> ``(y [B, C]`` in ``z``'s dtype``, new state)``; O(C*S).
    Equals the last output of the causal conv of the whole history with `modal_kernel`'s filter."""
    dtype = state.dtype
    state = torch.exp(log_poles.to(dtype)) * state + z.to(dtype)[..., None]
    y = torch.einsum("bcs,cs->bc", state, residues.to(dtype))
    if d is not None:
        y = y + d.to(dtype) * z.to(dtype)
    return y.to(z.dtype), state


class ModalFilter(nn.Module):
    """``S`` real modes per group (see the module docstring).

    Args:
        num_groups: filters G (the operator's ``num_heads``; Evo 2's LI has one per channel).
        spatial_dims: must be 1 (a causal sequence).
        state_size: modes S per filter (16 in Evo 2).
        parametrization: ``"poles"`` (λ is the parameter ``log_poles``) or ``"savanna"``
            (``λ = -exp(p) exp(γ)``, parameters ``p`` and ``gamma``).
        gamma_min, gamma_max: range of ``exp(γ)`` at initialisation (both parametrizations).
    """

    def __init__(self, num_groups: int, spatial_dims: int = 1, *, state_size: int = 16,
                 parametrization: str = "poles", gamma_min: float = 0.01, gamma_max: float = 0.1):
        super().__init__()
        if spatial_dims != 1 or num_groups < 1 or state_size < 1:
            raise ValueError(f"ModalFilter is causal 1-D: spatial_dims must be 1 (got {spatial_dims}), num_groups and "
                             f"state_size >= 1 (got {num_groups}, {state_size})")
        if parametrization not in MODAL_PARAMETRIZATIONS:
            raise ValueError(f"parametrization={parametrization!r} must be one of {MODAL_PARAMETRIZATIONS}")
        if not 0 < gamma_min <= gamma_max:
            raise ValueError(f"need 0 < gamma_min <= gamma_max, got {gamma_min}, {gamma_max}")
        self.num_groups, self.spatial_dims, self.state_size = num_groups, 1, state_size
        self.parametrization = parametrization
        gamma = torch.log(torch.rand(num_groups, state_size) * (gamma_max - gamma_min) + gamma_min)
        p = -torch.ones(num_groups, state_size)
        self.residues = nn.Parameter(0.1 * torch.randn(num_groups, state_size) / state_size ** 0.5)
        if parametrization == "poles":
            self.log_poles = nn.Parameter(-torch.exp(p) * torch.exp(gamma))
        else:
            self.p, self.gamma = nn.Parameter(p), nn.Parameter(gamma)

    @property
    def absolute(self) -> bool:
        return True

    @property
    def causal_only(self) -> bool:
        """The taps are at offsets 0, 1, 2, ... (`forward` reads only the grid's length)."""
        return True

    def reference(self, size: Sequence[int]) -> tuple[float, ...]:
        """Integer positions (divisor 1); any sequence length."""
        if len(size) != 1 or size[0] < 1:
            raise ValueError(f"ModalFilter takes a 1-D size (L,) with L >= 1, got {tuple(size)}")
        return (1.0,)

    def poles(self, groups: slice = slice(None)) -> torch.Tensor:
        """``λ [G_sel, S]`` (log poles) of ``groups``."""
        if self.parametrization == "poles":
            return self.log_poles[groups]
        return -torch.exp(self.p[groups]) * torch.exp(self.gamma[groups])

    def forward(self, grid: KernelGrid, groups: slice = slice(None)) -> torch.Tensor:
        return modal_kernel(self.poles(groups), self.residues[groups], grid.shape[0]).to(self.residues.dtype)

    def flop_count(self, taps: int) -> int:
        """A multiply-add per mode, tap and group (the block matmul), and per mode and group the
        ``m + taps/m`` factored exponentials and block weights (transcendentals as one FLOP)."""
        m = _block(taps)
        return self.state_size * self.num_groups * (2 * taps + 2 * (m + -(-taps // m)))
