"""Generation with `HyenaLanguageModel`: prefill under CP, exact cached decoding, sampling.

    tokens = model.generate(input_ids, max_new_tokens=200, temperature=0.8, top_k=40, generator=g)

Every rank of the model's CP x TP groups calls it with the same GLOBAL prompts ``[b, s]``
and gets the same ``[b, s + max_new_tokens]``.

1. Prefill: one forward of the prompt in the training layout (each CP rank its zigzag
   shard), during which every layer fills its cache (`InferenceCache`): Hyena layers keep
   the ``z`` history and short-conv state of their CP rank's channel block
   (`hyena_cp.modules.inference.HyenaCache`), attention layers the K/V of their rank's
   positions (`hyena_cp.megatron.kv_cache.KVCache`). The zigzag layout needs a length that
   is a multiple of 2P with chunks of at least K-1 tokens; the longest such prefix is
   prefilled and the rest of the prompt goes through decode steps (exact as well).
2. Decode: one token through the whole model per step, the same token on every rank.
   Dense parts (embedding, norms, MLPs, projections) run on every CP rank; a Hyena layer's
   long conv costs O(t * C/P) on each rank and one all-gather of ``[b, C/TP]``; an attention
   layer attends to its rank's 1/P of the keys and merges with one all-gather. TP works as
   in training (megatron's layers reduce over TP themselves; logits are gathered over TP).
3. Sampling (`hyena_cp.ops.sampling`): every rank draws, then CP rank 0 / TP rank 0's token
   is broadcast, so ranks cannot drift apart even where kernels are not bitwise repeatable.

The caches reach the layers through two hooks, set only inside `InferenceCache.bound`:
``MegatronHyenaMixer.inference_cache`` and ``TorchCoreAttention.kv_cache``; megatron's own
``inference_context`` path is not used (its KV buffers are allocated on CUDA).

`generate_by_recompute` is the baseline a cache must match: re-run the full forward on the
growing sequence each step (one process).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hyena_cp.megatron.kv_cache import KVCache
from hyena_cp.megatron.specs import ATTENTION
from hyena_cp.modules.inference import HyenaCache, check_decodable
from hyena_cp.ops.sampling import check_sampling, sample_next
from hyena_cp.parallel import broadcast_from, gather_from_group, group_rank, group_size, shard

if TYPE_CHECKING:
    from hyena_cp.megatron.model import HyenaLanguageModel

__all__ = ["InferenceCache", "context_limit", "generate", "generate_by_recompute", "prefill_length"]


def context_limit(model: HyenaLanguageModel) -> int:
    """Longest sequence generation can reach: ``max_sequence_length`` and every Hyena filter's ``max_len``."""
    limit = model.max_sequence_length
    for symbol, layer in zip(model.layer_pattern, model.decoder.layers):
        if symbol != ATTENTION:
            filter_limit = check_decodable(layer.self_attention.mixer)
            limit = limit if filter_limit is None else min(limit, filter_limit)
    return limit


def prefill_length(model: HyenaLanguageModel, prompt_len: int) -> int:
    """The longest prefix of a prompt that one CP forward can take: a multiple of 2P whose
    zigzag chunks hold at least K-1 tokens (the short-conv halo); 0 if there is none."""
    world = group_size(model.cp_group)
    if world == 1:
        return prompt_len
    length = prompt_len - prompt_len % (2 * world)
    halo = max([layer.self_attention.mixer.short_kernel_size - 1
                for symbol, layer in zip(model.layer_pattern, model.decoder.layers) if symbol != ATTENTION], default=0)
    return length if length // (2 * world) >= halo else 0


