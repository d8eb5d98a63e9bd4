"""Layout changes whose backward is as cheap as their forward (pure math, no process groups)."""
from __future__ import annotations

import torch

__all__ = ["channels_last", "lies_channels_last", "channels_first_copy", "copy_in_layout_of"]


class _ChannelsLast(torch.autograd.Function):
    """``y.movedim(1, -1)`` as a contiguous copy, and a contiguous copy back in backward (none for a
    channels-last ``y``, below).

    The Hyena core works channels first (the FFT runs along the contiguous last dim) and the
    norm and out_proj channels last. A plain ``movedim`` view would make the norm copy in
    forward anyway, but hand backward a transposed VIEW of the norm's gradient: every
    elementwise gradient op of the gating (and the FFT conv's backward) would then read one
    operand across the grain, which at 16k tokens made the eager backward ~20 % slower than
    one explicit transposing copy (measured side by side with the view; the fp32 layer,
    forward + backward, 2-core CPU). Under
    ``torch.compile`` the copies fuse into the neighbouring kernels (no measured change).

    A ``y`` that already lies channels last in memory (a grid's Hyena works channels last: the
    projection's output, the short conv's, the FFT conv's) needs no copy either way: its gradient
    is handed back as the matching channels-first view of the channels-last gradient.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        out = y.movedim(1, -1)
        ctx.already = out.is_contiguous()
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.movedim(-1, 1)
        return grad if ctx.already else grad.contiguous()


def channels_last(y: torch.Tensor) -> torch.Tensor:
    """``[B, C, *S] -> [B, *S, C]`` contiguous; its gradient comes back in ``y``'s memory layout (a
    contiguous channels-first copy, or a view when ``y`` lies channels last)."""
    return _ChannelsLast.apply(y)


def lies_channels_last(t: torch.Tensor) -> bool:
    """True when ``t [B, C, *S]`` is a channels-first view of dense channels-last memory."""
    return t.dim() > 2 and not t.is_contiguous() and t.movedim(1, -1).is_contiguous()


def _transpose_into(out: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out.copy_(src)`` for a ``[rows, cols]`` contiguous ``out`` and a transposed contiguous
    ``src``, one sample at a time: torch's blocked 2-D transpose copy, ~2-3x faster on CPU than the
    general strided copy it uses for the same permutation of a 4-D or 5-D tensor."""
    for b in range(out.shape[0]):
        out[b].copy_(src[b])
    return out


def channels_first_copy(t: torch.Tensor) -> torch.Tensor:
    """``t [B, C, *S]`` as a contiguous tensor (``t.contiguous()``), fast for a channels-last ``t``."""
    if not lies_channels_last(t) or torch.compiler.is_compiling():
        return t.contiguous()
    b, c = t.shape[:2]
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    _transpose_into(out.view(b, c, -1), t.movedim(1, -1).reshape(b, -1, c).transpose(1, 2))
    return out


def copy_in_layout_of(ref: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A copy of ``y [B, C, *S]`` with ``ref``'s memory layout (``empty_like(ref).copy_(y)``), fast when
    ``ref`` lies channels last and ``y`` does not."""
    out = torch.empty_like(ref)
    if not lies_channels_last(out) or lies_channels_last(y) or torch.compiler.is_compiling():
        return out.copy_(y)
    b, c = y.shape[:2]
    src = y.contiguous().view(b, c, -1).transpose(1, 2)  # a window view: one straight copy, then the transpose
    _transpose_into(out.movedim(1, -1).view(b, -1, c), src)
    return out
