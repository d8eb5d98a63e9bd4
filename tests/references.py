"""Direct (non-FFT) float64 references, one per piece of math, used by the tests."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def direct_causal_conv1d(u: torch.Tensor, k: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """``u [B, C, L]``, ``k [C, L]``: y[t] = sum_{s<=t} k[t-s] u[s] (+ d u) by F.conv1d with full padding."""
    seqlen = u.shape[-1]
    y = F.conv1d(F.pad(u, (seqlen - 1, 0)), k.flip(-1).unsqueeze(1), groups=u.shape[1])
    return y if d is None else y + u * d[:, None]


def direct_conv2d_centered(u: torch.Tensor, k: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """``u [B, C, H, W]``, ``k [C, 2H-1, 2W-1]`` centred: y[i,j] = sum k[i-m+H-1, j-n+W-1] u[m,n] (+ d u)."""
    h, w = u.shape[-2:]
    y = F.conv2d(u, k.flip(-2, -1).unsqueeze(1), padding=(h - 1, w - 1), groups=u.shape[1])
    return y if d is None else y + u * d[:, None, None]


def expand_groups(k: torch.Tensor, channels: int) -> torch.Tensor:
    """``[G, ...]`` group filters -> ``[channels, ...]``: channel c uses group c // (channels/G)."""
    return k.repeat_interleave(channels // k.shape[0], dim=0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _tap_index(n: int, boundary: str) -> torch.Tensor:
    """``[n, n]``: for output i and input m, the kernel index of offset ``i - m`` along an axis of
    ``n`` positions, or -1 where the boundary gives no term (written from the definitions in
    `hyena_cp.ops.boundary`, not from its helpers)."""
    i = torch.arange(n)[:, None]
    m = torch.arange(n)[None, :]
    o = i - m
    if boundary == "causal":
        return torch.where(o >= 0, o, -1)
    if boundary == "linear":
        return o + n - 1
    wrapped = (o + n // 2) % n - n // 2  # the representative of i - m modulo n in [-n//2, n//2)
    index = wrapped + (n - 1) // 2  # taps -(n-1)//2 .. (n-1)//2: an even period's -n/2 has none
    return torch.where(index >= 0, index, -1)


def direct_conv_nd(u: torch.Tensor, k: torch.Tensor, d: torch.Tensor | None, boundaries) -> torch.Tensor:
    """``y[b, c, i] = sum_m k[c, idx(i - m)] u[b, c, m] (+ d u)`` over 1-3 axes with a boundary each, as an
    explicit sum over every (output, input) pair: ``u [B, C, *S]``, ``k [C, *K]`` or ``[B, C, *K]``."""
    sizes = u.shape[2:]
    dims = len(sizes)
    per_sample = k.dim() == u.dim()
    kk = k if per_sample else k.unsqueeze(0).expand(u.shape[0], *k.shape)
    kk = torch.nn.functional.pad(kk, (0, 1) * dims)  # index -1 reads an appended zero
    index = [_tap_index(n, b) for n, b in zip(sizes, boundaries)]
    # gather the kernel into T[b, c, i0, m0, i1, m1, ...]
    t = kk
    for axis, idx in enumerate(index):
        dim = 2 + 2 * axis
        n = idx.shape[0]
        t = t.index_select(dim, idx.reshape(-1) % t.shape[dim]).unflatten(dim, (n, n))  # -1: the zero
    letters = "ijklmn"[: dims], "pqrstu"[: dims]
    pairs = "".join(a + b for a, b in zip(*letters))
    y = torch.einsum(f"bc{pairs},bc{letters[1]}->bc{letters[0]}", t, u)
    return y if d is None else y + u * d.reshape(-1, *([1] * dims))


def direct_short_conv_nd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, boundaries) -> torch.Tensor:
    """``y[i] = sum_j w[j] x[i + j - before]`` per axis (before = K-1 on a causal axis, K//2 otherwise),
    zeros outside the grid, or the axis's other end on a circular axis: a loop over the taps."""
    dims = len(boundaries)
    taps = w.shape[1:]
    y = torch.zeros_like(x)
    for j in itertools.product(*[range(t) for t in taps]):
        shifted = x
        for axis, (jj, kk, bd) in enumerate(zip(j, taps, boundaries)):
            before = kk - 1 if bd == "causal" else kk // 2
            s = jj - before  # read x[i + s]
            dim = 2 + axis
            shifted = torch.roll(shifted, -s, dims=dim)
            if bd != "circular" and s:
                n = x.shape[dim]
                pos = torch.arange(n).reshape(-1, *([1] * (x.dim() - dim - 1)))
                shifted = shifted * ((pos + s >= 0) & (pos + s < n)).to(x.dtype)
        y = y + shifted * w[(slice(None), *j)].reshape(-1, *([1] * dims))
    return y if b is None else y + b.reshape(-1, *([1] * dims))