class InferenceCache:
    """Per-layer decode state of a `HyenaLanguageModel` on this rank.

    Args:
        model: the model (its layers and process groups).
        batch_size: prompts decoded together (equal lengths).
        capacity: positions of the whole sequence (prompt + generated), at most `context_limit`.
    """

    def __init__(self, model: HyenaLanguageModel, *, batch_size: int, capacity: int):
        limit = context_limit(model)
        if not 1 <= capacity <= limit:
            raise ValueError(f"cache capacity={capacity} must be between 1 and the model's context {limit} "
                             f"(max_sequence_length and the Hyena filters' max_len)")
        self.model, self.capacity, self.limit, self.length = model, capacity, limit, 0
        self.batch_size = batch_size
        self.layers: list[HyenaCache | KVCache] = []
        for symbol, layer in zip(model.layer_pattern, model.decoder.layers):
            if symbol != ATTENTION:
                mixer = layer.self_attention
                self.layers.append(HyenaCache(mixer.mixer, batch_size=batch_size, capacity=capacity,
                                              cp_group=mixer.cp_group))
            else:
                self.layers.append(KVCache(layer.self_attention.core_attention, capacity=capacity))

    def nbytes(self) -> int:
        """Bytes this rank holds for every layer's cache."""
        return sum(layer.nbytes() for layer in self.layers)

    @contextmanager
    def bound(self, decoding: bool) -> Iterator[None]:
        """Attach each layer's cache to its mixer for one forward (prefill or a decode step)."""
        hooks = []  # (module, attribute): MegatronHyenaMixer.inference_cache, TorchCoreAttention.kv_cache
        for cache, layer in zip(self.layers, self.model.decoder.layers):
            cache.decoding = decoding
            if isinstance(cache, HyenaCache):
                hooks.append((layer.self_attention, "inference_cache"))
            else:
                hooks.append((layer.self_attention.core_attention, "kv_cache"))
            setattr(*hooks[-1], cache)
        try:
            yield
        finally:
            for module, name in hooks:
                setattr(module, name, None)

    def _reserve(self, tokens: Tensor, n: int) -> None:
        """Raise, on every rank alike, for a batch of the wrong size or one that overflows the cache."""
        if tokens.dim() != 2 or tokens.shape[0] != self.batch_size:
            raise ValueError(f"tokens must be [b={self.batch_size}, s] (the cache's batch), got {tuple(tokens.shape)}")
        if self.length + n > self.capacity:
            raise ValueError(f"the inference cache holds {self.length} of its {self.capacity} positions and cannot "
                             f"take {n} more; the model's context ends at {self.limit} (max_sequence_length and the "
                             f"Hyena filters' max_len)")

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> Tensor:
        """This rank's zigzag shard ``input_ids [b, s_local]`` of the prompt -> its logits
        ``[b, s_local, vocab]`` (as `HyenaLanguageModel.forward`), filling every layer's cache."""
        if self.length:
            raise ValueError(f"prefill needs an empty cache; this one holds {self.length} positions")
        self._reserve(input_ids, input_ids.shape[1] * group_size(self.model.cp_group))
        with self.bound(decoding=False):
            logits = self.model(input_ids)
        self.length = input_ids.shape[1] * group_size(self.model.cp_group)
        return logits

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """The next token of every sequence ``tokens [b, 1]`` (the same on every rank) -> the
        logits of the position after it ``[b, vocab]``, the same on every rank."""
        if tokens.dim() != 2 or tokens.shape[1] != 1:
            raise ValueError(f"a decode step takes tokens [b, 1], got {tuple(tokens.shape)}")
        self._reserve(tokens, 1)
        model = self.model
        hidden = model.embedding(input_ids=tokens, position_ids=None)  # 1, b, h
        rotary = model.rotary_pos_emb_at(torch.tensor([self.length], device=tokens.device))
        with self.bound(decoding=True):
            hidden = model.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary)
        logits, _ = model.output_layer(hidden, weight=model.output_weight())  # 1, b, vocab/tp
        self.length += 1
        return gather_from_group(logits, -1, model.tp_group)[0]


