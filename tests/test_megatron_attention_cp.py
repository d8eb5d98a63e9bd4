"""Attention layers under context parallelism: `TorchCoreAttention` (K/V all-gathered over
CP, causal mask from global zigzag positions) against a float64 reference, and rotary
embeddings (`hyena_cp.megatron.rope`) in megatron's format, applied by megatron's
``SelfAttention`` at GLOBAL positions. Each check has a negative twin that must fail.
The LM-level CP parity of hybrids is in tests/test_megatron_lm.py."""
from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from hyena_cp.megatron import TorchCoreAttention, build_hyena_lm
from hyena_cp.megatron.compat import AttnMaskType, ProcessGroupCollection, TransformerConfig, cpu_config_defaults
from hyena_cp.megatron.rope import rotary_angles, rotary_pos_emb
from hyena_cp.parallel import shard, unshard
from lm_parity import ParityCase, build_model, load_full_weights, perturb
from references import rel_err

TOL = 1e-10  # float64


def make_config(**overrides) -> TransformerConfig:
    fields = dict(num_layers=1, hidden_size=32, num_attention_heads=4, attention_dropout=0.0, **cpu_config_defaults())
    return TransformerConfig(**{**fields, **overrides})


def reference_attention(q, k, v):
    """float64 causal softmax(q k^T / sqrt(d)) v on GLOBAL ``q [s, b, n, d]``, ``k, v [s, b, g, d]``."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) / math.sqrt(q.shape[-1])
    masked = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).triu(1)
    return torch.einsum("bnst,tbnd->sbnd", scores.masked_fill(masked, float("-inf")).softmax(-1), v).flatten(2)


# ------------------------------------------------------------- core attention under CP
def top_left_chunks(q, k, v, cp_group, attention):
    """Twin of `zigzag_causal_attention`: every chunk ``is_causal`` over its key prefix, which SDPA
    aligns top-left (query j sees keys <= j) instead of at the chunk's end (keys <= i c + j)."""
    world, rank, chunk = dist.get_world_size(cp_group), dist.get_rank(cp_group), q.shape[2] // 2
    return torch.cat([attention(q[:, :, n * chunk:(n + 1) * chunk], k[:, :, :(i + 1) * chunk], v[:, :, :(i + 1) * chunk],
                                is_causal=True) for n, i in enumerate((rank, 2 * world - 1 - rank))], dim=2)


def worker_core_attention(groups: int, local_keys: bool, twin: bool = False) -> dict:
    """Every rank: the same GLOBAL q, k, v and output grad; this rank's zigzag shard through
    the CP core attention (``local_keys``: the negative twin, no CP group; ``twin``: chunks masked
    top-left, `top_left_chunks`)."""
    from hyena_cp.megatron import attention as attention_module
    exact = attention_module.zigzag_causal_attention
    if twin:
        attention_module.zigzag_causal_attention = top_left_chunks
    try:
        return _core_attention(groups, local_keys)
    finally:  # the pool's worker runs the next tests
        attention_module.zigzag_causal_attention = exact


def _core_attention(groups: int, local_keys: bool) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    pgs = ProcessGroupCollection(cp=None if local_keys else dist.group.WORLD)
    attn = TorchCoreAttention(make_config(), layer_number=1, attn_mask_type=AttnMaskType.causal,
                              attention_type="self", pg_collection=pgs)
    seq, batch, heads, dim = 16, 2, 4, 8
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(seq, batch, heads, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (torch.randn(seq, batch, groups, dim, dtype=torch.float64, generator=gen, requires_grad=True)
            for _ in range(2))
    grad_out = torch.randn(seq, batch, heads * dim, dtype=torch.float64, generator=gen)
    ref = reference_attention(q, k, v)
    ref.backward(grad_out)
    local = [shard(t.detach(), 0, "zigzag", world, rank).requires_grad_() for t in (q, k, v)]
    out = attn(*local, attention_mask=None)
    out.backward(shard(grad_out, 0, "zigzag", world, rank))
    return {"out": out.detach(), "grads": [t.grad for t in local], "ref": ref.detach(),
            "ref_grads": [t.grad for t in (q, k, v)]}


def core_attention_errors(results: list[dict]) -> dict[str, float]:
    ref = results[0]
    errors = {"out": rel_err(unshard([r["out"] for r in results], 0, "zigzag"), ref["ref"])}
    for i, name in enumerate("qkv"):  # k/v grads: each rank's shard after the reduce-scatter
        errors[f"grad {name}"] = rel_err(unshard([r["grads"][i] for r in results], 0, "zigzag"), ref["ref_grads"][i])
    return errors


@pytest.mark.parametrize("groups", [4, 2])  # multi-head and grouped-query
@pytest.mark.parametrize("world", [1, 2, 4])
def test_cp_core_attention_matches_the_float64_reference(dist_run, world, groups):
    errors = core_attention_errors(dist_run(worker_core_attention, world, groups, False))
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("world", [2, 4])
def test_attention_over_local_keys_only_fails_the_parity_check(dist_run, world):
    errors = core_attention_errors(dist_run(worker_core_attention, world, 4, True))
    assert errors["out"] > 1e-3 and errors["grad k"] > 1e-3, errors


def test_chunks_masked_top_left_fail_the_parity_check(dist_run):
    errors = core_attention_errors(dist_run(worker_core_attention, 2, 4, False, True))
    assert errors["out"] > 1e-3 and errors["grad q"] > 1e-3, errors


def worker_bad_core_attention(kwargs: dict) -> None:
    fields = dict(attn_mask_type=AttnMaskType.causal, attention_type="self")
    fields.update(kwargs.pop("fields", {}))
    config = make_config(**kwargs.pop("config", {}))
    attn = TorchCoreAttention(config, layer_number=1, pg_collection=ProcessGroupCollection(cp=dist.group.WORLD),
                              **fields)
    q = torch.randn(4, 1, 4, 8)
    attn(q, q, q, attention_mask=kwargs.get("mask"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(fields=dict(attention_type="cross")), "self attention only"),
    (dict(fields=dict(attn_mask_type=AttnMaskType.padding)), "attn_mask_type=AttnMaskType.padding"),
    (dict(config=dict(context_parallel_size=4)), "context_parallel_size=4 differs from the CP group size 2"),
    (dict(mask=torch.zeros(1, 1, 4, 4, dtype=torch.bool)), "pass attention_mask=None"),
])
def test_bad_cp_attention_raises_on_every_rank_before_communicating(dist_run, kwargs, match):
    errors = dist_run(worker_bad_core_attention, 2, kwargs, expect_error=ValueError)
    assert all(match in str(e) for e in errors), errors


