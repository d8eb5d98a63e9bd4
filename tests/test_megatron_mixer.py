"""MegatronHyenaMixer as megatron's self_attention submodule, the CPU core attention, the
layer-spec helpers, CP-group resolution and the tiny LM config."""
from __future__ import annotations

import dataclasses
import inspect
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state
from megatron.core.transformer.spec_utils import build_module

from hyena_cp import Hyena, LazyConfig, QKVSequenceMixer, instantiate
from hyena_cp.megatron import (HyenaLanguageModel, HyenaMixerConfig, MegatronHyenaMixer, TorchCoreAttention,
                               get_hybrid_block_spec, get_hyena_layer_spec)
from hyena_cp.megatron.compat import AttnMaskType, ProcessGroupCollection, TransformerConfig, cpu_config_defaults
from references import rel_err

REPO = Path(__file__).resolve().parents[1]


def make_config(**overrides) -> TransformerConfig:
    fields = dict(num_layers=2, hidden_size=16, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0,
                  **cpu_config_defaults())
    return TransformerConfig(**{**fields, **overrides})


def build_mixer(config: TransformerConfig | None = None, pg_collection=None, **hyena) -> MegatronHyenaMixer:
    """Through the spec, as TransformerLayer builds it."""
    spec = get_hyena_layer_spec(HyenaMixerConfig(**hyena)).submodules.self_attention
    return build_module(spec, config=config or make_config(), layer_number=3, pg_collection=pg_collection)


def test_import_hyena_cp_does_not_import_megatron():
    code = "import sys, hyena_cp; assert not [m for m in sys.modules if m.startswith('megatron')]"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# HyenaMixerConfig fields that the constructors also take but that mean something else here.
OWN_DEFAULTS = {"filter": "a generator's name, not a class", "norm": "the TransformerLayer pre-norms",
                "bias": "None follows config.add_bias_linear"}


def diverging_defaults(config_cls: type) -> dict[str, tuple]:
    """field -> (its default, the constructor's) for every shared argument whose defaults differ."""
    constructors = [inspect.signature(c).parameters for c in (Hyena, QKVSequenceMixer)]
    out = {}
    for f in dataclasses.fields(config_cls):
        for params in constructors:
            if f.name in params and f.name not in OWN_DEFAULTS and f.default != params[f.name].default:
                out[f.name] = (f.default, params[f.name].default)
    return out


def test_config_defaults_are_the_constructors():
    shared = {f.name for f in dataclasses.fields(HyenaMixerConfig)} & (
        set(inspect.signature(Hyena).parameters) | set(inspect.signature(QKVSequenceMixer).parameters))
    assert len(shared - set(OWN_DEFAULTS)) >= 14  # the comparison below covers the real fields
    assert diverging_defaults(HyenaMixerConfig) == {}
    # the negative twin: a config that re-declares a default and misses a change in Hyena
    heads, skip = (inspect.signature(Hyena).parameters[n].default for n in ("num_heads", "skip"))
    stale = dataclasses.make_dataclass("Stale", [("num_heads", int, heads + 1), ("skip", bool, skip)])
    assert diverging_defaults(stale) == {"num_heads": (heads + 1, heads)}


def test_spec_params_reach_the_mixer():
    mixer = build_mixer(make_config(add_bias_linear=False), num_heads=2, short_kernel_size=5, filter_width=8,
                        max_len=64, norm="rmsnorm")
    inner = mixer.mixer
    assert (mixer.layer_number, inner.short_kernel_size, inner.hyena.num_heads) == (3, 5, 2)
    assert inner.hyena.max_len == 64 and isinstance(inner.norm, torch.nn.RMSNorm)
    assert inner.in_proj.bias is None and inner.out_proj.bias is None  # bias follows add_bias_linear
    assert mixer.cp_group is None  # no pg_collection, parallel_state not initialised: one process


