"""The megatron Hyena LM under tensor parallelism (TP=2) and TP x CP (2 x 2, four gloo
processes) equals the single-process model built from the same full weights: logits, loss
shares, embedding-output grads and every parameter gradient in float64, and the model's own
float32 vocab-parallel loss (tests/lm_parity.py). Wrong TP shard layouts must fail; bad TP
setups raise on every rank at construction.

Patterns: attention only, and the hybrids "HHA" / "HAH" (Hyena mixer with column/row-parallel
projections and TP-sharded short conv / D, next to megatron's TP attention)."""
from __future__ import annotations

import pytest
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state

from hyena_cp.megatron import build_hyena_lm
from lm_parity import ParityCase, assert_parity, assert_parity_fails, parity_worker

TP_PATTERNS = ["AA", "HHA", "HAH"]


@pytest.mark.parametrize("pattern", TP_PATTERNS)
def test_tp2_parity_and_wrong_shard_layouts_fail(dist_run, pattern):
    """SwiGLU (fc1 is a stride-2 partition) and GQA (one query group per TP rank)."""
    case = ParityCase(pattern=pattern, tp=2, glu=True, query_groups=2)
    results = dist_run(parity_worker, 2, case, ("exact", "swapped_ranks", "stride_one"))
    assert_parity(results)
    assert any(p is not None and p.stride > 1 for p in results[0]["partitions"].values()), \
        "no strided partition: the stride_one twin would test nothing"
    assert_parity_fails(results, "swapped_ranks")
    assert_parity_fails(results, "stride_one")


@pytest.mark.parametrize("pattern", TP_PATTERNS)
def test_tp2_cp2_parity_with_explicit_process_groups(dist_run, pattern):
    case = ParityCase(pattern=pattern, tp=2, cp=2, explicit_groups=True)
    results = dist_run(parity_worker, 4, case, ("exact", "local_keys"))
    assert_parity(results)
    assert_parity_fails(results, "local_keys")


# ------------------------------------------------------------------------- validation
def worker_bad_tp_lm(kwargs: dict, overrides: dict) -> None:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=1)
    try:
        fields = dict(vocab_size=32, max_sequence_length=16, num_layers=2, hidden_size=16, ffn_hidden_size=32,
                      num_attention_heads=4, layer_pattern="AA")
        build_hyena_lm(**{**fields, **kwargs}, config_overrides=overrides)
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("kwargs,overrides,match", [
    (dict(vocab_size=33), {}, "vocab_size=33 must be divisible by the tensor-parallel size 2"),
    (dict(ffn_hidden_size=31), {}, "ffn_hidden_size=31 must be divisible by the tensor-parallel size 2"),
    (dict(num_attention_heads=1), {}, "num_attention_heads=1 must be divisible by the tensor-parallel size 2"),
    ({}, dict(num_query_groups=1), "num_query_groups=1 must be divisible by the tensor-parallel size 2"),
    ({}, dict(tensor_model_parallel_size=4), "config.tensor_model_parallel_size=4 differs"),
    ({}, dict(tensor_model_parallel_size=2, sequence_parallel=True), "sequence_parallel=True is not supported"),
])
def test_bad_tp_setup_raises_on_every_rank(dist_run, kwargs, overrides, match):
    errors = dist_run(worker_bad_tp_lm, 2, kwargs, overrides, expect_error=ValueError)
    assert all(match in str(e) for e in errors), errors

