"""The causal depthwise conv of a LONG filter (Hyena-MR's 128 taps) as blocked Toeplitz matmuls.

Cut the sequence into blocks of ``m >= K-1`` tokens. Output block ``i`` then reads only input blocks
``i`` and ``i-1`` (the block before the first is the halo, zeros at the start of a sequence)::

    Y_i = X_i @ T0^T + X_{i-1} @ T1^T,   T0[a, b] = h[a - b],   T1[a, b] = h[a - b + m]

with ``h[s]`` the tap ``s`` tokens back (zero outside ``0 <= s < K``): per channel, two ``[L/m, m]``
by ``[m, m]`` matmuls. That is ``4 m`` multiply-adds per token and channel against the ``K`` of the
shifted taps (`hyena_cp.ops.short_conv`), but matmul speed against K memory-bound passes over the
sequence: from about 8 taps on it is the faster form on CPU (`BLOCKED_MIN_TAPS`). The adjoint is the same blocks
transposed: ``dX_j = dY_j @ T0 + dY_{j+1} @ T1``, ``dT0 = sum_i dY_i^T X_i`` (``dT1`` with
``X_{i-1}``), each T's gradient summed along its diagonals into the taps.

Pure math: the halo comes in as a tensor (`hyena_cp.parallel.halo` moves it); packed documents are
handled by the caller, which subtracts the few cross-document terms (`short_conv._CrossTaps`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["BLOCKED_MIN_TAPS", "blocked_causal_conv1d", "blocked_causal_conv1d_backward"]

# Filters with at least this many taps take the blocked form; the short convs (K = 3, 4) and Evo 2's
# SE (K = 7) keep the shifted taps, about as fast there (C=256, L=16k, forward + backward on 2 CPU
# cores, blocked against shifted: ~1x at K=7, ~1.6x faster at K=16, 3-4x at K=128).
BLOCKED_MIN_TAPS = 8


def _block(kernel: int) -> int:
    """Tokens per block: K-1 (an output block reads one block back) rounded up to a multiple of 16
    (K=128 takes 128: 15 % faster than 127, and wider blocks only add zeros to multiply)."""
    return max(16, -(-(kernel - 1) // 16) * 16)


def _toeplitz(weight: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``T1^T, T0^T [C, m, m]`` (transposed: the right operands of the block matmuls) of ``weight [C, K]``
    (``weight[:, -1]`` multiplies the current token, so lag s is ``h[s] = weight[:, K-1-s]``).

    ``[T1 | T0][a, j] = h[a + m - j]`` depends on ``a - j`` only: it is the windows of one zero-padded
    row ``r[p] = h[p - m + 1]`` (``unfold``: ``r[a + j']``), reversed along ``j``."""
    kernel = weight.shape[1]
    r = F.pad(weight.flip(-1), (m - 1, 2 * m - kernel))  # C, 3m - 1
    both = r.unfold(-1, 2 * m, 1).flip(-1)  # C, m, 2m = [T1 | T0]
    return both[..., :m].transpose(1, 2), both[..., m:].transpose(1, 2)


def _toeplitz_grad(d_t1: torch.Tensor, d_t0: torch.Tensor, kernel: int) -> torch.Tensor:
    """The adjoint of `_toeplitz`: ``[C, K]`` from the gradients of ``T1^T, T0^T``. Each entry
    ``[T1 | T0][a, j]`` is ``r[a + 2m - 1 - j]``: sum the gradient along those anti-diagonals
    (each row shifted one further right by padding and re-viewing: no index scatter)."""
    channels, m = d_t0.shape[:2]
    windows = torch.cat([d_t1.transpose(1, 2), d_t0.transpose(1, 2)], dim=-1).flip(-1)  # C, m, 2m: d r[a + j']
    skewed = F.pad(windows, (0, m)).flatten(1)[:, :-m].view(channels, m, 3 * m - 1)  # row a moved right by a
    grad_r = skewed.sum(1)  # C, 3m - 1
    return grad_r[:, m - 1:m - 1 + kernel].flip(-1)


