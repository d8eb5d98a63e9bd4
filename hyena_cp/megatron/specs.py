"""Layer specs: Hyena layers, attention layers, and hybrid patterns such as ``"HHA"`` or
StripedHyena 2's ``"SDHA..."``.

Every layer is megatron-core's ``TransformerLayer``: pre-norm -> mixer -> residual add ->
pre-norm -> MLP -> residual add. Only the ``self_attention`` submodule differs:

- ``"A"``: megatron's ``SelfAttention`` with a causal mask and ``core_attention``
  (default `TorchCoreAttention`: runs on CPU, context parallel in the zigzag layout; on
  GPUs with TransformerEngine ``core_attention=TEDotProductAttention`` also works).
  Rotary embeddings, when the block is called with ``rotary_pos_emb``, are applied by
  ``SelfAttention`` (see `hyena_cp.megatron.rope`).
- any other symbol: `MegatronHyenaMixer` (context parallel, zigzag shards) with that symbol's
  `HyenaMixerConfig`. One config (``hyena_configs`` a `HyenaMixerConfig`) names the symbol
  ``"H"``; a mapping names its own, e.g. StripedHyena 2's ``{"S": SE, "D": MR, "H": LI}`` (the
  symbols of NVIDIA's Evo 2 recipes, with ``"A"`` for their ``"*"``).

Blocks (``block``):

- ``"megatron"``: norms are ``WrappedTorchNorm`` (torch LayerNorm or RMSNorm by
  ``config.normalization``), the MLP is megatron's (``config.activation_func``,
  ``config.add_bias_linear``; HyenaDNA's block is this one with LayerNorm and tanh-GELU);
- ``"evo2"``: StripedHyena 2's (`hyena_cp.megatron.evo2_block`): RMSNorm with eps outside the
  square root, the gated MLP with GELU in the first layer only, an attention qkv bias exactly when
  ``config.add_qkv_bias`` (the output projection's follows ``config.add_bias_linear``).

Linear layers are megatron's column/row-parallel ones: attention heads and the MLP's hidden
width are split over tensor parallelism by megatron itself.
"""
from __future__ import annotations

from collections.abc import Mapping

from hyena_cp.megatron.attention import TorchCoreAttention
from hyena_cp.megatron.compat import (AttnMaskType, ColumnParallelLinear, ModuleSpec, PlainSubmodule, RowParallelLinear,
                                      SelfAttention, SelfAttentionSubmodules, TransformerBlockSubmodules,
                                      TransformerLayer, TransformerLayerSubmodules, WrappedTorchNorm,
                                      get_bias_dropout_add, mlp_submodule)
from hyena_cp.megatron.evo2_block import EpsOutsideRMSNorm, GatedMLP, QKVLinear
from hyena_cp.megatron.mixer import HyenaMixerConfig, MegatronHyenaMixer

__all__ = ["ATTENTION", "BLOCKS", "LAYER_SYMBOLS", "check_layer_pattern", "get_attention_layer_spec",
           "get_hybrid_block_spec", "get_hyena_layer_spec", "hyena_symbols"]

ATTENTION = "A"
LAYER_SYMBOLS = {"H": "Hyena", ATTENTION: "attention"}  # the default symbols; a mapping of configs adds its own
BLOCKS = ("megatron", "evo2")

HyenaConfigs = HyenaMixerConfig | Mapping[str, HyenaMixerConfig] | None


def hyena_symbols(hyena_configs: HyenaConfigs) -> dict[str, HyenaMixerConfig]:
    """Symbol -> `HyenaMixerConfig`: ``{"H": config}`` for one config (default: ``HyenaMixerConfig()``)."""
    if hyena_configs is None or isinstance(hyena_configs, HyenaMixerConfig):
        return {"H": hyena_configs or HyenaMixerConfig()}
    configs = dict(hyena_configs)
    bad = [s for s in configs if not isinstance(s, str) or len(s) != 1 or s == ATTENTION]
    if bad or not configs or not all(isinstance(c, HyenaMixerConfig) for c in configs.values()):
        raise ValueError(f"hyena configs must map one-character layer symbols (not {ATTENTION!r}, attention's) to "
                         f"HyenaMixerConfig, got {hyena_configs!r}")
    return configs


