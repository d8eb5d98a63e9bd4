"""Boundary conditions of one spatial axis: what a convolution sees beyond the grid's edge.

Three kinds, chosen per axis (pure index arithmetic, shared by the long FFT conv, the short
conv, the filter grid and the halo plan):

- ``"causal"``: an output sees itself and what precedes it; zeros before the start. Long-conv
  kernel offsets ``0..n-1``; short conv of K taps looks K-1 back.
- ``"linear"``: an output sees the whole axis, zeros outside it (a centred, global,
  translation-equivariant conv). Long-conv offsets ``-(n-1)..n-1``; short conv "same", K odd.
- ``"circular"``: the axis is periodic, position ``-1`` is position ``n-1``. Long-conv offsets:
  one period, `circular_offsets`; short conv "same" with wrap-around, K odd.
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["BOUNDARIES", "check_boundaries", "kernel_extent", "fft_extent", "kernel_offsets", "circular_offsets",
           "short_conv_reach"]

BOUNDARIES = ("causal", "linear", "circular")


def check_boundaries(boundaries: Sequence[str], spatial_dims: int) -> tuple[str, ...]:
    """``boundaries`` as a tuple with one known kind per spatial axis, else ``ValueError``."""
    boundaries = tuple(boundaries)
    if len(boundaries) != spatial_dims or any(b not in BOUNDARIES for b in boundaries):
        raise ValueError(f"boundary={boundaries!r} must give one of {list(BOUNDARIES)} per spatial axis "
                         f"({spatial_dims} axes), e.g. ('causal', 'circular', 'circular') for causal time x periodic space")
    return boundaries


def circular_offsets(n: int) -> range:
    """The offsets of one period, symmetric about 0: ``-(n-1)//2 .. (n-1)//2``. An odd period has n
    taps, one per residue; an even one has n-1: the residue ``n/2`` (which is also ``-n/2``) gets no
    tap, so the kernel stays symmetric in the offset (the convention of nvSubquadratic's circular
    convs, whose kernels convert exactly)."""
    return range(-((n - 1) // 2), (n - 1) // 2 + 1)


def kernel_offsets(n: int, boundary: str) -> range:
    """Offsets ``i - m`` of the long-conv kernel's taps along an axis of ``n`` positions, in the
    order the kernel stores them (index 0 first)."""
    if boundary == "causal":
        return range(0, n)
    if boundary == "linear":
        return range(-(n - 1), n)
    if boundary == "circular":
        return circular_offsets(n)
    raise ValueError(f"boundary={boundary!r} is not one of {list(BOUNDARIES)}")


def kernel_extent(n: int, boundary: str) -> int:
    """Taps of the long-conv kernel along an axis of ``n`` positions."""
    return len(kernel_offsets(n, boundary))


def fft_extent(n: int, boundary: str) -> int:
    """FFT length along the axis: ``2n`` for causal and linear (no output sees a wrapped term),
    ``n`` for circular (the wrap is the boundary)."""
    return n if boundary == "circular" else 2 * n


def short_conv_reach(kernel_size: int, boundary: str) -> tuple[int, int]:
    """Positions a short conv of ``kernel_size`` taps reads ``(before, after)`` an output."""
    if boundary == "causal":
        return kernel_size - 1, 0
    if kernel_size % 2 != 1:
        raise ValueError(f"short_kernel_size={kernel_size} must be odd along a {boundary!r} axis (a centred "
                         f"'same' conv); use an odd size, or a causal boundary")
    return kernel_size // 2, kernel_size // 2
