"""Next-token choice from logits (pure math): greedy, temperature, top-k."""
from __future__ import annotations

import torch

__all__ = ["check_sampling", "sample_next"]


def check_sampling(temperature: float, top_k: int | None, vocab_size: int) -> None:
    """Raise ``ValueError`` for settings `sample_next` cannot use (call before any collective)."""
    if not temperature >= 0.0:  # also refuses NaN
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy decoding)")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k={top_k} must be between 1 and the vocabulary size {vocab_size}, or None")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``logits [B, V]`` -> next token ids ``[B]`` (int64).

    ``temperature == 0``: argmax (greedy; ``top_k`` changes nothing). Otherwise a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits (all when
    None), with ``generator`` (the same seed on every rank gives the same draws). The
    softmax is taken in float32 at least, so bf16 logits do not quantise the probabilities.
    """
    check_sampling(temperature, top_k, logits.shape[-1])
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    scaled = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]  # B, 1
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
