"""HyenaDNA checkpoints (HuggingFace's ``HyenaDNAForCausalLM`` / ``HyenaDNAModel``, hyena-dna's
standalone and Lightning models) -> the hyena_cp megatron-core LM.

    cfg, state = convert(json.load(open("config.json")), load_file("model.safetensors"))
    model = hyena_cp.instantiate(cfg)                      # after megatron's parallel_state init
    load_full_state(model, state, model.tp_group)          # hyena_cp.train.generate: strict, TP shards

``config`` uses HyenaDNA's HuggingFace keys (``d_model``, ``n_layer``, ``max_seq_len``, ``emb_dim``,
``filter_order``, ...). The model is `build_hyena_lm` with HyenaDNA's block (megatron's: LayerNorm
pre-norms, eps 1e-5, an MLP ``fc2(gelu_tanh(fc1 x))`` with biases) and every layer a Hyena mixer
with the safari filter (`hyena_cp.ops.safari.SafariFilter`, one filter per channel, ``shift``
0.05 as HuggingFace's HyenaDNA code adds to the window; pass ``shift=0.0`` for weights trained and
evaluated with hyena-dna's own training code). The vocabulary is padded as HyenaDNA pads it
(``ceil(vocab_size / pad_vocab_size_multiple) * multiple``; 12 -> 16).

Key prefixes: ``hyena.backbone.`` (HuggingFace causal LM), ``backbone.`` (standalone /
``HyenaDNAModel``), ``model.backbone.`` (Lightning, also with ``.mixer.layer.`` / ``.mlp.layer.``).
``lm_head.weight`` is the separate output layer HuggingFace ships (``tie_word_embeddings: false``);
a checkpoint without a head (the backbone alone) gets the head tied to the embedding, as
hyena-dna's training LM (``ConvLMHeadModel``) has it.

Every mapping (theirs -> ours), none a permutation of rows:

- ``mixer.in_proj`` rows ``[x0 | x1 | v]`` are our ``[q | k | v]`` (``y = x0 * (h * (x1 v) + bias x1 v)``);
  ``short_filter`` is a cross-correlation with the LAST tap on the current token, as ours (only
  ``short_filter_order: 3`` is causal in HuggingFace's code, which pads by 2: others are refused);
- ``filter_fn.bias`` is our skip ``D``; ``filter_fn.pos_emb.z [1, N, e]`` and ``.t [1, N, 1]``
  -> ``z [N, e]`` and ``t [N]`` (LOADED: trained or rounded tables differ from the formula);
  ``implicit_filter.{2i}`` -> ``layers.{i}``, the last Linear -> ``out``; the one shared sine
  frequency, listed as ``implicit_filter.{1,3,5}.freq [1, w]`` (checked equal) -> ``freq [w]``;
  ``modulation.deltas [1, 1, D]`` -> ``deltas [D]`` (channel 0 the slowest, order kept);
- norms ``norm1``/``norm2``/``ln_f`` -> ``input_layernorm``/``pre_mlp_layernorm``/``final_layernorm``;
  ``mlp.fc1``/``fc2`` -> ``mlp.linear_fc1``/``linear_fc2``.

Refused with ``ValueError`` naming the key: ``hyena_order`` other than 2 (the mixer is order 2),
``short_filter_order`` other than 3, ``layer_norm_epsilon`` other than 1e-5 (HuggingFace's block
norms use 1e-5 whatever it says, the final norm uses it: one eps here). Dropouts are training-time
settings and are not carried over (the converted model has none; set them in the training config).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["convert", "BUILDER", "PREFIXES", "IGNORED_KEYS"]

BUILDER = "hyena_cp.megatron.model.build_hyena_lm"
PREFIXES = ("hyena.backbone.", "model.backbone.", "backbone.")
HEADS = ("lm_head.weight", "model.lm_head.weight")
MAPPED_KEYS = frozenset({
    "vocab_size", "d_model", "d_inner", "n_layer", "max_seq_len", "emb_dim", "filter_order", "num_inner_mlps",
    "hyena_order", "short_filter_order", "activation_freq", "train_freq", "layer_norm_epsilon",
    "pad_vocab_size_multiple", "tie_word_embeddings",
})
# training-time or tokenizer settings, HuggingFace's generic config fields, and use_bias (which
# HuggingFace's HyenaDNA code ignores: the filter bias is always used)
IGNORED_KEYS = frozenset({
    "use_bias", "embed_dropout", "hyena_dropout", "hyena_filter_dropout", "initializer_range", "pad_token_id",
    "model_type", "architectures", "auto_map", "id2label", "label2id", "problem_type", "transformers_version",
    "dtype", "torch_dtype", "bos_token_id", "eos_token_id", "num_labels", "return_dict", "output_hidden_states",
    "_name_or_path", "use_cache", "checkpoint_mixer", "checkpoint_mlp", "residual_in_fp32", "fused_mlp",
    "fused_dropout_add_ln",
})


def _get(config: Mapping[str, Any], key: str, default: Any = None) -> Any:
    if key in config:
        return config[key]
    if default is None:
        raise ValueError(f"HyenaDNA config key {key!r} is missing; it is needed to build the model")
    return default


def padded_vocab(config: Mapping[str, Any]) -> int:
    multiple = int(_get(config, "pad_vocab_size_multiple", 1))
    return math.ceil(int(_get(config, "vocab_size")) / multiple) * multiple


def _model_config(config: Mapping[str, Any], shift: float, tied: bool) -> dict[str, Any]:
    unknown = sorted(set(config) - MAPPED_KEYS - IGNORED_KEYS)
    if unknown:
        raise ValueError(f"HyenaDNA config keys {unknown} are not known to this converter; if they do not change "
                         f"the model's math, remove them from the config")
    if int(_get(config, "hyena_order", 2)) != 2:
        raise ValueError(f"HyenaDNA config hyena_order={config['hyena_order']} cannot be mapped: the Hyena mixer is "
                         f"order 2 (one long conv)")
    if int(_get(config, "short_filter_order", 3)) != 3:
        raise ValueError(f"HyenaDNA config short_filter_order={config['short_filter_order']} cannot be mapped: "
                         f"HuggingFace's short filter pads by 2, so only 3 taps are causal")
    if float(_get(config, "layer_norm_epsilon", 1e-5)) != 1e-5:
        raise ValueError(f"HyenaDNA config layer_norm_epsilon={config['layer_norm_epsilon']} cannot be mapped: the "
                         f"block norms use 1e-5 whatever it says and the model has one eps; only 1e-5 is")
    d, length = int(_get(config, "d_model")), int(_get(config, "max_seq_len"))
    filter_options = {"l_max": length, "emb_dim": int(_get(config, "emb_dim", 3)),
                      "width": int(_get(config, "filter_order", 64)), "num_inner_mlps": int(_get(config, "num_inner_mlps", 2)),
                      "sin_freq": float(_get(config, "activation_freq", 1.0)),
                      "train_freq": bool(_get(config, "train_freq", True)), "shift": float(shift)}
    d_inner = config.get("d_inner") or 4 * d
    return {
        "_target_": BUILDER,
        "vocab_size": padded_vocab(config), "max_sequence_length": length, "num_layers": int(_get(config, "n_layer")),
        "hidden_size": d, "ffn_hidden_size": int(d_inner), "num_attention_heads": 1,
        "hyena": {"num_heads": d, "short_kernel_size": 3, "filter": "safari", "filter_options": filter_options,
                  "bias": True, "skip": True},
        "block": "megatron", "normalization": "LayerNorm", "activation": "gelu_tanh", "tie_embeddings": tied,
        "position_embedding": "none",
        "config_overrides": {"layernorm_epsilon": 1e-5, "add_bias_linear": True},
    }


def _prefix(state: Mapping[str, Tensor]) -> str:
    for prefix in PREFIXES:
        if prefix + "embeddings.word_embeddings.weight" in state:
            return prefix
    raise ValueError(f"no HyenaDNA embedding found: expected '<prefix>embeddings.word_embeddings.weight' with a "
                     f"prefix among {PREFIXES}")


def convert(config: Mapping[str, Any], state_dict: Mapping[str, Tensor], *,
            shift: float = 0.05) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(cfg, state)``: a `build_hyena_lm` config (``hyena_cp.instantiate(cfg)``) and the FULL
    tensors of its ``state_dict``, from HyenaDNA's HuggingFace ``config`` and a ``state_dict``
    (see the module docstring for the prefixes and the mapping). ``shift``: the filter window's
    constant (0.05: HuggingFace's and the standalone model's code; 0.0: hyena-dna's training code)."""
    prefix = _prefix(state_dict)
    src = {k.replace(".mixer.layer.", ".mixer.").replace(".mlp.layer.", ".mlp."): v for k, v in state_dict.items()}
    head = next((h for h in HEADS if h in src), None)
    tied = head is None or bool(config.get("tie_word_embeddings", False))
    cfg = _model_config(config, shift, tied)
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in src:
            raise ValueError(f"the HyenaDNA checkpoint lacks {key!r}, which this config needs")
        used.add(key)
        return src[key]

    out = {"embedding.word_embeddings.weight": take(prefix + "embeddings.word_embeddings.weight")}
    if out["embedding.word_embeddings.weight"].shape[0] != cfg["vocab_size"]:
        raise ValueError(f"the embedding has {out['embedding.word_embeddings.weight'].shape[0]} rows, the config's "
                         f"padded vocabulary {cfg['vocab_size']} (vocab_size, pad_vocab_size_multiple)")
    for i in range(cfg["num_layers"]):
        theirs, ours = f"{prefix}layers.{i}.", f"decoder.layers.{i}."
        for a, b in (("norm1", "input_layernorm"), ("norm2", "pre_mlp_layernorm"), ("mlp.fc1", "mlp.linear_fc1"),
                     ("mlp.fc2", "mlp.linear_fc2"), ("mixer.in_proj", "self_attention.mixer.in_proj"),
                     ("mixer.out_proj", "self_attention.mixer.out_proj"),
                     ("mixer.short_filter", "self_attention.mixer.short_conv")):
            for p in ("weight", "bias"):
                out[f"{ours}{b}.{p}"] = take(f"{theirs}{a}.{p}")
        _filter(take, src, out, theirs + "mixer.filter_fn.", ours + "self_attention.mixer.hyena.",
                cfg["hyena"]["filter_options"]["num_inner_mlps"], used)
    for p in ("weight", "bias"):
        out[f"decoder.final_layernorm.{p}"] = take(f"{prefix}ln_f.{p}")
    if head is not None and not tied:
        out["output_layer.weight"] = take(head)
    elif head is not None and not torch.equal(take(head), out["embedding.word_embeddings.weight"]):
        raise ValueError(f"tie_word_embeddings is true but {head} differs from the embedding")
    leftover = sorted(k for k in src if k not in used)
    if leftover:
        raise ValueError(f"the HyenaDNA checkpoint has tensors this config does not use: {leftover[:6]}; check that "
                         f"the config belongs to the checkpoint (n_layer, num_inner_mlps)")
    return cfg, out


