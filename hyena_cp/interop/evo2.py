"""Evo 2 / StripedHyena 2 checkpoints (vortex's format) -> the hyena_cp megatron-core LM.

    cfg, state = convert(yaml.safe_load(open("evo2-7b-1m.yml")), torch.load("evo2_7b.pt"))
    model = hyena_cp.instantiate(cfg)                      # after megatron's parallel_state init
    load_full_state(model, state, model.tp_group)          # hyena_cp.train.generate: strict, TP shards

``config`` uses vortex's keys (the ``.yml`` that ``Evo2(...)`` loads); ``state_dict`` is the
checkpoint as saved (``blocks.{i}....``; also what savanna's and BioNeMo's converters write).
Pure mappings: nothing of vortex is imported. The result builds `build_hyena_lm` with
``block="evo2"`` (`hyena_cp.megatron.evo2_block`: RMSNorm with eps outside the square root, the
gated MLP with GELU in layer 0 only, tied embeddings, final norm) and one layer symbol per
operator: ``"S"`` SE (``hcs_layer_idxs``), ``"D"`` MR (``hcm_layer_idxs``), ``"H"`` LI
(``hcl_layer_idxs``), ``"A"`` attention (``attn_layer_idxs``).

Every permutation applied (vortex rows -> ours):

- Hyena ``projections`` (in_proj) and ``filter.short_filter_weight``/``_bias`` (the featurizer):
  rows are INTERLEAVED, ``3c + {0: q (post-gate), 1: k (pre-gate), 2: v}``; ours are blocks
  ``[q; k; v]``: row ``j*D + c`` <- ``3c + j`` (``interleave: False`` checkpoints are blocks
  already; ``hyena_flip_x1x2`` swaps q and k). The featurizer taps keep their order: both are
  cross-correlations (the LAST tap multiplies the current token).
- SE ``filter.h [G, 1, 7]``: stored in cross-correlation order, so its time-order taps are
  FLIPPED: ``h[g, j] = h_vortex[g, 0, 6 - j]``. MR ``filter.h [G, 1, 128]`` is already in time
  order (a true convolution, decay baked in): not flipped. The rule is vortex's own: a filter of
  fewer than 128 taps is SE-like (flipped, no skip), 128 or more MR-like (time order, skip D).
- LI ``filter.log_poles [D, S, 1]`` -> ``[D, S]`` (λ; no gamma at inference), ``residues``, ``D``.
- Attention ``Wqkv``: the checkpoint's rows are per head ``[q_h; k_h; v_h]`` (``row = h*3*hd +
  j*hd + e``), which is megatron's ``linear_qkv`` layout for ``num_query_groups = heads``:
  unchanged. (vortex permutes it to ``j*D + h*hd + e`` at load, ``column_split: True``; a
  ``column_split: False`` checkpoint is in that live layout and is permuted back here.)
  ``rotary_emb.inv_freq`` is not stored: it must equal ``base^(-2m/hd)`` (checked).
- The embedding is tied (``unembed.weight``, a copy some converters add, is checked equal and dropped).

Numerics that differ on purpose: vortex runs the FP8 input projections of some configs
(``use_fp8_input_projections``) and computes the filters in float32; here everything runs in the
model's dtype (the FFT conv in float32 or float64). Unmappable settings raise ``ValueError`` naming
the key: grouped-query attention (``proj_groups != 1``), ``column_split_hyena``, an untied
embedding, no final norm, another MLP activation rule.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["convert", "layer_pattern", "BUILDER", "IGNORED_KEYS"]

BUILDER = "hyena_cp.megatron.model.build_hyena_lm"

# Keys that change nothing in the model's math: kernel choices, tokenizer, logging, parallel
# layout of vortex itself, generation buffers, and the ones vortex does not read.
IGNORED_KEYS = frozenset({
    "model_name", "tokenizer_type", "make_vocab_size_divisible_by", "hcl_filter_groups", "hyena_filter_groups",
    "mlp_init_method", "mlp_output_init_method", "log_intermediate_values", "use_laughing_hyena",
    "pipe_parallel_size", "model_parallel_size", "num_filters", "use_flash_attn", "use_flash_rmsnorm",
    "use_flash_depthwise", "use_flashfft", "use_hcs_kernel", "use_hcm_kernel", "use_hcl_kernel", "inference_mode",
    "print_activations", "max_batch_size", "prefill_style", "use_fp8_input_projections", "inner_size_multiple_of",
    "padding_idx", "long_fir_threshold", "state_dtype", "params_dtype",
})
MAPPED_KEYS = frozenset({
    "vocab_size", "hidden_size", "num_layers", "hcs_layer_idxs", "hcm_layer_idxs", "hcl_layer_idxs", "attn_layer_idxs",
    "hcs_filter_length", "hcm_filter_length", "hcs_filter_groups", "hcm_filter_groups", "short_filter_length",
    "short_filter_bias", "num_attention_heads", "proj_groups", "state_size", "eps", "rotary_emb_base",
    "use_interpolated_rotary_pos_emb", "rotary_emb_scaling_factor", "inner_mlp_size", "qkv_proj_bias",
    "hyena_out_proj_bias", "mha_out_proj_bias", "interleave", "column_split", "column_split_hyena",
    "hyena_flip_x1x2", "evo2_style_activations", "mlp_activation", "tie_embeddings", "final_norm", "max_seqlen",
})
MR_MIN_LENGTH = 128  # vortex: a filter this long is MR-like (convolution order, skip D), shorter SE-like


def _get(config: Mapping[str, Any], key: str, default: Any = None, required: bool = False) -> Any:
    if key not in config:
        if required:
            raise ValueError(f"Evo 2 config key {key!r} is missing; it is needed to build the model")
        return default
    return config[key]


def _refuse(config: Mapping[str, Any], key: str, wanted: Any, why: str) -> None:
    if _get(config, key, wanted) != wanted:
        raise ValueError(f"Evo 2 config {key}={config[key]!r} cannot be mapped ({why}); only {key}={wanted!r} is")


def layer_pattern(config: Mapping[str, Any]) -> str:
    """One symbol per layer, by vortex's rule (attn, then hcl, hcm, hcs): "A", "H", "D", "S"."""
    num_layers = int(_get(config, "num_layers", required=True))
    lists = [(symbol, {int(i) for i in _get(config, key, [])})
             for symbol, key in (("A", "attn_layer_idxs"), ("H", "hcl_layer_idxs"), ("D", "hcm_layer_idxs"),
                                 ("S", "hcs_layer_idxs"))]
    symbols = []
    for i in range(num_layers):
        symbol = next((s for s, idxs in lists if i in idxs), None)
        if symbol is None:
            raise ValueError(f"Evo 2 layer {i} is in none of attn_layer_idxs, hcl_layer_idxs, hcm_layer_idxs, "
                             f"hcs_layer_idxs; every layer index below num_layers={num_layers} needs a type")
        symbols.append(symbol)
    beyond = sorted(i for _, idxs in lists for i in idxs if not 0 <= i < num_layers)
    if beyond:
        raise ValueError(f"Evo 2 layer indices {beyond} are outside num_layers={num_layers}")
    return "".join(symbols)


