"""KV cache of one attention layer (`TorchCoreAttention`) for generation, SEQUENCE-sharded over CP.

Sharding: CP rank r of P keeps the keys and values of the positions it owns — after prefill
its zigzag shard of the prompt (the K/V it computed itself; the all-gather of training is
not kept), then every decoded position p with ``p % P == r`` (round robin, so the ranks'
shares stay within one token of each other). A rank holds ``~(L/P) * b * ng * hn`` keys and
as many values (``ng``: this TP rank's query groups, TP splits heads as in training), 1/P of
the layer's cache. Keys are stored rotated (megatron's ``SelfAttention`` applies RoPE at the
token's global position before the core attention), so a cached key never changes.

One decode step: the query (the same on every CP rank) attends to each rank's keys
(`attention_partial`: softmax over the slice and its log-sum-exp), one all-gather of
``[P, b, np, 1, hn + 1]`` over CP, then `merge_attention_partials` gives every rank the
softmax over all keys — exactly, not an approximation. Causality needs no mask: every
cached key precedes the query.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

from hyena_cp.megatron.attention import TorchCoreAttention
from hyena_cp.ops.decode import attention_partial, merge_attention_partials
from hyena_cp.parallel import gather_from_group, group_rank, group_size

__all__ = ["KVCache", "owned_positions"]


def owned_positions(start: int, stop: int, world: int, rank: int) -> int:
    """How many decoded positions in ``[start, stop)`` CP rank ``rank`` owns (``p % world == rank``)."""
    first = start + (rank - start) % world
    return max(0, (stop - first + world - 1) // world)


class KVCache:
    """Keys/values of one `TorchCoreAttention` on this rank (see the module docstring).

    Args:
        core: the layer's core attention (its CP group and softmax scale).
        capacity: positions of the whole sequence the cache can hold (prompt + generated).

    ``decoding``: False while the prompt is prefilled (`record`), True for steps (`decode`);
    set by the model-level cache. Storage is allocated at prefill, when the shapes are known.
    """

    def __init__(self, core: TorchCoreAttention, *, capacity: int):
        if not isinstance(core, TorchCoreAttention):
            raise ValueError(f"generation keeps KV caches for TorchCoreAttention only, got {type(core).__name__}; "
                             f"build the model with core_attention=TorchCoreAttention")
        self.core, self.cp_group, self.capacity = core, core.cp_group, capacity
        self.keys = self.values = None
        self.stored = self.length = 0  # keys held here / positions of the whole sequence
        self.decoding = False

    def nbytes(self) -> int:
        """Bytes of this rank's key and value storage."""
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()

    def _allocate(self, like: Tensor, prompt_len: int) -> None:
        """``[rows, b, ng, hn]`` for this rank's prompt shard and its future decoded positions."""
        world, rank = group_size(self.cp_group), group_rank(self.cp_group)
        rows = prompt_len // world + owned_positions(prompt_len, self.capacity, world, rank)
        self.keys = like.new_zeros(rows, *like.shape[1:])
        self.values = torch.zeros_like(self.keys)

    def record(self, key: Tensor, value: Tensor) -> None:
        """Prefill: keep this rank's zigzag shard ``key``/``value [s_local, b, ng, hn]`` (rotated)."""
        if self.length:
            raise ValueError(f"prefill needs an empty KV cache; this one holds {self.length} positions")
        prompt_len = key.shape[0] * group_size(self.cp_group)
        if prompt_len > self.capacity:
            raise ValueError(f"a prompt of {prompt_len} tokens exceeds the KV cache capacity={self.capacity}")
        self._allocate(key, prompt_len)
        self.keys[:key.shape[0]], self.values[:key.shape[0]] = key, value
        self.stored, self.length = key.shape[0], prompt_len

    def decode(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """One token: ``query [1, b, np, hn]``, ``key``/``value [1, b, ng, hn]`` at position
        ``self.length`` (the same on every CP rank) -> context ``[1, b, np*hn]``."""
        if self.length >= self.capacity:
            raise ValueError(f"the KV cache is full ({self.capacity} positions); build it with a larger capacity")
        if self.keys is None:  # nothing prefilled: all positions come by decoding
            self._allocate(key, 0)
        world, rank = group_size(self.cp_group), group_rank(self.cp_group)
        if self.length % world == rank:
            self.keys[self.stored], self.values[self.stored] = key[0], value[0]
            self.stored += 1
        self.length += 1
        rep = query.shape[2] // key.shape[2]  # grouped-query attention
        k, v = (rearrange(t[:self.stored], "s b g d -> b g s d").repeat_interleave(rep, dim=1)
                for t in (self.keys, self.values))
        q = rearrange(query, "s b n d -> b n s d")
        scale = self.core.softmax_scale
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale  # SDPA's default
        out, lse = attention_partial(q, k, v, scale)  # b, np, 1, hn and b, np, 1
        if world > 1:
            parts = gather_from_group(torch.cat([out, lse[..., None]], dim=-1)[None], 0, self.cp_group)
            out = merge_attention_partials(parts[..., :-1], parts[..., -1])  # P, b, np, 1, hn+1 -> b, np, 1, hn
        return rearrange(out, "b n s d -> s b (n d)")