def _filter(take, src: Mapping[str, Tensor], out: dict[str, Tensor], theirs: str, ours: str, inner: int,
            used: set[str]) -> None:
    out[ours + "skip"] = take(theirs + "bias")
    out[ours + "filter.z"] = take(theirs + "pos_emb.z")[0]  # N, e
    out[ours + "filter.t"] = take(theirs + "pos_emb.t")[0, :, 0]  # N
    out[ours + "filter.deltas"] = take(theirs + "modulation.deltas")[0, 0]  # D
    for i in range(inner + 1):
        out[f"{ours}filter.layers.{i}.weight"] = take(f"{theirs}implicit_filter.{2 * i}.weight")
        out[f"{ours}filter.layers.{i}.bias"] = take(f"{theirs}implicit_filter.{2 * i}.bias")
    out[ours + "filter.out.weight"] = take(f"{theirs}implicit_filter.{2 * inner + 2}.weight")
    aliases = [f"{theirs}implicit_filter.{2 * i + 1}.freq" for i in range(inner + 1)]
    present = [a for a in aliases if a in src]
    if not present:
        raise ValueError(f"the HyenaDNA checkpoint lacks the filter's sine frequency ({aliases[0]!r})")
    freq = src[present[0]]
    for alias in present:
        if not torch.equal(src[alias], freq):
            raise ValueError(f"{alias} differs from {present[0]}: safari's filter shares ONE sine frequency, so "
                             f"every alias must hold the same tensor")
        used.add(alias)
    out[ours + "filter.freq"] = freq.reshape(-1)