# ------------------------------------------------------------------------------ RoPE
def test_rotary_table_has_megatrons_format():
    """Against megatron's own frequencies (``get_freqs_non_repeated`` runs on CPU; ``get_emb``,
    which concatenates them, moves ``inv_freq`` to CUDA)."""
    seq, dim, base = 24, 8, 500
    rotary = RotaryEmbedding(kv_channels=dim, rotary_percent=1.0, rotary_base=base, use_cpu_initialization=True)
    freqs = rotary.get_freqs_non_repeated(seq)
    expected = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]  # get_emb, non-interleaved
    table = rotary_pos_emb(seq, dim, base=base, cp_group=None)
    assert table.shape == (seq, 1, 1, dim) and table.dtype == torch.float32
    torch.testing.assert_close(table, expected, rtol=1e-6, atol=1e-5)  # megatron computes in fp32
    with pytest.raises(ValueError, match="must be even"):
        rotary_angles(torch.arange(4), 7)


def capture_core_inputs(model) -> list[dict]:
    """Per attention layer: the q and k megatron's SelfAttention hands its core attention
    (after rotary embedding)."""
    captured = []
    for layer in model.decoder.layers:
        store: dict = {}
        captured.append(store)
        layer.self_attention.core_attention.register_forward_pre_hook(
            lambda module, args, store=store: store.update(q=args[0].detach(), k=args[1].detach()))
    return captured


def worker_rope(case: ParityCase) -> dict:
    """Rotated q/k of the CP model vs the single-process model on the same full weights; the
    negative twin takes the table from LOCAL positions; the NoPE model shows RoPE is applied."""
    world, rank = dist.get_world_size(), dist.get_rank()
    singles = [dist.new_group([r]) for r in range(world)]
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=world)
    try:
        ref_groups = ProcessGroupCollection(tp=singles[rank], pp=singles[rank], cp=None)
        reference = build_model(case, ref_groups)
        perturb(reference)
        nope = build_model(replace(case, position_embedding="none"), ref_groups)
        local = build_model(case, None)
        local.rotary_pos_emb = lambda n, device=None: rotary_angles(torch.arange(n), case.hidden // case.heads)
        models = {"ref": reference, "nope": nope, "cp": build_model(case, None), "local_positions": local}
        tokens = torch.randint(0, case.vocab, (case.batch, case.seq), generator=torch.Generator().manual_seed(3))
        out = {}
        for name, model in models.items():
            load_full_weights(model, reference, 1, 0)
            captured = capture_core_inputs(model)
            cp = name in ("cp", "local_positions")
            logits = model(shard(tokens, 1, "zigzag", world, rank) if cp else tokens)
            out[name] = {"logits": logits.detach(), "layers": captured}
        return out
    finally:
        parallel_state.destroy_model_parallel()


def rope_errors(results: list[dict], variant: str) -> dict[str, float]:
    ref = results[0]["ref"]["layers"]
    errors = {}
    for i, layer in enumerate(ref):
        for t in ("q", "k"):
            joined = unshard([r[variant]["layers"][i][t] for r in results], 0, "zigzag")
            errors[f"layer {i} {t}"] = rel_err(joined, layer[t])
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_rotated_qk_under_cp_equal_the_single_process_ones(dist_run, world):
    results = dist_run(worker_rope, world, ParityCase(pattern="AA", seq=16))
    errors = rope_errors(results, "cp")
    assert max(errors.values()) < TOL, errors
    twin = rope_errors(results, "local_positions")  # rotated at local positions: must differ
    assert min(twin.values()) > 1e-3, twin
    ref = results[0]
    assert rel_err(ref["nope"]["logits"], ref["ref"]["logits"]) > 1e-3  # the option is live
    assert rel_err(ref["nope"]["layers"][0]["q"], ref["ref"]["layers"][0]["q"]) > 1e-3  # megatron rotated q


def worker_bad_lm(kwargs: dict) -> None:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=1)
    try:
        build_hyena_lm(vocab_size=32, max_sequence_length=16, num_layers=1, hidden_size=16, layer_pattern="A",
                       **kwargs)
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("kwargs,match", [
    (dict(position_embedding="alibi"), r"position_embedding='alibi'; use one of \('rope', 'none'\)"),
    (dict(config_overrides=dict(rotary_interleaved=True)), "set rotary_interleaved=False"),
])
def test_bad_position_embedding_raises(dist_run, kwargs, match):
    (error,) = dist_run(worker_bad_lm, 1, kwargs, expect_error=ValueError)
    assert re.search(match, str(error)), error
