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

`modal_kernel` evaluates the filter with its adjoint written out: autograd would keep the
``[G, S, N]`` exponentials for backward (16x the filter itself, gigabytes at 1M tokens); this
keeps nothing of size N, works through the positions in chunks of about 2^20 exponentials (each
chunk reduced over the modes by one batched matmul) and recomputes them in backward.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hyena_cp.ops.filters import KernelGrid

__all__ = ["ModalFilter", "modal_kernel", "modal_state", "modal_step", "MODAL_PARAMETRIZATIONS"]

MODAL_PARAMETRIZATIONS = ("poles", "savanna")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # as the FFT conv: float64 stays float64, everything else in float32
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class _ModalKernel(torch.autograd.Function):
    """``h = sum_s R[:, s, None] * exp(λ[:, s, None] * t)``, a chunk of positions at a time (the
    ``[G, S, chunk]`` exponentials reduced over S by one batched matmul); backward recomputes each
    chunk's exponentials: ``dR = sum_n g e``, ``dλ = R * sum_n g t e``."""

    @staticmethod
    def forward(ctx, log_poles, residues, t):
        chunk = _chunk(*log_poles.shape)
        pieces = [torch.einsum("gs,gsn->gn", residues, torch.exp(log_poles[:, :, None] * t[a:a + chunk]))
                  for a in range(0, t.shape[0], chunk)]
        ctx.save_for_backward(log_poles, residues, t)
        return torch.cat(pieces, dim=1) if pieces else log_poles.new_zeros(log_poles.shape[0], 0)

    @staticmethod
    def backward(ctx, grad):
        log_poles, residues, t = ctx.saved_tensors
        grad_residues, moments = torch.zeros_like(residues), torch.zeros_like(log_poles)
        chunk = _chunk(*log_poles.shape)
        for a in range(0, t.shape[0], chunk):
            e = torch.exp(log_poles[:, :, None] * t[a:a + chunk])  # G, S, n
            g = grad[:, a:a + chunk]
            grad_residues += torch.einsum("gn,gsn->gs", g, e)
            moments += torch.einsum("gn,gsn->gs", g * t[a:a + chunk], e)
        return residues * moments, grad_residues, None


def _chunk(groups: int, modes: int, elements: int = 1 << 20) -> int:
    """Positions per chunk: about ``elements`` exponentials (4 MiB in float32) at a time."""
    return max(1, elements // max(1, groups * modes))


def modal_kernel(log_poles: torch.Tensor, residues: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[G, N]``: ``h[g, n] = sum_s residues[g, s] * exp(log_poles[g, s] * positions[n])``.

    ``log_poles``, ``residues``: ``[G, S]``; ``positions``: ``[N]`` (integer positions as floats).
    Computed in float32 (float64 for float64 inputs); O(G*N) memory in forward and backward.
    """
    if log_poles.dim() != 2 or residues.shape != log_poles.shape or positions.dim() != 1:
        raise ValueError(f"modal_kernel expects log_poles and residues [G, S] and positions [N]; got "
                         f"{tuple(log_poles.shape)}, {tuple(residues.shape)}, {tuple(positions.shape)}")
    dtype = _compute_dtype(log_poles, residues, positions)
    with torch.autocast(device_type=positions.device.type, enabled=False):
        return _ModalKernel.apply(log_poles.to(dtype), residues.to(dtype), positions.to(dtype))


def modal_state(z: torch.Tensor, log_poles: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The recurrence's state after the whole history ``z [B, C, t]``:
    ``s[b, c, s] = sum_τ exp(λ[c, s] * (t-1-τ)) z[b, c, τ]`` -> ``[B, C, S]`` (``log_poles [C, S]``,
    one filter per channel). O(B*C*S*t) work and O(C*S*chunk) memory, in float32 (float64 for
    float64 inputs)."""
    if z.dim() != 3 or log_poles.dim() != 2 or log_poles.shape[0] != z.shape[1]:
        raise ValueError(f"modal_state expects z [B, C, t] and log_poles [C, S]; got {tuple(z.shape)}, "
                         f"{tuple(log_poles.shape)}")
    dtype = _compute_dtype(z, log_poles)
    length, poles = z.shape[-1], log_poles.to(dtype)
    state = z.new_zeros(z.shape[0], z.shape[1], poles.shape[1], dtype=dtype)
    for start in range(0, length, chunk):  # [C, S, chunk] weights at a time, not [C, S, t]
        lags = torch.arange(length - 1 - start, max(length - 1 - start - chunk, -1), -1, device=z.device, dtype=dtype)
        weights = torch.exp(poles[:, :, None] * lags)  # C, S, n
        state += torch.einsum("bct,cst->bcs", z[..., start:start + chunk].to(dtype), weights)
    return state


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
        return modal_kernel(self.poles(groups), self.residues[groups], grid.coords[0]).to(self.residues.dtype)

    def flop_count(self, taps: int) -> int:
        """An exponential, a multiply and an add per mode, tap and group (transcendentals as one FLOP)."""
        return 3 * self.state_size * self.num_groups * taps
