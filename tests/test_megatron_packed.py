"""Packed sequences on megatron-core (float64, gloo): the CP attention with a per-document mask
and the Hyena language model (Hyena + attention + per-document RoPE) with ``cu_seqlens`` equal
every document run ALONE in one process, at CP in {1, 2, 4}; TP=2 x CP=2 equals the
single-process packed model (tests/lm_parity.py); runs that ignore the boundaries must fail;
bad boundaries raise on every rank before any communication. The mixer alone:
tests/test_cp_packed_mixer.py; under TP x CP: tests/test_megatron_tp_mixer.py."""
from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state
from megatron.core.transformer.spec_utils import build_module

from hyena_cp.megatron import IGNORE_INDEX, HyenaMixerConfig, TorchCoreAttention, get_hyena_layer_spec
from hyena_cp.megatron.compat import AttnMaskType, MegatronModule, PackedSeqParams, ProcessGroupCollection
from hyena_cp.megatron.packing import make_packed_seq_params
from hyena_cp.ops.packing import concat_cu_seqlens
from hyena_cp.parallel import shard, unshard
from lm_parity import ParityCase, assert_parity, assert_parity_fails, batch, build_model, load_full_weights, \
    parity_worker, perturb
from references import rel_err
from test_megatron_attention_cp import core_attention_errors, make_config

TOL = 1e-10  # float64

# Rows of 32 tokens. CP=4 cuts them into 8 chunks of 4: row 0's documents start at 1, 8, 11
# and 23 (inside chunks 0, 2, 2, 5: every rank holds a boundary), its 12-token document spans
# chunks 2..5 (ranks 2, 3, then back to 2); row 1's 17-token one spans ranks 0..3 and back.
DOCS = ((1, 7, 3, 12, 9), (17, 2, 13))
CASE = ParityCase(pattern="HAH", seq=32, docs=DOCS)


def spans(docs):
    for row, lengths in enumerate(docs):
        start = 0
        for n in lengths:
            yield row, start, start + n
            start += n


