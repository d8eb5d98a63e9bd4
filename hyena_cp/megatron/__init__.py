"""megatron-core integration: Hyena as a ``TransformerLayer`` submodule, a CPU-safe
context-parallel core attention, rotary tables for zigzag shards, layer specs for Hyena and
hybrid Hyena/attention stacks, a Hyena language model (CP and TP), and its generation (CP
prefill, exact cached decoding: `hyena_cp.megatron.generation`). Packed sequences
(``PackedSeqParams`` / ``cu_seqlens``): `hyena_cp.megatron.packing`. Checkpoints with
megatron's ``dist_checkpointing``, true global offsets at any TP size: `hyena_cp.megatron.sharded_state`.

The only package in hyena_cp that imports megatron-core (``import hyena_cp`` does not);
version-specific code lives in `hyena_cp.megatron.compat`.

    from hyena_cp.megatron import HyenaMixerConfig, get_hyena_layer_spec
    block = TransformerBlock(config, get_hyena_layer_spec(HyenaMixerConfig(num_heads=4)))
"""
from __future__ import annotations

from hyena_cp.megatron.attention import TorchCoreAttention
from hyena_cp.megatron.generation import InferenceCache, generate
from hyena_cp.megatron.mixer import HyenaMixerConfig, MegatronHyenaMixer
from hyena_cp.megatron.model import IGNORE_INDEX, HyenaLanguageModel, build_hyena_lm
from hyena_cp.megatron.specs import (LAYER_SYMBOLS, check_layer_pattern, get_attention_layer_spec,
                                     get_hybrid_block_spec, get_hyena_layer_spec)

__all__ = [
    "IGNORE_INDEX",
    "LAYER_SYMBOLS",
    "HyenaLanguageModel",
    "HyenaMixerConfig",
    "InferenceCache",
    "MegatronHyenaMixer",
    "TorchCoreAttention",
    "build_hyena_lm",
    "check_layer_pattern",
    "generate",
    "get_attention_layer_spec",
    "get_hybrid_block_spec",
    "get_hyena_layer_spec",
]
