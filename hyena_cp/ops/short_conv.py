"""Short depthwise convolutions (pure math, no process groups).

Context parallelism hands these ops the neighbouring tokens that a shard needs (its halo)
as explicit tensors; without a halo they see zeros, exactly where the single-process conv
sees its zero padding. On CUDA the 1-D conv may run the causal-conv1d kernel instead
(`hyena_cp.ops.kernels`: when, and how to turn it off); the code below is the reference.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hyena_cp.ops import kernels
from hyena_cp.ops.boundary import short_conv_reach
from hyena_cp.ops.toeplitz_conv import BLOCKED_MIN_TAPS, blocked_causal_conv1d, blocked_causal_conv1d_backward

__all__ = ["causal_depthwise_conv1d", "depthwise_conv_nd", "depthwise_conv2d_same"]


def causal_depthwise_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    left_context: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal depthwise conv: ``y[t] = sum_j weight[:, j] * x[t - (K-1) + j] + bias``.

    Computed as K shifted multiply-adds rather than an aten convolution: with K of 3 or 4
    that is a few elementwise passes, needs no zero-padded copy of ``x``, and its backward
    is the same few passes (a oneDNN depthwise conv backward on long sequences is not).
    From ``BLOCKED_MIN_TAPS`` taps on (Hyena-MR's 128) K passes cost more than blocked
    Toeplitz matmuls (`hyena_cp.ops.toeplitz_conv`), which run instead.

    Args:
        x: ``[N, C, L]``.
        weight: ``[C, K]``; ``weight[:, -1]`` multiplies the current token.
        bias: ``[C]`` or None.
        left_context: ``[N, C, K-1]`` the K-1 tokens preceding ``x`` (a halo), or None
            for zeros (the start of the sequence).
        positions: packed documents: ``[N, L]`` integer offset of each output token in its
            document (`hyena_cp.ops.packing.document_positions`), or None (one document).
            The tap looking ``s`` tokens back is then used only where ``positions >= s``:
            taps, halo included, stop at a document start, as if the document ran alone.

    Returns:
        ``[N, C, L]`` (contiguous), in ``x``'s dtype.
    """
    fast = kernels.fast_causal_depthwise_conv1d(x, weight, bias, left_context, positions)
    if fast is not None:  # CUDA, causal-conv1d installed, K in 2..4, no packing (hyena_cp.ops.kernels)
        return fast
    dtype = x.dtype
    bias = None if bias is None else bias.to(dtype)
    left_context = None if left_context is None else left_context.to(dtype)
    if positions is not None and positions.shape != (x.shape[0], x.shape[-1]):
        raise ValueError(f"positions must be [N, L] = {(x.shape[0], x.shape[-1])} like x [N, C, L], "
                         f"got {tuple(positions.shape)}")
    if positions is None and torch.compiler.is_compiling():
        return _shifted_sum(x, weight.to(dtype), bias, left_context)
    return _CausalDepthwiseConv1d.apply(x.contiguous(), weight.to(dtype), bias, left_context, positions)


def _shifted_sum(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 left_context: torch.Tensor | None) -> torch.Tensor:
    """The same conv as one expression, for ``torch.compile``: K shifted products of the input
    with its halo in front, summed, and autograd's backward. A compiler fuses it into one pass
    over the tokens (forward, and one for the backward with the K weight-gradient reductions);
    the in-place taps of `_CausalDepthwiseConv1d`, which eager mode wants (no temporaries), are
    K sequential mutations it cannot fuse."""
    kernel, length = weight.shape[1], x.shape[-1]
    if left_context is None:
        full = F.pad(x, (kernel - 1, 0))
    else:
        full = torch.cat([left_context, x], dim=-1)  # N, C, K-1+L
    y = full[..., kernel - 1:] * weight[:, -1:]
    for j in range(kernel - 1):
        y = y + full[..., j:j + length] * weight[:, j, None]
    return y if bias is None else y + bias[:, None]


def _shifted_taps(kernel: int, length: int):
    """``(shift, j, n)`` for the taps that look back: ``weight[:, j]`` multiplies the token
    ``shift = K-1-j`` steps back; the first ``n = min(shift, L)`` outputs read it from the halo."""
    for shift in range(1, kernel):
        yield shift, kernel - 1 - shift, min(shift, length)