# ------------------------------------------------------------------ core attention
def reference_document_attention(q, k, v, docs):
    """float64 causal softmax attention of every document alone: ``q [s, b, n, d]``, ``k, v [s, b, g, d]``."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    out = torch.zeros(q.shape[0], q.shape[1], q.shape[2] * q.shape[3], dtype=q.dtype)
    for row, a, b in spans(docs):
        qd, kd, vd = (t[a:b, row] for t in (q, k, v))  # n, heads, d
        scores = torch.einsum("snd,tnd->nst", qd, kd) / math.sqrt(q.shape[-1])
        masked = torch.ones(b - a, b - a, dtype=torch.bool).triu(1)
        probs = scores.masked_fill(masked, float("-inf")).softmax(-1)
        out[a:b, row] = torch.einsum("nst,tnd->snd", probs, vd).flatten(1)
    return out


def worker_core_attention(groups: int, ignore_boundaries: bool) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    attn = TorchCoreAttention(make_config(), layer_number=1, attn_mask_type=AttnMaskType.causal,
                              attention_type="self", pg_collection=ProcessGroupCollection(cp=dist.group.WORLD))
    seq, heads, dim = 32, 4, 8
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(seq, 2, heads, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (torch.randn(seq, 2, groups, dim, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(seq, 2, heads * dim, dtype=torch.float64, generator=gen)
    ref = reference_document_attention(q, k, v, DOCS)
    ref.backward(grad_out)
    local = [shard(t.detach(), 0, "zigzag", world, rank).requires_grad_() for t in (q, k, v)]
    params = None if ignore_boundaries else make_packed_seq_params(CASE.cu_seqlens())
    out = attn(*local, attention_mask=None, packed_seq_params=params)
    out.backward(shard(grad_out, 0, "zigzag", world, rank))
    return {"out": out.detach(), "grads": [t.grad for t in local], "ref": ref.detach(),
            "ref_grads": [t.grad for t in (q, k, v)]}


@pytest.mark.parametrize("groups", [4, 2])  # multi-head and grouped-query
@pytest.mark.parametrize("world", [1, 2, 4])
def test_packed_cp_attention_equals_each_document_alone(dist_run, world, groups):
    errors = core_attention_errors(dist_run(worker_core_attention, world, groups, False))
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("world", [1, 4])
def test_attention_across_documents_fails(dist_run, world):
    errors = core_attention_errors(dist_run(worker_core_attention, world, 4, True))
    assert errors["out"] > 1e-3 and errors["grad k"] > 1e-3, errors


# ------------------------------------------------------------- LM: each document alone
def lm_forward_backward(model, inputs, labels, count, cp_group, **packed) -> dict:
    world, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    x, y = (shard(t, 1, "zigzag", world, rank) for t in (inputs, labels))
    logits = model(x, **packed)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum") / count
    loss.backward()
    out = {"logits": logits.detach(), "loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    model.zero_grad(set_to_none=True)
    return out


def documents_alone(model, inputs, labels, count) -> dict:
    """One process: every document through the model on its own (RoPE from 0, its own causal
    prefix, Hyena filters from tap 0); losses divided by the packed batch's count."""
    logits, loss = None, 0.0
    for row, a, b in spans(CASE.docs):
        piece = model(inputs[row:row + 1, a:b])  # 1, n, vocab
        doc_loss = F.cross_entropy(piece[0], labels[row, a:b], ignore_index=IGNORE_INDEX, reduction="sum") / count
        doc_loss.backward()
        if logits is None:
            logits = piece.new_zeros(*inputs.shape, piece.shape[-1])
        logits[row, a:b] = piece[0].detach()
        loss = loss + doc_loss.detach()
    return {"logits": logits, "loss": loss, "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def worker_lm(case: ParityCase) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    singles = [dist.new_group([r]) for r in range(world)]
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=world)
    try:
        reference = build_model(case, ProcessGroupCollection(tp=singles[rank], pp=singles[rank], cp=None))
        perturb(reference)
        model = build_model(case, None)
        load_full_weights(model, reference, 1, 0)
        inputs, labels = batch(case)
        cu, count = case.cu_seqlens(), (labels != IGNORE_INDEX).sum()
        cp_group = parallel_state.get_context_parallel_group()
        out = {"packed": lm_forward_backward(model, inputs, labels, count, cp_group, cu_seqlens=cu),
               "ignored": lm_forward_backward(model, inputs, labels, count, cp_group),  # negative twin
               "params": lm_forward_backward(model, inputs, labels, count, cp_group,
                                             packed_seq_params=make_packed_seq_params(cu))}
        out["ref"] = documents_alone(reference, inputs, labels, count) if rank == 0 else None
        return out
    finally:
        parallel_state.destroy_model_parallel()


def lm_errors(results: list[dict], key: str) -> dict[str, float]:
    ref = results[0]["ref"]
    errors = {"logits": rel_err(unshard([r[key]["logits"] for r in results], 1, "zigzag"), ref["logits"]),
              "loss": rel_err(sum(r[key]["loss"] for r in results), ref["loss"])}
    for name, g_ref in ref["grads"].items():
        assert g_ref.norm() > 0, f"reference grad of {name} is zero: the comparison would be vacuous"
        errors[f"grad of {name}"] = rel_err(sum(r[key]["grads"][name] for r in results), g_ref)
    return errors


@pytest.mark.parametrize("world", [1, 2, 4])
def test_packed_lm_equals_each_document_alone(dist_run, world):
    results = dist_run(worker_lm, world, CASE)
    for key in ("packed", "params"):  # cu_seqlens=, and megatron's PackedSeqParams
        errors = lm_errors(results, key)
        bad = {k: v for k, v in errors.items() if not v < TOL}
        assert not bad, (key, bad)
    twin = lm_errors(results, "ignored")
    assert twin["logits"] > 1e-3 and twin["loss"] > 1e-3, twin