def test_projections_use_megatron_init():
    torch.manual_seed(0)
    mixer = build_mixer(make_config(hidden_size=64, init_method_std=0.05), num_heads=4)
    assert torch.count_nonzero(mixer.mixer.in_proj.bias) == 0
    assert abs(mixer.mixer.in_proj.weight.std().item() - 0.05) < 0.005
    expected_out = 0.05 / math.sqrt(2 * 2)  # megatron's scaled init: std / sqrt(2 * num_layers)
    assert abs(mixer.mixer.out_proj.weight.std().item() - expected_out) < 0.005


def test_forward_contract_and_causality():
    torch.manual_seed(0)
    mixer = build_mixer(num_heads=4)
    x = torch.randn(24, 2, 16, dtype=torch.float32)  # s, b, h
    out, bias = mixer(x, attention_mask=None, rotary_pos_emb=None, attention_bias=None, sequence_len_offset=None)
    assert bias is None and out.shape == x.shape
    expected = mixer.mixer(x.transpose(0, 1)).transpose(0, 1)  # the wrapped QKVSequenceMixer on [b, s, h]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    x2 = x.clone()
    x2[10:] += 1.0
    out2, _ = mixer(x2)
    torch.testing.assert_close(out2[:10], out[:10], rtol=0, atol=1e-5)  # FFT round-off only
    assert (out2[10:] - out[10:]).norm() > 0.05 * out[10:].norm()  # later tokens do change


@pytest.mark.parametrize("kwargs,match", [
    (dict(inference_context=object()), "inference_context"),
    (dict(packed_seq_params=object()), "packed_seq_params must be megatron's PackedSeqParams"),
])
def test_unsupported_forward_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_mixer(num_heads=4)(torch.randn(8, 1, 16), **kwargs)


def test_wrong_hidden_states_shape_raises():
    with pytest.raises(ValueError, match=r"\[s, b, h\] with h=hidden_size=16"):
        build_mixer(num_heads=4)(torch.randn(8, 16))


@pytest.mark.parametrize("overrides,match", [
    (dict(tensor_model_parallel_size=2), "tensor_model_parallel_size=2 differs from the TP group size 1"),
    (dict(tensor_model_parallel_size=2, sequence_parallel=True), "sequence_parallel=True"),
])
def test_parallel_config_without_matching_groups_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_mixer(make_config(**overrides), num_heads=4)


