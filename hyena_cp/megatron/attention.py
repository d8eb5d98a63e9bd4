"""A CPU-safe ``core_attention`` for attention layers in hybrid Hyena/attention models.

megatron-core's stock local ``DotProductAttention`` does not run on a CPU-only machine (its
score buffer is allocated with ``torch.cuda.current_device()``, its dropout forks the CUDA
RNG tracker) and has no context parallelism. `TorchCoreAttention` takes its place in the
layer spec: the same call contract, computed with ``torch.nn.functional.scaled_dot_product_attention``.
It runs in ONE process only (CP size 1) and says so at construction; on GPUs with
TransformerEngine, pass ``core_attention=TEDotProductAttention`` to the spec helpers instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from hyena_cp.megatron.compat import AttnMaskType, MegatronModule, ProcessGroupCollection, TransformerConfig
from hyena_cp.megatron.compat import resolve_cp_group
from hyena_cp.parallel import group_size

__all__ = ["TorchCoreAttention"]


class TorchCoreAttention(MegatronModule):
    """Scaled dot-product attention as megatron's ``core_attention`` submodule (one process).

    Constructor arguments are those ``SelfAttention`` passes to its core attention.

    Raises:
        ValueError: at construction when the context-parallel size is > 1 (this attention
            would see only the local shard of the keys).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: ProcessGroupCollection | None = None):
        super().__init__(config=config)
        cp_size = max(group_size(resolve_cp_group(pg_collection)), config.context_parallel_size)
        if cp_size > 1:
            raise ValueError(
                f"attention layers have no context parallelism here (CP size {cp_size}): megatron-core's local "
                f"attention and TorchCoreAttention see only the local shard. Use an all-Hyena layer pattern "
                f"(e.g. 'HHHH') with CP, or context_parallel_size=1 for hybrids with attention ('A') layers")
        self.layer_number, self.attn_mask_type = layer_number, attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: object | None = None) -> torch.Tensor:
        """``query [sq, b, np, hn]``, ``key``/``value [sk, b, ng, hn]`` (ng divides np: GQA)
        -> context ``[sq, b, np*hn]``. ``attention_mask``: megatron's bool mask, True = masked
        out; None with a causal mask type means causal."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("TorchCoreAttention supports neither attention_bias nor packed sequences; pass None")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        q = rearrange(query, "s b n d -> b n s d")
        k = rearrange(key, "s b g d -> b g s d").repeat_interleave(query.shape[2] // key.shape[2], dim=1)
        v = rearrange(value, "s b g d -> b g s d").repeat_interleave(query.shape[2] // value.shape[2], dim=1)
        is_causal = attention_mask is None and mask_type == AttnMaskType.causal
        keep = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=is_causal,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             scale=self.softmax_scale)
        return rearrange(out, "b n s d -> s b (n d)")
