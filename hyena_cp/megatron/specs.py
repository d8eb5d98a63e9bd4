"""Layer specs: Hyena layers, attention layers, and hybrid patterns such as ``"HHA"``.

Every layer is megatron-core's ``TransformerLayer``: pre-norm -> mixer -> residual add ->
pre-norm -> MLP -> residual add. Only the ``self_attention`` submodule differs:

- ``"H"``: `MegatronHyenaMixer` (context parallel, zigzag shards);
- ``"A"``: megatron's ``SelfAttention`` with a causal mask and ``core_attention``
  (default `TorchCoreAttention`: runs on CPU, context parallel in the zigzag layout; on
  GPUs with TransformerEngine ``core_attention=TEDotProductAttention`` also works).
  Rotary embeddings, when the block is called with ``rotary_pos_emb``, are applied by
  ``SelfAttention`` (see `hyena_cp.megatron.rope`).

Norms are ``WrappedTorchNorm`` (torch LayerNorm or RMSNorm by ``config.normalization``),
linear layers megatron's column/row-parallel ones: attention heads and the MLP's hidden
width are split over tensor parallelism by megatron itself.
"""
from __future__ import annotations

from hyena_cp.megatron.attention import TorchCoreAttention
from hyena_cp.megatron.compat import (AttnMaskType, ColumnParallelLinear, ModuleSpec, RowParallelLinear,
                                      SelfAttention, SelfAttentionSubmodules, TransformerBlockSubmodules,
                                      TransformerLayer, TransformerLayerSubmodules, WrappedTorchNorm,
                                      get_bias_dropout_add, mlp_submodule)
from hyena_cp.megatron.mixer import HyenaMixerConfig, MegatronHyenaMixer

__all__ = ["LAYER_SYMBOLS", "check_layer_pattern", "get_attention_layer_spec", "get_hybrid_block_spec",
           "get_hyena_layer_spec"]

LAYER_SYMBOLS = {"H": "Hyena", "A": "attention"}


def _layer_spec(self_attention: ModuleSpec) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=self_attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=mlp_submodule(),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_hyena_layer_spec(hyena_config: HyenaMixerConfig | None = None) -> ModuleSpec:
    """A ``TransformerLayer`` spec whose mixer is Hyena (``hyena_config`` = its settings)."""
    mixer = ModuleSpec(module=MegatronHyenaMixer, params={"hyena_config": hyena_config or HyenaMixerConfig()})
    return _layer_spec(mixer)


def get_attention_layer_spec(core_attention: type = TorchCoreAttention) -> ModuleSpec:
    """A causal self-attention ``TransformerLayer`` spec. The default ``core_attention`` runs
    on CPU, under TP and CP; ``TEDotProductAttention`` is the GPU alternative."""
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear, core_attention=core_attention,
                                           linear_proj=RowParallelLinear),
    )
    return _layer_spec(attention)


def check_layer_pattern(pattern: str, num_layers: int) -> None:
    """Raise ``ValueError`` unless ``pattern`` has ``num_layers`` symbols from `LAYER_SYMBOLS`."""
    unknown = sorted(set(pattern) - set(LAYER_SYMBOLS))
    if unknown or not pattern:
        raise ValueError(f"layer_pattern={pattern!r} has unknown symbols {unknown}; use {LAYER_SYMBOLS}")
    if len(pattern) != num_layers:
        raise ValueError(f"layer_pattern={pattern!r} has {len(pattern)} layers but config.num_layers={num_layers}; "
                         f"make them equal")


def get_hybrid_block_spec(pattern: str, hyena_config: HyenaMixerConfig | None = None,
                          core_attention: type = TorchCoreAttention) -> TransformerBlockSubmodules:
    """``TransformerBlock`` spec with one layer per symbol of ``pattern`` (e.g. ``"HHA"``: two
    Hyena layers, then attention) and a final ``WrappedTorchNorm``."""
    check_layer_pattern(pattern, len(pattern))
    hyena, attention = get_hyena_layer_spec(hyena_config), get_attention_layer_spec(core_attention)
    layers = [hyena if symbol == "H" else attention for symbol in pattern]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=WrappedTorchNorm)