def test_packed_lm_tp2_cp2_equals_the_single_process_packed_lm(dist_run):
    results = dist_run(parity_worker, 4, replace(CASE, tp=2, cp=2), ("exact", "no_boundaries"))
    assert_parity(results)
    assert_parity_fails(results, "no_boundaries")


# --------------------------------------------------------------------- validation
class NotTorchAttention(MegatronModule):
    """Stands in for TEDotProductAttention, which does not know this packed layout."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)


def worker_bad_lm(kind: str) -> None:
    world = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=world)
    try:
        core = NotTorchAttention if kind == "te" else TorchCoreAttention
        model = build_model(CASE, None, core_attention=core)
        x = torch.zeros(2, 32 // world, dtype=torch.long)
        good = CASE.cu_seqlens()
        if kind == "relative":  # Hyena max_len=None; the attention layer would gather K/V first
            model = build_model(replace(CASE, pattern="AH", relative_filters=True), None)
            model(x, cu_seqlens=good)
        elif kind == "both":
            model(x, cu_seqlens=good, packed_seq_params=make_packed_seq_params(good))
        elif kind == "thd":
            model(x, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=good, cu_seqlens_kv=good))
        elif kind == "padded":
            model(x, packed_seq_params=PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=good, cu_seqlens_kv=good,
                                                       cu_seqlens_q_padded=good + torch.arange(len(good))))
        else:
            model(x, cu_seqlens={"crosses": torch.tensor([0, 20, 64]), "end": torch.tensor([0, 32]), "te": good}[kind])
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("kind,match", [
    ("crosses", "must contain every row end b\\*L \\(L=32\\)"),
    ("end", "end at the global token count B\\*L=64"),
    ("both", "cu_seqlens or packed_seq_params, not both"),
    ("thd", "qkv_format='thd' is megatron's THD\\(\\+CP\\) layout"),
    ("padded", "cu_seqlens_q_padded differs from cu_seqlens_q"),
    ("te", "need core_attention=TorchCoreAttention"),
    ("relative", "need Hyena filters with absolute positions, but max_len=None"),
])
def test_bad_packing_raises_on_every_rank_before_communicating(dist_run, kind, match):
    errors = dist_run(worker_bad_lm, 2, kind, expect_error=ValueError)
    assert all(re.search(match, str(e)) for e in errors), errors


def worker_relative_filter_mixer(docs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hyena mixer alone (megatron's self-attention interface, CP over every rank) with
    length-relative filters: its output packed as ``docs``, and unpacked."""
    world = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=world)
    try:
        torch.manual_seed(0)
        spec = get_hyena_layer_spec(HyenaMixerConfig(num_heads=4, max_len=None))
        config = make_config(hidden_size=16, params_dtype=torch.float64, context_parallel_size=world)
        mixer = build_module(spec.submodules.self_attention, config=config, layer_number=1)
        rows = [torch.tensor([0, *torch.tensor(row).cumsum(0).tolist()]) for row in docs]
        x = torch.randn(32 // world, 2, 16, dtype=torch.float64)
        packed, _ = mixer(x, packed_seq_params=make_packed_seq_params(concat_cu_seqlens(rows, 32)))
        return packed.detach(), mixer(x)[0].detach()
    finally:
        parallel_state.destroy_model_parallel()


def test_packed_mixer_with_relative_filters_raises_on_every_rank(dist_run):
    errors = dist_run(worker_relative_filter_mixer, 2, DOCS, expect_error=ValueError)
    assert all("max_len=None" in str(e) and "HyenaMixerConfig(max_len=...)" in str(e) for e in errors), errors


def test_one_document_per_row_with_relative_filters_is_the_unpacked_mixer(dist_run):
    """The rows themselves are the documents: nothing to refuse, nothing changes."""
    for packed, plain in dist_run(worker_relative_filter_mixer, 2, ((32,), (32,))):
        assert torch.equal(packed, plain)