class _CrossTaps:
    """The (output, tap) pairs of a packed conv whose input lies before the output's document
    start (``positions[n, t] < shift``): a few per document, whatever the length. The conv runs
    unmasked and these terms are subtracted again, so packing costs O(documents * K^2 * C)
    instead of a masking pass over the whole sequence per tap. ``seq`` holds the pairs that read
    ``x`` (``src = t - shift >= 0``), ``halo`` those that read the halo (``src`` = its index),
    each as ``(n, t, j, src)`` index tensors (``weight[:, j]`` is the tap)."""

    def __init__(self, positions: torch.Tensor, kernel: int):
        shifts = torch.arange(1, kernel, device=positions.device)
        n, t, s = (positions[..., None] < shifts).nonzero(as_tuple=True)  # s: shift - 1
        shift = s + 1
        src, j = t - shift, kernel - 1 - shift
        inside = src >= 0
        self.seq = (n[inside], t[inside], j[inside], src[inside])
        self.halo = (n[~inside], t[~inside], j[~inside], src[~inside] + kernel - 1)


def _channel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum((0, 2))`` for ``[N, C, L]`` operands, as a batched matmul: no ``[N, C, L]``
    temporary (on CPU a fresh buffer of that size costs more than the arithmetic)."""
    return torch.einsum("ncl,ncl->c", a, b)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, L] -> [N, L, C]`` view: one (n, t) index pair picks a token's C channels."""
    return x.transpose(1, 2)


def _subtract_taps(out: torch.Tensor, n: torch.Tensor, t: torch.Tensor, src: torch.Tensor, j: torch.Tensor,
                   source: torch.Tensor, weight: torch.Tensor) -> None:
    """``out[n, :, t] -= weight[:, j] * source[n, :, src]`` for every pair, in place (pairs may repeat)."""
    if n.numel():
        _tokens(out).index_put_((n, t), -_tokens(source)[n, src] * weight[:, j].t(), accumulate=True)


def _subtract_tap_grads(grad_w: torch.Tensor, n: torch.Tensor, t: torch.Tensor, src: torch.Tensor,
                        j: torch.Tensor, grad: torch.Tensor, source: torch.Tensor) -> None:
    """``grad_w[:, j] -= sum(grad[n, :, t] * source[n, :, src])`` over the pairs, in place."""
    if n.numel():
        grad_w.t().index_add_(0, j, -(_tokens(grad)[n, t] * _tokens(source)[n, src]))


def _shifted_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  left_context: torch.Tensor | None) -> torch.Tensor:
    """The unmasked conv as K shifted multiply-adds in place (the short filters' form)."""
    kernel, length = weight.shape[1], x.shape[-1]
    last = weight[:, -1:]
    y = x * last if bias is None else torch.addcmul(bias[:, None], x, last)
    for shift, j, n in _shifted_taps(kernel, length):
        tap = weight[:, j, None]
        if shift < length:
            y[..., shift:].addcmul_(x[..., :length - shift], tap)
        if left_context is not None:
            y[..., :n].addcmul_(left_context[..., j:j + n], tap)
    return y


def _shifted_conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           left_context: torch.Tensor | None, need_x: bool, need_w: bool,
                           need_halo: bool) -> tuple[torch.Tensor | None, ...]:
    """`_shifted_conv`'s adjoint without the bias: the gradient of x is the same taps run
    anti-causally, that of each tap a per-channel dot product of shifted sequences."""
    kernel, length = weight.shape[1], x.shape[-1]
    grad_x = grad_w = grad_halo = None
    if need_x:
        grad_x = grad * weight[:, -1:]
        for shift, j, _ in _shifted_taps(kernel, length):
            if shift < length:
                grad_x[..., :length - shift].addcmul_(grad[..., shift:], weight[:, j, None])
    if need_halo:
        grad_halo = torch.zeros_like(left_context)
        for _, j, n in _shifted_taps(kernel, length):
            grad_halo[..., j:j + n].addcmul_(grad[..., :n], weight[:, j, None])
    if need_w:
        grad_w = torch.empty_like(weight)
        grad_w[:, -1] = _channel_dot(grad, x)
        for shift, j, n in _shifted_taps(kernel, length):
            tap = grad.new_zeros(weight.shape[0])
            if shift < length:  # a sequence shorter than the tap reads it only from the halo
                tap += _channel_dot(grad[..., shift:], x[..., :length - shift])
            if left_context is not None:
                tap += _channel_dot(grad[..., :n], left_context[..., j:j + n])
            grad_w[:, j] = tap
    return grad_x, grad_w, grad_halo