# ------------------------------------------------------------------ core attention
def reference_attention(q, k, v, mask):
    """float64 softmax(q k^T / sqrt(d) masked) v, ``q [s, b, n, d]``, ``k, v [s, b, g, d]``."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    out = torch.einsum("bnst,tbnd->sbnd", probs, v)
    return out.flatten(2)


@pytest.mark.parametrize("groups", [4, 2])  # multi-head and grouped-query
@pytest.mark.parametrize("explicit_mask", [False, True])
def test_torch_core_attention_matches_reference(groups, explicit_mask):
    torch.manual_seed(0)
    attn = TorchCoreAttention(make_config(), layer_number=1, attn_mask_type=AttnMaskType.causal,
                              attention_type="self")
    s = 7
    q = torch.randn(s, 2, 4, 8, dtype=torch.float64)
    k, v = torch.randn(s, 2, groups, 8, dtype=torch.float64), torch.randn(s, 2, groups, 8, dtype=torch.float64)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)  # True = masked out (megatron's convention)
    mask = causal | (torch.rand(s, s) < 0.3).tril(-1) if explicit_mask else causal
    out = attn(q, k, v, mask[None, None] if explicit_mask else None)
    assert rel_err(out, reference_attention(q, k, v, mask)) < 1e-12


# --------------------------------------------------------------------- spec helpers
def test_hybrid_block_spec_follows_the_pattern():
    spec = get_hybrid_block_spec("HAH", HyenaMixerConfig(num_heads=2))
    mixers = [layer.submodules.self_attention.module.__name__ for layer in spec.layer_specs]
    assert mixers == ["MegatronHyenaMixer", "SelfAttention", "MegatronHyenaMixer"]
    core = spec.layer_specs[1].submodules.self_attention.submodules.core_attention
    assert core is TorchCoreAttention


@pytest.mark.parametrize("pattern,match", [("HXA", "unknown symbols"), ("", "unknown symbols")])
def test_bad_pattern_raises(pattern, match):
    with pytest.raises(ValueError, match=match):
        get_hybrid_block_spec(pattern)


def test_lm_pattern_must_match_num_layers_and_groups_must_exist():
    with pytest.raises(ValueError, match="config.num_layers=2"):
        HyenaLanguageModel(make_config(), vocab_size=8, max_sequence_length=16, layer_pattern="HHH")
    with pytest.raises(ValueError, match="initialize_model_parallel"):  # no parallel_state, no pg_collection
        HyenaLanguageModel(make_config(), vocab_size=8, max_sequence_length=16)


# ------------------------------------------------------------ CP group resolution
def worker_cp_group_resolution() -> dict:
    world = dist.get_world_size()
    singles = [dist.new_group([r]) for r in range(world)]
    own = singles[dist.get_rank()]
    sizes = {"explicit": build_mixer(pg_collection=ProcessGroupCollection(cp=dist.group.WORLD), num_heads=4),
             "explicit_none": build_mixer(pg_collection=ProcessGroupCollection(cp=None), num_heads=4),
             "no_state": build_mixer(num_heads=4)}
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=world)
    try:
        sizes["state"] = build_mixer(num_heads=4)
        sizes["collection_without_cp"] = build_mixer(pg_collection=ProcessGroupCollection(tp=own), num_heads=4)
        sizes["explicit_over_state"] = build_mixer(pg_collection=ProcessGroupCollection(cp=own), num_heads=4)
    finally:
        parallel_state.destroy_model_parallel()
    return {name: None if m.cp_group is None else m.cp_group.size() for name, m in sizes.items()}


def test_cp_group_comes_from_pg_collection_then_parallel_state(dist_run):
    sizes = dist_run(worker_cp_group_resolution, 2)[0]
    assert sizes == {"explicit": 2, "explicit_none": None, "no_state": None, "state": 2,
                     "collection_without_cp": 2, "explicit_over_state": 1}


def worker_bad_cp_mixer(num_heads: int, config_cp: int) -> None:
    build_mixer(make_config(context_parallel_size=config_cp), ProcessGroupCollection(cp=dist.group.WORLD),
                num_heads=num_heads)


@pytest.mark.parametrize("num_heads,config_cp,match", [
    (2, 1, "num_heads=2 and hidden_size=16 must be divisible by tensor-parallel size x context-parallel size = 1x4"),
    (4, 2, "config.context_parallel_size=2 differs from the CP group size 4"),
])
def test_bad_cp_setup_raises_at_construction_on_every_rank(dist_run, num_heads, config_cp, match):
    errors = dist_run(worker_bad_cp_mixer, 4, num_heads, config_cp, expect_error=ValueError)
    assert all(match in str(e) for e in errors), errors


# ------------------------------------------------------------------- config file
def worker_tiny_config() -> dict:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=1)
    try:
        torch.manual_seed(0)
        cfg = LazyConfig.apply_overrides(LazyConfig.load(str(REPO / "configs/hyena_lm_tiny.py")),
                                         ["model.max_sequence_length=64", "model.hyena.max_len=64"])
        model = instantiate(cfg.model)
        tokens = torch.randint(0, 256, (2, 65))
        loss = model(tokens[:, :-1], tokens[:, 1:])
        return {"loss_shape": tuple(loss.shape), "loss_dtype": loss.dtype, "mean": loss.mean().item(),
                "logits_shape": tuple(model(tokens[:, :-1]).shape)}
    finally:
        parallel_state.destroy_model_parallel()


def test_tiny_lm_config_instantiates_and_runs(dist_run):
    (out,) = dist_run(worker_tiny_config, 1)
    assert out["loss_shape"] == (2, 64) and out["loss_dtype"] == torch.float32
    assert out["logits_shape"] == (2, 64, 256)
    assert abs(out["mean"] - math.log(256)) < 0.5  # a fresh model is near uniform over bytes