def _blocks(x: torch.Tensor, left_context: torch.Tensor | None, m: int) -> torch.Tensor:
    """``[N, C, (nb+1) m]``: one block holding the halo (right-aligned, zeros before it), then ``x``
    padded with zeros to ``nb`` whole blocks."""
    batch, channels, length = x.shape
    blocks = -(-length // m)
    u = x.new_zeros(batch, channels, (blocks + 1) * m)
    u[..., m:m + length] = x
    if left_context is not None:
        halo = left_context.shape[-1]
        u[..., m - halo:m] = left_context
    return u


def blocked_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          left_context: torch.Tensor | None) -> torch.Tensor:
    """``short_conv.causal_depthwise_conv1d`` (one document) by blocked matmuls: ``x [N, C, L]``,
    ``weight [C, K]``, ``bias [C]`` or None, ``left_context [N, C, K-1]`` or None -> ``[N, C, L]``
    contiguous. No autograd (the caller's Function applies `blocked_causal_conv1d_backward`)."""
    with torch.autocast(device_type=x.device.type, enabled=False):  # in x's dtype, as the shifted taps
        return _forward(x, weight, bias, left_context)


def _forward(x, weight, bias, left_context):
    batch, channels, length = x.shape
    m = _block(weight.shape[1])
    t1, t0 = _toeplitz(weight, m)
    u = _blocks(x, left_context, m)
    blocks = u.shape[-1] // m - 1
    y = x.new_empty(batch, channels, blocks * m)
    for n in range(batch):  # one [C, nb, m] @ [C, m, m] pair per sample: no copy of the Toeplitz blocks per sample
        out = y[n].view(channels, blocks, m)
        torch.bmm(u[n, :, m:].view(channels, blocks, m), t0, out=out)
        out.baddbmm_(u[n, :, :-m].view(channels, blocks, m), t1)
    if bias is not None:
        y += bias[:, None]
    return y if blocks * m == length else y[..., :length].contiguous()


def blocked_causal_conv1d_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                   left_context: torch.Tensor | None, need_x: bool, need_w: bool,
                                   need_halo: bool) -> tuple[torch.Tensor | None, ...]:
    """The adjoint of `blocked_causal_conv1d` without its bias: ``(grad_x, grad_weight, grad_halo)``,
    None where not needed."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _backward(grad, x, weight, left_context, need_x, need_w, need_halo)


def _backward(grad, x, weight, left_context, need_x, need_w, need_halo):
    batch, channels, length = x.shape
    kernel = weight.shape[1]
    m = _block(kernel)
    t1, t0 = _toeplitz(weight, m)
    blocks = -(-length // m)
    g = grad.new_zeros(batch, channels, (blocks + 1) * m)  # dY, zero-padded, then a zero block (dY_{nb})
    g[..., :length] = grad
    grad_x = x.new_empty(batch, channels, blocks * m) if need_x else None
    grad_halo = left_context.new_empty(left_context.shape) if need_halo else None
    d_t1 = d_t0 = None
    if need_w:
        u = _blocks(x, left_context, m)
        d_t1, d_t0 = (weight.new_zeros(channels, m, m) for _ in range(2))
    for n in range(batch):
        g_n = g[n, :, :-m].view(channels, blocks, m)
        if need_x:  # dX_j = dY_j @ T0 + dY_{j+1} @ T1
            out = grad_x[n].view(channels, blocks, m)
            torch.bmm(g_n, t0.transpose(1, 2), out=out)
            out.baddbmm_(g[n, :, m:].view(channels, blocks, m), t1.transpose(1, 2))
        if need_halo:  # the halo block is X_{-1}: only dY_0 @ T1 reaches it
            halo = left_context.shape[-1]
            grad_halo[n] = (g[n, :, :m].unsqueeze(1) @ t1.transpose(1, 2)).squeeze(1)[:, m - halo:]
        if need_w:  # dT^T = X^T dY, summed over the samples
            d_t0.baddbmm_(u[n, :, m:].view(channels, blocks, m).transpose(1, 2), g_n)
            d_t1.baddbmm_(u[n, :, :-m].view(channels, blocks, m).transpose(1, 2), g_n)
    grad_w = _toeplitz_grad(d_t1, d_t0, kernel) if need_w else None
    if need_x and blocks * m != length:
        grad_x = grad_x[..., :length].contiguous()
    return grad_x, grad_w, grad_halo
