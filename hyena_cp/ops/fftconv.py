"""FFT long convolutions (pure math, no process groups).

`fft_conv_nd` is THE long convolution: 1, 2 or 3 spatial axes, each with its own boundary
(causal, linear or circular, `hyena_cp.ops.boundary`). Causal and linear axes are zero-padded
to twice their length, so no output we keep sees a wrapped-around term; circular axes wrap by
definition. The 1-D causal case has its own entry, `fft_causal_conv1d`, the same math with a
hand-written adjoint, packed documents and the optional CUDA kernel. `fft_conv_nd_spectral` is
`fft_conv_nd` with the kernel given as its spectrum, which `kernel_spectrum` builds from a
generator's hidden features without forming the kernel. Both run in float32 (or
float64 if that is the input dtype) even under autocast, because bf16/fp16 FFTs lose most of the
signal of a long filter; the result is cast back to the input dtype. On CUDA the 1-D conv of
unpacked rows may run NVIDIA's subquadratic-ops-torch kernel instead (`hyena_cp.ops.kernels`:
when, and how to turn it off), still in float32; the code below is the reference.

Filters are per *group*: ``k`` has G rows with ``C % G == 0`` and channel c uses row
``c // (C/G)`` (G = C is one filter per channel). Groups are broadcast in the frequency
domain, so a filter shared by C/G channels is transformed once, not C/G times. A conditioned
kernel has one bank per sample, ``[B, G, *K]``. The skip term is ``y += D * u`` with ``D: [C]``.

Packed sequences (1-D, ``cu_seqlens``): the causal conv restarts at every document, so
each document sees the filter from tap 0 exactly as if it were convolved alone. Documents
are BUCKETED by padded length (`hyena_cp.ops.packing.DocumentBuckets`): a document of n
tokens is zero-padded to the smallest ``m = 2^a or 3*2^a >= n`` (< 1.5x padding) and the
documents of one bucket run as one batched FFT conv of length 2m against the filter's first
m taps. Cost per channel: sum over documents of O(m log m) <= O(L log L) whatever the number
of documents, plus one filter transform per bucket (at most 2 log2(L) buckets, each O(m log m)).
Why not one FFT per document (N small FFTs and filter transforms, a Python loop per
document) or one FFT of the whole row with a per-document correction (it does not exist:
a cross-document term of a long filter is as costly as the conv itself).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from hyena_cp.ops import kernels
from hyena_cp.ops.boundary import fft_extent, kernel_extent, kernel_offsets
from hyena_cp.ops.channels_last import channels_first_copy, copy_in_layout_of
from hyena_cp.ops.packing import DocumentBuckets, is_one_document_per_row

__all__ = ["fft_causal_conv1d", "fft_conv_nd", "fft_conv_nd_spectral", "kernel_spectrum", "fft_conv2d", "fft_size"]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # float64 stays float64 (the reference tests run in it); everything else runs in fp32.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def fft_size(n: int) -> int:
    """Padded FFT length for a length-``n`` linear convolution: 2n (no wrap-around)."""
    return 2 * n


def _grouped_product(u_f: torch.Tensor, k_f: torch.Tensor) -> torch.Tensor:
    """``u_f: [B, C, *F]`` times ``k_f: [G, *F]`` (shared by the batch) or ``[B, G, *F]`` (one
    filter bank per sample), with channel c using group c // (C/G)."""
    b, c = u_f.shape[:2]
    per_sample = k_f.dim() == u_f.dim()
    g = k_f.shape[1] if per_sample else k_f.shape[0]
    if g == c:  # one filter per channel: a plain broadcast product
        return u_f * k_f
    k_f = k_f.unsqueeze(2) if per_sample else k_f.unsqueeze(1)
    return (u_f.reshape(b, g, c // g, *u_f.shape[2:]) * k_f).reshape(u_f.shape)


def _check_groups(u: torch.Tensor, k: torch.Tensor) -> None:
    groups = k.shape[1] if k.dim() == u.dim() else k.shape[0]
    if groups < 1 or u.shape[1] % groups:
        raise ValueError(f"the filter's group count G={groups} must divide the channel count C={u.shape[1]}")


def fft_causal_conv1d(u: torch.Tensor, k: torch.Tensor, d: torch.Tensor | None = None, *,
                      cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Causal long convolution ``y[t] = sum_{s<=t} k[t-s] u[s] + D u[t]``.

    Args:
        u: ``[B, C, L]`` input, the full sequence (global, not a shard).
        k: ``[G, L]`` causal filters (G divides C), ``k[:, 0]`` multiplies the current token.
        d: ``[C]`` skip term, or None.
        cu_seqlens: packed documents ``[N+1]`` over the B rows laid end to end
            (`hyena_cp.ops.packing`; validated by the caller), or None. The sum then runs
            only over ``s`` in the document of ``t``: ``y[t] = sum_{start(t)<=s<=t} k[t-s] u[s]``.

    Returns:
        ``[B, C, L]`` in ``u``'s dtype. Padding to 2L (2m per document bucket) makes the
        circular FFT product equal the linear convolution on the outputs kept.
    """
    if u.dim() != 3 or k.dim() != 2 or k.shape[1] != u.shape[2]:
        raise ValueError(f"fft_causal_conv1d expects u [B, C, L] and k [G, L]; got u {tuple(u.shape)}, k {tuple(k.shape)}")
    _check_groups(u, k)
    seqlen = u.shape[-1]
    n = fft_size(seqlen)
    dtype = _compute_dtype(u, k)
    with torch.autocast(device_type=u.device.type, enabled=False):
        if cu_seqlens is None or is_one_document_per_row(cu_seqlens, u.shape[0] * seqlen, seqlen):
            # CUDA with subquadratic-ops-torch installed: its kernel (hyena_cp.ops.kernels), else ours
            u_c, k_c = u.to(dtype), k.to(dtype)
            y = kernels.fast_fft_causal_conv1d(u_c, k_c)
            if y is None:
                y = _FFTCausalConv1d.apply(u_c, k_c, n)
        else:
            y = _packed_causal_conv1d(u.to(dtype), k.to(dtype), cu_seqlens)
        if d is not None:
            y = y + u.to(dtype) * d.to(dtype)[:, None]
    return y.to(u.dtype)


def _packed_causal_conv1d(u: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``u [B, C, L]``, ``k [G, L]`` -> ``[B, C, L]``, each document convolved alone: gather the
    documents of each bucket into ``[N_b, C, m]`` (zeros past a document's end), run the one
    FFT conv on them, put every token back (the gathers' adjoints are autograd's index_add_)."""
    batch, _, length = u.shape
    buckets = DocumentBuckets.build(cu_seqlens.to(u.device), batch * length)
    flat = F.pad(rearrange(u, "b c l -> c (b l)"), (0, 1))  # C, B*L + the zero slot
    # index_select (its adjoint: one index_add_, ~3x faster on CPU than advanced indexing's
    # accumulating index_put_), and split, not slices (adjoint: one cat, not a zero tensor per slice)
    slots = flat.index_select(1, buckets.gather)  # C, slots of every bucket
    pieces = slots.split([m * n for m, n in zip(buckets.lengths, buckets.counts)], dim=1)
    outs = []
    for m, piece in zip(buckets.lengths, pieces):
        docs = rearrange(piece, "c (n m) -> n c m", m=m)
        y = _FFTCausalConv1d.apply(docs, k[:, :m], fft_size(m))  # n, C, m
        outs.append(rearrange(y, "n c m -> c (n m)"))
    y = torch.cat(outs, dim=1).index_select(1, buckets.scatter)  # C, B*L
    return rearrange(y, "c (b l) -> b c l", b=batch)


class _FFTCausalConv1d(torch.autograd.Function):
    """``irfft(rfft(u, n) * rfft(k, n), n)[..., :L]`` with its adjoint written out: both
    gradients are the same FFT product against the conjugated spectra, cut to ``[:L]`` (the
    other half of the 2L padding holds the zeros that stop wrap-around). Autograd would
    instead zero-pad the gradient to n and run a full complex FFT for ``rfft``'s backward.
    Saves the two spectra, as autograd's product would. ``k`` may have fewer taps than ``u``
    has tokens (a document bucket longer than the filter): the missing taps are zeros."""

    @staticmethod
    def forward(ctx, u, k, n):
        seqlen = u.shape[-1]
        u_f = torch.fft.rfft(u, n=n)
        k_f = torch.fft.rfft(k, n=n)
        ctx.save_for_backward(u_f, k_f)
        ctx.n, ctx.taps = n, k.shape[-1]
        return torch.fft.irfft(_grouped_product(u_f, k_f), n=n)[..., :seqlen]

    @staticmethod
    def backward(ctx, grad):
        u_f, k_f = ctx.saved_tensors
        n, seqlen = ctx.n, grad.shape[-1]
        g_f = torch.fft.rfft(grad, n=n)
        grad_u = grad_k = None
        if ctx.needs_input_grad[0]:
            grad_u = torch.fft.irfft(_grouped_product(g_f, k_f.conj()), n=n)[..., :seqlen]
        if ctx.needs_input_grad[1]:
            b, c, f = g_f.shape
            groups = k_f.shape[0]
            k_grad_f = (g_f * u_f.conj()).reshape(b, groups, c // groups, f).sum((0, 2))  # G, F
            grad_k = torch.fft.irfft(k_grad_f, n=n)[..., :ctx.taps]
        return grad_u, grad_k, None


def fft_conv_nd(u: torch.Tensor, k: torch.Tensor, d: torch.Tensor | None, boundaries: Sequence[str]) -> torch.Tensor:
    """N-D long convolution with a boundary per axis: ``y = sum_m k[i - m] u[m] + D u[i]``.

    Per axis of size ``n`` (`hyena_cp.ops.boundary`): ``causal`` sums ``m <= i`` (kernel offsets
    ``0..n-1``), ``linear`` sums every ``m`` of the grid with zero padding outside it (offsets
    ``-(n-1)..n-1``), ``circular`` sums every ``m`` with ``i - m`` taken modulo ``n`` (``n``
    offsets, `circular_offsets`). Axes combine freely (causal time x circular space). Causal and
    linear axes are zero-padded to ``2n`` so no output sees a wrapped term; circular axes run at
    ``n``, where the wrap IS the boundary.

    Args:
        u: ``[B, C, *S]``, the full grid (global, not a shard).
        k: ``[G, *K]`` filters shared by the batch, or ``[B, G, *K]`` one bank per sample (a
            conditioned kernel), in offset layout (`kernel_offsets`: ``K = kernel_extent(n, b)``).
            G divides C; channel c uses group ``c // (C/G)``.
        d: ``[C]`` skip term, or None.
        boundaries: one of ``"causal"``, ``"linear"``, ``"circular"`` per spatial axis.

    Returns:
        ``[B, C, *S]`` in ``u``'s dtype, computed in float32 (float64 for float64 inputs).
    """
    sizes = tuple(u.shape[2:])
    dims = len(sizes)
    boundaries = tuple(boundaries)
    if len(boundaries) != dims or k.dim() not in (dims + 1, dims + 2) or (k.dim() == dims + 2 and k.shape[0] != u.shape[0]):
        raise ValueError(f"fft_conv_nd expects u [B, C, *S] with one boundary per axis of S and k [G, *K] or "
                         f"[B, G, *K]; got u {tuple(u.shape)}, k {tuple(k.shape)}, boundaries {boundaries}")
    want = tuple(kernel_extent(n, b) for n, b in zip(sizes, boundaries))
    if tuple(k.shape[-dims:]) != want:
        raise ValueError(f"fft_conv_nd: the kernel's taps {tuple(k.shape[-dims:])} must be {want} for a grid "
                         f"{sizes} with boundaries {boundaries} (per axis: causal n, linear 2n-1, circular n if odd, n-1 if even)")
    _check_groups(u, k)
    extents = tuple(fft_extent(n, b) for n, b in zip(sizes, boundaries))
    dtype = _compute_dtype(u, k)
    with torch.autocast(device_type=u.device.type, enabled=False):
        k = _fft_layout(k.to(dtype), sizes, boundaries)
        y = _FFTConvND.apply(u.to(dtype), k, None if d is None else d.to(dtype), extents,
                             _window_starts(sizes, boundaries), False)
    return y.to(u.dtype)


def kernel_spectrum(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, taps: Sequence[int],
                    sizes: Sequence[int], boundaries: Sequence[str]) -> torch.Tensor:
    """The spectrum `fft_conv_nd_spectral` takes, of the kernel ``k = weight @ h^T + bias`` (a generator's
    output layer over its last hidden features), for a conv of a grid ``sizes`` with ``boundaries``.

    The transform is linear, so ``rfftn(k) = weight @ rfftn(h^T) + bias * rfftn(1)``: W + 1 transforms
    of the features instead of G of the kernel, and the kernel itself is never formed (a per-channel
    filter has G = C, e.g. 256, while W is the generator's width, e.g. 32). Its gradient needs no
    inverse transform of the kernel either. The ``1`` is one on the kernel's taps only, laid out (and,
    on a circular axis, rolled) like every other feature, so ``bias`` lands on exactly the kernel's taps.

    Args:
        h: ``[N, W]`` or ``[B, N, W]`` features at the N taps, row-major over ``taps`` (``K`` per axis,
            `kernel_extent` of ``sizes`` and ``boundaries``).
        weight, bias: ``[G, W]``, ``[G]`` (or None): the output layer's, for the groups wanted.

    Returns:
        ``[G, *F]`` or ``[B, G, *F]``, complex64 (complex128 for float64 inputs), ``F`` the one-sided
        FFT grid of `fft_conv_nd`.
    """
    dims, taps = len(sizes), tuple(taps)
    if taps != tuple(kernel_extent(n, b) for n, b in zip(sizes, boundaries)) or len(boundaries) != dims \
            or h.dim() not in (2, 3) or h.shape[-2] != math.prod(taps) or weight.shape[-1] != h.shape[-1]:
        raise ValueError(f"kernel_spectrum expects h [N, W] or [B, N, W] at the taps of a grid {tuple(sizes)} with "
                         f"boundaries {tuple(boundaries)} and weight [G, W]; got h {tuple(h.shape)}, taps {taps}, "
                         f"weight {tuple(weight.shape)}")
    dtype = _compute_dtype(h, weight)  # bf16 has no FFT, and would lose the long filter's tail
    h, weight = h.to(dtype), weight.to(dtype)
    if bias is not None:  # a constant feature carries the bias through the same product
        h = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)
        weight = torch.cat([weight, bias.to(dtype)[:, None]], dim=1)
    feats = h.transpose(-1, -2).reshape(*h.shape[:-2], h.shape[-1], *taps)  # [B,] W(+1), *K
    feats = _fft_layout(feats, sizes, boundaries)
    extents = tuple(fft_extent(n, b) for n, b in zip(sizes, boundaries))
    feats_f = torch.fft.rfftn(feats, s=extents, dim=tuple(range(-dims, 0)))  # [B,] W(+1), *F
    # a real matmul over the (re, im) pairs: the weights are real, a complex matmul would do twice the work
    k_f = torch.matmul(weight, torch.view_as_real(feats_f).flatten(-dims - 1))  # [B,] G, prod(F)*2
    return torch.view_as_complex(k_f.unflatten(-1, (*feats_f.shape[-dims:], 2)))


def fft_conv_nd_spectral(u: torch.Tensor, k_f: torch.Tensor, d: torch.Tensor | None,
                         boundaries: Sequence[str]) -> torch.Tensor:
    """`fft_conv_nd` with the kernel given as its spectrum ``k_f`` (`kernel_spectrum`: ``[G, *F]`` or
    ``[B, G, *F]`` complex, the one-sided FFT grid of ``u``'s grid ``[B, C, *S]`` and ``boundaries``);
    the same result, in ``u``'s dtype, computed in float32 (float64 when ``u`` or ``k_f`` is double)."""
    sizes = tuple(u.shape[2:])
    dims = len(sizes)
    boundaries = tuple(boundaries)
    extents = tuple(fft_extent(n, b) for n, b in zip(sizes, boundaries))
    want = (*extents[:-1], extents[-1] // 2 + 1)
    if len(boundaries) != dims or not k_f.is_complex() or tuple(k_f.shape[-dims:]) != want \
            or k_f.dim() not in (dims + 1, dims + 2) or (k_f.dim() == dims + 2 and k_f.shape[0] != u.shape[0]):
        raise ValueError(f"fft_conv_nd_spectral expects u [B, C, *S] with one boundary per axis and a complex k_f "
                         f"[G, *F] or [B, G, *F] with F={want}; got u {tuple(u.shape)}, k_f {tuple(k_f.shape)}, "
                         f"boundaries {boundaries}")
    _check_groups(u, k_f)
    dtype = torch.float64 if torch.float64 in (u.dtype, k_f.real.dtype) else torch.float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        k_f = k_f.to(torch.complex128 if dtype == torch.float64 else torch.complex64)
        y = _FFTConvND.apply(u.to(dtype), k_f, None if d is None else d.to(dtype), extents,
                             _window_starts(sizes, boundaries), True)
    return y.to(u.dtype)


def _irfftn_window(x_f: torch.Tensor, extents: Sequence[int], starts: Sequence[int],
                   sizes: Sequence[int]) -> torch.Tensor:
    """``irfftn(x_f, s=extents)[window]`` with the window ``[start, start + size)`` per axis, computing
    only what the window needs: after each axis's inverse transform the other positions are dropped,
    so the next axes (and the final real transform, the last axis) run on the window's rows alone.
    Returns a view into the last transform's output."""
    dims = len(extents)
    for axis in range(dims - 1):
        dim = axis - dims
        x_f = torch.fft.ifft(x_f, dim=dim).narrow(dim, starts[axis], sizes[axis])
    return torch.fft.irfft(x_f, n=extents[-1], dim=-1).narrow(-1, starts[-1], sizes[-1])


def _group_sum(g_f: torch.Tensor, u_f: torch.Tensor, groups: int, per_sample: bool) -> torch.Tensor:
    """The kernel gradient's spectrum: ``g_f * conj(u_f)`` summed over the channels of each group
    (and over the batch for a shared kernel): ``[G, *F]`` or ``[B, G, *F]``."""
    prod = g_f * u_f.conj()
    b, c = prod.shape[:2]
    if groups != c:
        prod = prod.reshape(b, groups, c // groups, *prod.shape[2:]).sum(2)
    return prod if per_sample else prod.sum(0)


def _in_layout_of(ref: torch.Tensor, y: torch.Tensor, d: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``y + d * x`` (``d`` per channel, or just ``y``) in a new tensor with ``ref``'s memory layout: the
    conv hands its output (and ``u``'s gradient) back in the layout its input came in, so a
    channels-last caller stays channels last; ``x`` has that layout too."""
    out = copy_in_layout_of(ref, y)
    return out if d is None else out.addcmul_(x, d.reshape(-1, *([1] * (y.dim() - 2))))


class _FFTConvND(torch.autograd.Function):
    """``y = irfftn(rfftn(u) * rfftn(k))[window] + d * u`` with its adjoint written out: both gradients
    are the same product against the conjugated spectra, ``g`` being zero-embedded at the window
    (`_FFTCausalConv1d` is the 1-D causal case). Autograd would instead run ``rfftn``'s backward as a
    full complex FFT of a zero-padded complex gradient, twice. The inverse transforms compute only the
    rows their window keeps (`_irfftn_window`), and ``u`` (and ``g``) are transformed from a contiguous
    copy: a channels-last tensor transforms ~2x slower, and the copy is cheap next to it. Saves the two
    spectra (as autograd's product would) and ``u`` when ``d`` needs a gradient. With ``spectral`` the
    kernel comes as its spectrum (`fft_conv_nd_spectral`) and so does its gradient (`_spectrum_grad`)."""

    @staticmethod
    def forward(ctx, u, k, d, extents, starts, spectral):
        dims = len(extents)
        axes = tuple(range(-dims, 0))
        sizes = tuple(u.shape[-dims:])
        u_f = torch.fft.rfftn(channels_first_copy(u), s=extents, dim=axes)
        k_f = k if spectral else torch.fft.rfftn(k, s=extents, dim=axes)
        y = _irfftn_window(_grouped_product(u_f, k_f), extents, starts, sizes)
        keep_u = d is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(u_f, k_f, d, u if keep_u else None)
        ctx.extents, ctx.starts, ctx.sizes, ctx.taps = extents, starts, sizes, None if spectral else tuple(k.shape[-dims:])
        return _in_layout_of(u, y, d, u)

    @staticmethod
    def backward(ctx, grad):
        u_f, k_f, d, u = ctx.saved_tensors
        extents, starts, sizes = ctx.extents, ctx.starts, ctx.sizes
        dims = len(extents)
        zero = (0,) * dims
        embedded = grad.new_zeros(*grad.shape[:2], *extents)  # the adjoint of the window: g at its place, zeros around
        embedded[(..., *(slice(s, s + n) for s, n in zip(starts, sizes)))] = channels_first_copy(grad)
        g_f = torch.fft.rfftn(embedded, dim=tuple(range(-dims, 0)))
        grad_u = grad_k = grad_d = None
        if ctx.needs_input_grad[0]:
            grad_u = _in_layout_of(grad, _irfftn_window(_grouped_product(g_f, k_f.conj()), extents, zero, sizes), d, grad)
        if ctx.needs_input_grad[1]:
            per_sample = k_f.dim() == u_f.dim()
            groups = k_f.shape[1] if per_sample else k_f.shape[0]
            grad_k = _group_sum(g_f, u_f, groups, per_sample)
            grad_k = _spectrum_grad(grad_k, extents) if ctx.taps is None else _irfftn_window(grad_k, extents, zero, ctx.taps)
        if u is not None:
            grad_d = (grad * u).sum(dim=(0, *range(2, 2 + dims)))
        return grad_u, grad_k, grad_d, None, None, None


def _spectrum_grad(grad_f: torch.Tensor, extents: Sequence[int]) -> torch.Tensor:
    """The gradient w.r.t. a kernel GIVEN as its one-sided spectrum ``X`` (``spectral``), from
    ``grad_f = rfftn(g) * conj(u_f)`` summed like the kernel (`_group_sum`).

    ``irfftn`` reads ``X`` as ``x[n] = 1/N sum_f c_f Re(X[f] e^{2 pi i f.n/N})`` (N = prod(extents)), where
    ``c_f = 2`` for a last-axis bin that also stands for its conjugate twin and 1 for the DC bin and,
    for an even last extent, the Nyquist bin. So ``dL/dRe X + i dL/dIm X = c_f/N rfftn(dL/dx)``: autograd's
    convention for a complex input, which the real-linear ops before it (`kernel_spectrum`) chain."""
    weight = torch.full((grad_f.shape[-1],), 2.0 / math.prod(extents), dtype=grad_f.real.dtype, device=grad_f.device)
    weight[0] /= 2
    if extents[-1] % 2 == 0:  # the Nyquist bin of an even axis stands once too
        weight[-1] /= 2
    return grad_f * weight  # one pass over the spectrum


def _fft_layout(k: torch.Tensor, sizes: Sequence[int], boundaries: Sequence[str]) -> torch.Tensor:
    """A kernel in offset layout ``[..., *K]`` made ready for the FFT product.

    A circular axis rolls the kernel so offset ``o`` sits at index ``o mod n`` (the product is then
    the conv itself). A causal or linear axis leaves the kernel as it is (`rfftn` zero-pads it) and
    shifts the OUTPUT window instead (`_window_starts`): with offset ``first`` at index 0, ``y[i]`` is
    the product at ``i - first``, and the 2n padding keeps that window free of wrapped terms. Cropping
    the output is a view, while rolling a padded kernel copies it twice — and the kernel is ``2^dims``
    times the size of a channel's grid."""
    dims = len(sizes)
    for axis, (n, b) in enumerate(zip(sizes, boundaries)):
        if b == "circular":
            first, dim = kernel_offsets(n, b)[0], k.dim() - dims + axis
            k = F.pad(k, (0, 0) * (k.dim() - 1 - dim) + (0, n - k.shape[dim]))
            k = torch.roll(k, shifts=first, dims=dim) if first else k
    return k


def _window_starts(sizes: Sequence[int], boundaries: Sequence[str]) -> tuple[int, ...]:
    """Where each axis's output starts in the FFT product of a kernel laid out by `_fft_layout`."""
    return tuple(0 if b == "circular" else -kernel_offsets(n, b)[0] for n, b in zip(sizes, boundaries))


def fft_conv2d(u: torch.Tensor, k: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """Global, centred 2-D convolution ``y[i,j] = sum_{m,n} k[i-m, j-n] u[m,n] + D u[i,j]``: the
    ``("linear", "linear")`` case of `fft_conv_nd` (``u [B, C, H, W]``, ``k [G, 2H-1, 2W-1]`` with
    offset (0, 0) at index (H-1, W-1)): every output sees every input of the grid, zero padding
    outside it. Centred, not corner-anchored, because images have no preferred direction."""
    if u.dim() != 4 or k.dim() not in (3, 4):
        raise ValueError(f"fft_conv2d expects u [B, C, H, W] and k [G, 2H-1, 2W-1]; got u {tuple(u.shape)}, k {tuple(k.shape)}")
    return fft_conv_nd(u, k, d, ("linear", "linear"))