def _check_generate(model: HyenaLanguageModel, input_ids: Tensor, max_new_tokens: int, temperature: float,
                    top_k: int | None) -> None:
    """Every rank runs this before any collective (the inputs are the same on every rank)."""
    if input_ids.dim() != 2 or input_ids.dtype != torch.long or 0 in input_ids.shape:
        raise ValueError(f"input_ids must be a non-empty LongTensor [b, s] (the global prompts), got "
                         f"{input_ids.dtype} {tuple(input_ids.shape)}")
    if input_ids.min() < 0 or input_ids.max() >= model.vocab_size:
        raise ValueError(f"input_ids must lie in [0, vocab_size={model.vocab_size})")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
    check_sampling(temperature, top_k, model.vocab_size)
    limit, total = context_limit(model), input_ids.shape[1] + max_new_tokens
    if total > limit:
        raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens={max_new_tokens} = {total} exceeds the "
                         f"model's context of {limit} tokens (max_sequence_length and the Hyena filters' max_len); "
                         f"generate at most {limit - input_ids.shape[1]} tokens or shorten the prompt")


def _agree(tokens: Tensor, model: HyenaLanguageModel) -> Tensor:
    """CP rank 0 / TP rank 0's ``tokens`` on every rank of the model's groups."""
    return broadcast_from(broadcast_from(tokens, 0, model.cp_group), 0, model.tp_group)


@torch.no_grad()
def generate(model: HyenaLanguageModel, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Continue the GLOBAL prompts ``input_ids [b, s]`` by ``max_new_tokens`` tokens (see the
    module docstring) -> ``[b, s + max_new_tokens]`` on every rank. ``generator``: the same
    seed on every rank. The model runs in eval mode (no dropout) and is restored after."""
    _check_generate(model, input_ids, max_new_tokens, temperature, top_k)
    if max_new_tokens == 0:
        return input_ids.clone()
    was_training = model.training
    model.eval()
    try:
        cache, logits = _prompt_logits(model, input_ids, max_new_tokens)
        out = [input_ids]
        for i in range(max_new_tokens):
            nxt = _agree(sample_next(logits, temperature, top_k, generator), model)[:, None]  # b, 1
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits = cache.step(nxt)
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)


def _prompt_logits(model: HyenaLanguageModel, input_ids: Tensor, max_new_tokens: int) -> tuple[InferenceCache, Tensor]:
    """Prefill (the longest CP-shardable prefix) and step through the rest of the prompt:
    the cache and the logits after the last prompt token ``[b, vocab]`` (valid on CP rank 0
    when the prompt ends in the prefill: the last zigzag chunk is rank 0's)."""
    batch, length = input_ids.shape
    cache = InferenceCache(model, batch_size=batch, capacity=length + max_new_tokens)
    world, prefix = group_size(model.cp_group), prefill_length(model, length)
    logits = None
    if prefix:
        local = shard(input_ids[:, :prefix], 1, "zigzag", world, group_rank(model.cp_group))
        logits = cache.prefill(local)[:, -1]
    for t in range(prefix, length):
        logits = cache.step(input_ids[:, t:t + 1])
    return cache, logits


@torch.no_grad()
def generate_by_recompute(model: HyenaLanguageModel, input_ids: Tensor, max_new_tokens: int, *,
                          temperature: float = 1.0, top_k: int | None = None,
                          generator: torch.Generator | None = None) -> Tensor:
    """The baseline: each new token from a full forward of the whole sequence so far (one
    process; O(t) work per token per layer for the FFT conv, O(t^2) for attention)."""
    if group_size(model.cp_group) > 1:
        raise ValueError("generate_by_recompute runs in one process (the growing sequence is not zigzag-"
                         "shardable at every length); build the model without a CP group")
    _check_generate(model, input_ids, max_new_tokens, temperature, top_k)
    was_training = model.training
    model.eval()
    try:
        tokens = input_ids
        for _ in range(max_new_tokens):
            nxt = sample_next(model(tokens)[:, -1], temperature, top_k, generator)
            tokens = torch.cat([tokens, _agree(nxt, model)[:, None]], dim=1)
        return tokens
    finally:
        model.train(was_training)
