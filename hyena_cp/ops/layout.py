"""Layout changes whose backward is as cheap as their forward (pure math, no process groups)."""
from __future__ import annotations

import torch

__all__ = ["channels_last"]


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