class _CausalDepthwiseConv1d(torch.autograd.Function):
    """``causal_depthwise_conv1d`` with its backward written out (autograd through in-place
    slice updates would copy the full gradient per tap). Short filters run as shifted taps,
    long ones (``K >= BLOCKED_MIN_TAPS``) as blocked Toeplitz matmuls (`hyena_cp.ops.toeplitz_conv`).
    Packed documents: the cross-document terms (`_CrossTaps`) are subtracted after the
    unmasked conv, and their adjoints after the unmasked backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, left_context, positions):
        kernel = weight.shape[1]
        y = (blocked_causal_conv1d if kernel >= BLOCKED_MIN_TAPS else _shifted_conv)(x, weight, bias, left_context)
        cross = None if positions is None else _CrossTaps(positions, kernel)
        if cross is not None:
            n, t, j, src = cross.seq
            _subtract_taps(y, n, t, src, j, x, weight)
            if left_context is not None:
                n, t, j, src = cross.halo
                _subtract_taps(y, n, t, src, j, left_context, weight)
        ctx.save_for_backward(x, weight, left_context)
        ctx.has_bias, ctx.cross = bias is not None, cross
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, left_context = ctx.saved_tensors
        grad = grad.contiguous()
        cross = ctx.cross
        need_x, need_w, need_b, need_halo, _ = ctx.needs_input_grad
        need_halo = need_halo and left_context is not None
        unmasked = blocked_causal_conv1d_backward if weight.shape[1] >= BLOCKED_MIN_TAPS else _shifted_conv_backward
        grad_x, grad_w, grad_halo = unmasked(grad, x, weight, left_context, need_x, need_w, need_halo)
        grad_b = None
        if cross is not None:  # the adjoints of the subtracted cross-document terms
            n, t, j, src = cross.seq
            if need_x:
                _subtract_taps(grad_x, n, src, t, j, grad, weight)
            if need_w:
                _subtract_tap_grads(grad_w, n, t, src, j, grad, x)
            n, t, j, src = cross.halo
            if need_halo:
                _subtract_taps(grad_halo, n, src, t, j, grad, weight)
            if need_w and left_context is not None:
                _subtract_tap_grads(grad_w, n, t, src, j, grad, left_context)
        if need_b and ctx.has_bias:
            grad_b = grad.sum((0, 2))
        return grad_x, grad_w, grad_b, grad_halo, None


def depthwise_conv_nd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    boundaries: Sequence[str],
    before: torch.Tensor | None = None,
    after: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise conv over 1, 2 or 3 spatial axes with a boundary per axis (`hyena_cp.ops.boundary`):
    a causal axis reads the K-1 positions before an output (``weight[..., -1]`` on the current
    one), a linear axis is "same" with zero padding, a circular axis "same" with wrap-around.

    Args:
        x: ``[N, C, *S]`` (a block of the first axis, or the whole grid).
        weight: ``[C, *K]`` with K taps per axis (odd on linear and circular axes).
        bias: ``[C]`` or None.
        boundaries: one kind per spatial axis.
        before, after: the positions just outside this block along the FIRST axis
            (``[N, C, reach, *S[1:]]``, a halo, `short_conv_reach`), or None: then the first axis
            is padded by its own boundary (zeros, or its own other end when circular).

    Returns:
        ``[N, C, *S]`` in ``x``'s dtype.
    """
    dims = len(boundaries)
    if x.dim() != dims + 2 or weight.dim() != dims + 1:
        raise ValueError(f"depthwise_conv_nd expects x [N, C, *S] and weight [C, *K] with {dims} spatial axes; "
                         f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    padding = []  # per axis, the zeros the conv itself adds on both sides: no padded copy of x
    for axis, (b, taps) in enumerate(zip(boundaries, weight.shape[1:])):
        lo, hi = short_conv_reach(taps, b)
        dim = 2 + axis
        if axis == 0 and (before is not None or after is not None):
            x = torch.cat([t for t in (before, x, after) if t is not None], dim=dim)
        elif b == "circular":
            x = torch.cat([x.narrow(dim, x.shape[dim] - lo, lo), x, x.narrow(dim, 0, hi)], dim=dim)
        elif lo == hi:
            padding.append(lo)
            continue
        else:
            x = F.pad(x, (0, 0) * (x.dim() - 1 - dim) + (lo, hi))
        padding.append(0)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    return conv(x, weight.to(x.dtype).unsqueeze(1), None if bias is None else bias.to(x.dtype), padding=tuple(padding),
                groups=x.shape[1])


def depthwise_conv2d_same(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    rows_above: torch.Tensor | None = None,
    rows_below: torch.Tensor | None = None,
) -> torch.Tensor:
    """"Same" depthwise K x K conv (K odd) with zero padding, halo rows optional: the
    ``("linear", "linear")`` case of `depthwise_conv_nd` (``x [B, C, H, W]``, ``weight [C, K, K]``,
    ``rows_above``/``rows_below`` ``[B, C, K//2, W]`` or None for the grid edge's zeros)."""
    if (rows_above is None) != (rows_below is None):
        zeros = x.new_zeros(x.shape[0], x.shape[1], weight.shape[-2] // 2, x.shape[3])
        rows_above = zeros if rows_above is None else rows_above
        rows_below = zeros if rows_below is None else rows_below
    if rows_above is not None:
        rows_above, rows_below = rows_above.to(x.dtype), rows_below.to(x.dtype)
    return depthwise_conv_nd(x, weight, bias, ("linear", "linear"), rows_above, rows_below)