def _ffn_size(config: Mapping[str, Any]) -> int:
    if "inner_mlp_size" in config:
        return int(config["inner_mlp_size"])
    multiple = int(_get(config, "inner_size_multiple_of", 64)) * int(_get(config, "model_parallel_size", 1))
    return math.ceil(int(2 * config["hidden_size"] * 4 / 3) / multiple) * multiple  # vortex's ParallelGatedMLP


def _fir_layer(config: Mapping[str, Any], prefix: str, common: dict[str, Any]) -> dict[str, Any]:
    length = int(_get(config, f"{prefix}_filter_length", required=True))
    groups = int(_get(config, f"{prefix}_filter_groups", required=True))
    if config["hidden_size"] % groups:
        raise ValueError(f"Evo 2 config {prefix}_filter_groups={groups} must divide hidden_size={config['hidden_size']}")
    return dict(num_heads=groups, filter="explicit", filter_options={"length": length},
                skip=length >= MR_MIN_LENGTH, **common)


def _model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(config) - MAPPED_KEYS - IGNORED_KEYS)
    if unknown:
        raise ValueError(f"Evo 2 config keys {unknown} are not known to this converter; if they do not change the "
                         f"model's math, remove them from the config")
    _refuse(config, "proj_groups", 1, "grouped-query attention")
    _refuse(config, "column_split_hyena", False, "per-head split of the hyena projections")
    _refuse(config, "tie_embeddings", True, "Evo 2 ties its embedding and output layer")
    _refuse(config, "final_norm", True, "vortex requires the final norm")
    _refuse(config, "evo2_style_activations", True, "the gated MLP's activation is GELU in layer 0, identity after")
    _refuse(config, "mlp_activation", "gelu", "the first layer's MLP activation is exact GELU")
    hidden = int(_get(config, "hidden_size", required=True))
    heads = int(_get(config, "num_attention_heads", required=True))
    if hidden % heads:
        raise ValueError(f"Evo 2 config num_attention_heads={heads} must divide hidden_size={hidden}")
    common = dict(in_proj_bias=bool(_get(config, "qkv_proj_bias", False)),
                  short_conv_bias=bool(_get(config, "short_filter_bias", False)),
                  out_proj_bias=bool(_get(config, "hyena_out_proj_bias", True)),
                  short_kernel_size=int(_get(config, "short_filter_length", 3)))
    layers = {"S": _fir_layer(config, "hcs", common), "D": _fir_layer(config, "hcm", common),
              "H": dict(num_heads=hidden, filter="modal", filter_options={"state_size": int(_get(config, "state_size",
                                                                                                 required=True))},
                        **common)}
    pattern = layer_pattern(config)
    scaling = float(_get(config, "rotary_emb_scaling_factor", 1.0)) if _get(config, "use_interpolated_rotary_pos_emb",
                                                                            False) else 1.0
    return {
        "_target_": BUILDER,
        "vocab_size": int(_get(config, "vocab_size", required=True)),
        "max_sequence_length": int(_get(config, "max_seqlen", 8192)),
        "num_layers": len(pattern), "hidden_size": hidden, "ffn_hidden_size": _ffn_size(config),
        "num_attention_heads": heads, "layer_pattern": pattern,
        "hyena_layers": {s: c for s, c in layers.items() if s in pattern},
        "block": "evo2", "tie_embeddings": True, "position_embedding": "rope",
        "rotary_base": float(_get(config, "rotary_emb_base", 1e6)), "rotary_scaling": scaling,
        "config_overrides": {"layernorm_epsilon": float(_get(config, "eps", 1e-6)),
                             "add_bias_linear": bool(_get(config, "mha_out_proj_bias", True)),
                             "add_qkv_bias": bool(_get(config, "qkv_proj_bias", False))},
    }


