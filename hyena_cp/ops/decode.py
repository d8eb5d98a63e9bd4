"""The math of one decoding step (pure math, no process groups): the newest output of the
causal long convolution, and attention of one query over a slice of the keys with the
log-sum-exp that lets slices held by different ranks be merged exactly.

Both are the O(t) direct forms of what training computes in one pass (`fftconv`, SDPA):
a step must not re-run the sequence. Under context parallelism a rank calls them on its
piece (its channel block of the ``z`` history, its share of the keys); the caller moves
the results between ranks (`hyena_cp.parallel`).
"""
from __future__ import annotations

import torch
from einops import rearrange

__all__ = ["causal_conv_step", "attention_partial", "merge_attention_partials"]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # as `fftconv`: float64 stays float64, everything else accumulates in float32
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def causal_conv_step(z: torch.Tensor, k_rev: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """The last output of ``fft_causal_conv1d(z, k, d)``: ``y = sum_{s<t} k[t-1-s] z[s] + D z[t-1]``.

    Args:
        z: ``[B, C, t]`` the whole history of ``z`` so far (the newest input last).
        k_rev: ``[G, t]`` the first t filter taps REVERSED, ``k_rev[:, j] = k[:, t-1-j]``, so
            that ``k_rev[:, j]`` meets ``z[..., j]`` (G divides C; channel c uses group
            ``c // (C/G)``). A cache keeps the whole filter reversed once and passes a
            contiguous tail slice each step instead of flipping t taps per token.
        d: ``[C]`` skip term, or None.

    Returns:
        ``[B, C]`` in ``z``'s dtype; O(B*C*t).
    """
    if z.dim() != 3 or k_rev.dim() != 2 or k_rev.shape[1] != z.shape[2] or z.shape[1] % k_rev.shape[0]:
        raise ValueError(f"causal_conv_step expects z [B, C, t] and k_rev [G, t] with G dividing C; "
                         f"got z {tuple(z.shape)}, k_rev {tuple(k_rev.shape)}")
    dtype = _compute_dtype(z, k_rev)
    groups = k_rev.shape[0]
    zg = rearrange(z.to(dtype), "b (g c) t -> b g c t", g=groups)
    y = torch.einsum("bgct,gt->bgc", zg, k_rev.to(dtype)).flatten(1)  # B, C
    if d is not None:
        y = y + z[..., -1].to(dtype) * d.to(dtype)
    return y.to(z.dtype)


def attention_partial(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of queries over a SLICE of the keys, with that slice's log-sum-exp.

    Args:
        query: ``[B, N, Q, D]`` (N heads).
        key, value: ``[B, N, S, D]`` (already repeated for grouped-query attention); S may be 0.
        scale: multiplies the scores (``1/sqrt(D)`` by default in SDPA).

    Returns:
        ``out [B, N, Q, D]`` (softmax over this slice only) and ``lse [B, N, Q]``
        (``logsumexp`` of the slice's scores; ``-inf`` and zeros for an empty slice), which
        `merge_attention_partials` turns into attention over all slices.
    """
    if key.shape[2] == 0:
        return query.new_zeros(query.shape), query.new_full(query.shape[:3], float("-inf"))
    scores = torch.einsum("bnqd,bnsd->bnqs", query, key) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("bnqs,bnsd->bnqd", torch.exp(scores - lse[..., None]), value), lse


def merge_attention_partials(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """Attention over the union of key slices from the per-slice results.

    ``outs [P, B, N, Q, D]`` and ``lses [P, B, N, Q]`` (slice p's `attention_partial`; at least
    one slice non-empty) -> ``[B, N, Q, D]``: the slices' softmaxes reweighted by
    ``exp(lse_p - lse)`` with ``lse`` the log-sum-exp over all slices, which is exactly the
    softmax over all keys.
    """
    total = torch.logsumexp(lses, dim=0)  # B, N, Q
    weights = torch.exp(lses - total)  # P, B, N, Q (0 for empty slices)
    return (weights[..., None] * outs).sum(0)
