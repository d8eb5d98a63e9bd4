"""FFT long convolutions (pure math, no process groups).

Both convolutions are *linear* (never circular): inputs are zero-padded so that no output
we keep sees a wrapped-around term. They run in float32 (or float64 if that is the input
dtype) even under autocast, because bf16/fp16 FFTs lose most of the signal of a long
filter; the result is cast back to the input dtype. On CUDA the 1-D conv of unpacked rows may
run NVIDIA's subquadratic-ops-torch kernel instead (`hyena_cp.ops.kernels`: when, and how to
turn it off), still in float32; the code below is the reference.

Filters are per *group*: ``k`` has G rows with ``C % G == 0`` and channel c uses row
``c // (C/G)`` (G = C is one filter per channel). Groups are broadcast in the frequency
domain, so a filter shared by C/G channels is transformed once, not C/G times. The skip
term is ``y += D * u`` with ``D: [C]``.

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

import torch
import torch.nn.functional as F
from einops import rearrange

from hyena_cp.ops import kernels
from hyena_cp.ops.packing import DocumentBuckets, is_one_document_per_row

__all__ = ["fft_causal_conv1d", "fft_conv2d", "centered_to_circular", "fft_size"]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # float64 stays float64 (the reference tests run in it); everything else runs in fp32.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def fft_size(n: int) -> int:
    """Padded FFT length for a length-``n`` linear convolution: 2n (no wrap-around)."""
    return 2 * n


def _grouped_product(u_f: torch.Tensor, k_f: torch.Tensor) -> torch.Tensor:
    """``u_f: [B, C, *F]`` times ``k_f: [G, *F]`` with channel c using group c // (C/G)."""
    b, c = u_f.shape[:2]
    g = k_f.shape[0]
    return (u_f.reshape(b, g, c // g, *u_f.shape[2:]) * k_f.unsqueeze(1)).reshape(u_f.shape)


def _check_groups(u: torch.Tensor, k: torch.Tensor) -> None:
    if k.shape[0] < 1 or u.shape[1] % k.shape[0]:
        raise ValueError(f"the filter's group count G={k.shape[0]} must divide the channel count C={u.shape[1]}")


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


def centered_to_circular(k: torch.Tensor, n_h: int, n_w: int) -> torch.Tensor:
    """Place a centred ``[..., 2H-1, 2W-1]`` kernel on an ``n_h x n_w`` circular grid.

    Offset ``(dy, dx)`` (kernel index ``(dy + H-1, dx + W-1)``) goes to ``(dy mod n_h,
    dx mod n_w)``, so the kernel centre sits at index (0, 0) and the convolution output
    needs no shift. With ``n_h >= 2H-1`` the offsets land on distinct cells.
    """
    kh, kw = k.shape[-2:]
    h, w = (kh + 1) // 2, (kw + 1) // 2
    padded = torch.nn.functional.pad(k, (0, n_w - kw, 0, n_h - kh))
    return torch.roll(padded, shifts=(-(h - 1), -(w - 1)), dims=(-2, -1))


def fft_conv2d(u: torch.Tensor, k: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """Global, centred 2-D convolution ``y[i,j] = sum_{m,n} k[i-m, j-n] u[m,n] + D u[i,j]``.

    The kernel is *centred*: ``k`` has shape ``[C, 2H-1, 2W-1]`` and index ``(H-1, W-1)`` is
    offset (0, 0), so every output position sees every input position of the grid (a
    non-causal global conv, translation-equivariant, with zero padding outside the grid).
    We chose centred over corner-anchored because images have no preferred direction.

    Args:
        u: ``[B, C, H, W]`` the full grid (global, not a row shard).
        k: ``[G, 2H-1, 2W-1]`` centred filters (G divides C).
        d: ``[C]`` skip term, or None.

    Returns:
        ``[B, C, H, W]`` in ``u``'s dtype. Padding to ``2H x 2W`` avoids circular wrap-around.
    """
    if u.dim() != 4 or k.dim() != 3:
        raise ValueError(f"fft_conv2d expects u [B, C, H, W] and k [G, 2H-1, 2W-1]; got u {tuple(u.shape)}, k {tuple(k.shape)}")
    h, w = u.shape[-2:]
    if k.shape[1:] != (2 * h - 1, 2 * w - 1):
        raise ValueError(f"fft_conv2d: k must be [G, 2H-1, 2W-1] = [G, {2 * h - 1}, {2 * w - 1}], got {tuple(k.shape)}")
    _check_groups(u, k)
    n_h, n_w = fft_size(h), fft_size(w)
    dtype = _compute_dtype(u, k)
    with torch.autocast(device_type=u.device.type, enabled=False):
        u_f = torch.fft.rfft2(u.to(dtype), s=(n_h, n_w))
        k_f = torch.fft.rfft2(centered_to_circular(k.to(dtype), n_h, n_w))
        y = torch.fft.irfft2(_grouped_product(u_f, k_f), s=(n_h, n_w))[..., :h, :w]
        if d is not None:
            y = y + u.to(dtype) * d.to(dtype)[:, None, None]
    return y.to(u.dtype)