def _deinterleave(rows: Tensor, hidden: int, interleaved: bool, flip_qk: bool) -> Tensor:
    """``[3D, ...]`` vortex rows -> ``[q; k; v]`` blocks (see the module docstring)."""
    blocks = rows.unflatten(0, (hidden, 3)).transpose(0, 1) if interleaved else rows.unflatten(0, (3, hidden))
    if flip_qk:
        blocks = blocks[[1, 0, 2]]
    return blocks.flatten(0, 1).contiguous()


def _check_rotary(state: Mapping[str, Tensor], key: str, base: float, head_dim: int) -> None:
    if key not in state:
        return
    want = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    got = state[key].to(torch.float64)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=0):
        raise ValueError(f"{key} is not base^(-2m/hd) for rotary_emb_base={base} and head dim {head_dim}; this "
                         f"converter builds the rotary table from the base")


def convert(config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(cfg, state)``: a `build_hyena_lm` config (``hyena_cp.instantiate(cfg)``) and the FULL
    (single-process) tensors of its ``state_dict`` (tensors only), from vortex's ``config`` and
    checkpoint ``state_dict``. Raises ``ValueError`` naming the key of anything it cannot map,
    and for a checkpoint tensor left unused or missing."""
    cfg = _model_config(config)
    hidden, pattern = cfg["hidden_size"], cfg["layer_pattern"]
    interleaved, flip = bool(_get(config, "interleave", True)), bool(_get(config, "hyena_flip_x1x2", False))
    heads = cfg["num_attention_heads"]
    src, out, used = dict(state_dict), {}, set()

    def take(key: str) -> Tensor:
        if key not in src:
            raise ValueError(f"the Evo 2 checkpoint lacks {key!r}, which this config needs")
        used.add(key)
        return src[key]

    out["embedding.word_embeddings.weight"] = take("embedding_layer.weight")
    if "unembed.weight" in src:
        if not torch.equal(take("unembed.weight"), src["embedding_layer.weight"]):
            raise ValueError("unembed.weight differs from embedding_layer.weight; Evo 2's output layer is tied")
    out["decoder.final_layernorm.weight"] = take("norm.scale")
    for i, symbol in enumerate(pattern):
        v, ours = f"blocks.{i}.", f"decoder.layers.{i}."
        out[ours + "input_layernorm.weight"] = take(v + "pre_norm.scale")
        out[ours + "pre_mlp_layernorm.weight"] = take(v + "post_norm.scale")
        for name in ("l1", "l2", "l3"):
            out[f"{ours}mlp.{name}.weight"] = take(f"{v}mlp.{name}.weight")
        if symbol == "A":
            _attention(take, src, out, v, ours + "self_attention.", cfg, config, heads, used)
        else:
            _hyena(take, out, v, ours + "self_attention.mixer.", cfg["hyena_layers"][symbol], hidden, interleaved, flip)
    leftover = sorted(k for k in src if k not in used and not k.endswith("._extra_state"))
    if leftover:
        raise ValueError(f"the Evo 2 checkpoint has tensors this config does not use: {leftover[:6]}; check that the "
                         f"config belongs to the checkpoint (layer types, biases)")
    return cfg, out


def _hyena(take, out: dict[str, Tensor], v: str, ours: str, layer: dict[str, Any], hidden: int, interleaved: bool,
           flip: bool) -> None:
    out[ours + "in_proj.weight"] = _deinterleave(take(v + "projections.weight"), hidden, interleaved, flip)
    if layer["in_proj_bias"]:
        out[ours + "in_proj.bias"] = _deinterleave(take(v + "projections.bias"), hidden, interleaved, flip)
    out[ours + "short_conv.weight"] = _deinterleave(take(v + "filter.short_filter_weight"), hidden, interleaved, flip)
    if layer["short_conv_bias"]:
        out[ours + "short_conv.bias"] = _deinterleave(take(v + "filter.short_filter_bias"), hidden, interleaved, flip)
    out[ours + "out_proj.weight"] = take(v + "out_filter_dense.weight")
    if layer["out_proj_bias"]:
        out[ours + "out_proj.bias"] = take(v + "out_filter_dense.bias")
    if layer["filter"] == "modal":
        out[ours + "hyena.filter.log_poles"] = take(v + "filter.log_poles")[..., 0]  # D, S
        out[ours + "hyena.filter.residues"] = take(v + "filter.residues")
        out[ours + "hyena.skip"] = take(v + "filter.D")
        return
    taps = take(v + "filter.h")[:, 0]  # G, K
    if layer["skip"]:  # MR-like: time order already
        out[ours + "hyena.filter.h"] = taps
        out[ours + "hyena.skip"] = take(v + "filter.D")
    else:  # SE-like: cross-correlation order -> time order
        out[ours + "hyena.filter.h"] = taps.flip(-1).contiguous()


def _attention(take, src, out: dict[str, Tensor], v: str, ours: str, cfg: dict[str, Any], config: Mapping[str, Any],
               heads: int, used: set[str]) -> None:
    hidden = cfg["hidden_size"]
    head_dim = hidden // heads
    per_head = bool(_get(config, "column_split", True))

    def qkv_rows(t: Tensor) -> Tensor:  # -> per-head [q_h; k_h; v_h] (megatron's linear_qkv)
        return t if per_head else t.unflatten(0, (3, heads, head_dim)).transpose(0, 1).flatten(0, 2).contiguous()

    out[ours + "linear_qkv.weight"] = qkv_rows(take(v + "inner_mha_cls.Wqkv.weight"))
    if cfg["config_overrides"]["add_qkv_bias"]:
        out[ours + "linear_qkv.bias"] = qkv_rows(take(v + "inner_mha_cls.Wqkv.bias"))
    out[ours + "linear_proj.weight"] = take(v + "inner_mha_cls.out_proj.weight")
    if cfg["config_overrides"]["add_bias_linear"]:
        out[ours + "linear_proj.bias"] = take(v + "inner_mha_cls.out_proj.bias")
    inv_freq = v + "inner_mha_cls.rotary_emb.inv_freq"
    _check_rotary(src, inv_freq, cfg["rotary_base"], head_dim)
    used.add(inv_freq)