def _layer_spec(self_attention: ModuleSpec, block: str, tp_group=None) -> ModuleSpec:
    if block == "evo2":
        norm, mlp = EpsOutsideRMSNorm, PlainSubmodule(module=GatedMLP, params={"tp_group": tp_group})
    else:
        norm, mlp = WrappedTorchNorm, mlp_submodule()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=self_attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _check_block(block: str) -> None:
    if block not in BLOCKS:
        raise ValueError(f"block={block!r} must be one of {BLOCKS}")


def get_hyena_layer_spec(hyena_config: HyenaMixerConfig | None = None, block: str = "megatron",
                         tp_group=None) -> ModuleSpec:
    """A ``TransformerLayer`` spec whose mixer is Hyena (``hyena_config`` = its settings).
    ``tp_group``: the tensor-parallel group, needed by the ``"evo2"`` block's MLP."""
    _check_block(block)
    mixer = ModuleSpec(module=MegatronHyenaMixer, params={"hyena_config": hyena_config or HyenaMixerConfig()})
    return _layer_spec(mixer, block, tp_group)


def get_attention_layer_spec(core_attention: type = TorchCoreAttention, block: str = "megatron",
                             tp_group=None) -> ModuleSpec:
    """A causal self-attention ``TransformerLayer`` spec. The default ``core_attention`` runs
    on CPU, under TP and CP; ``TEDotProductAttention`` is the GPU alternative."""
    _check_block(block)
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(linear_qkv=QKVLinear if block == "evo2" else ColumnParallelLinear,
                                           core_attention=core_attention, linear_proj=RowParallelLinear),
    )
    return _layer_spec(attention, block, tp_group)


def check_layer_pattern(pattern: str, num_layers: int, symbols: Mapping[str, str] | None = None) -> None:
    """Raise ``ValueError`` unless ``pattern`` has ``num_layers`` symbols from ``symbols``
    (default `LAYER_SYMBOLS`)."""
    symbols = LAYER_SYMBOLS if symbols is None else symbols
    unknown = sorted(set(pattern) - set(symbols))
    if unknown or not pattern:
        raise ValueError(f"layer_pattern={pattern!r} has unknown symbols {unknown}; use {dict(symbols)}")
    if len(pattern) != num_layers:
        raise ValueError(f"layer_pattern={pattern!r} has {len(pattern)} layers but config.num_layers={num_layers}; "
                         f"make them equal")


def get_hybrid_block_spec(pattern: str, hyena_configs: HyenaConfigs = None,
                          core_attention: type = TorchCoreAttention, block: str = "megatron",
                          tp_group=None) -> TransformerBlockSubmodules:
    """``TransformerBlock`` spec with one layer per symbol of ``pattern`` (e.g. ``"HHA"``: two
    Hyena layers, then attention; with ``hyena_configs={"S": ..., "D": ..., "H": ...}`` e.g.
    ``"SDHA"``) and a final norm of the ``block``'s kind."""
    configs = hyena_symbols(hyena_configs)
    check_layer_pattern(pattern, len(pattern), {**{s: "Hyena" for s in configs}, ATTENTION: "attention"})
    attention = get_attention_layer_spec(core_attention, block, tp_group)
    layers = [attention if symbol == ATTENTION else get_hyena_layer_spec(configs[symbol], block, tp_group)
              for symbol in pattern]
    return TransformerBlockSubmodules(layer_specs=layers,
                                      layer_norm=EpsOutsideRMSNorm if block == "evo2" else WrappedTorchNorm)
