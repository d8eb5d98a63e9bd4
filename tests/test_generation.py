"""Generation with the megatron Hyena LM under CP (and TP) against one process in float64.

- Prefill of a prompt (zigzag shards) then one decode step per token: the logits equal the
  single-process model's full forward at EVERY position (rel. error < 1e-10), on every rank.
- ``generate`` equals the naive loop that re-runs the full forward on the growing sequence:
  greedy, and sampling with the same seed; the prompt length leaves a remainder that is not
  zigzag-shardable (decoded token by token), at CP=4 the whole prompt.
- Patterns all-Hyena and hybrid (attention with RoPE); CP in {1, 2, 4}; TP=2 and TP=2 x CP=2.
- Negative twin: a Hyena cache whose long-conv taps are one position off must fail.
- Cache bytes per rank are exactly 1/(TP*CP) of one process's.
- Limits raise ``ValueError`` on every rank before any communication.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state

from hyena_cp.megatron import HyenaMixerConfig, build_hyena_lm
from hyena_cp.megatron.compat import ProcessGroupCollection
from hyena_cp.megatron.generation import InferenceCache, generate_by_recompute
from hyena_cp.modules.inference import LongConvState
from hyena_cp.parallel import shard, unshard
from lm_parity import ParityCase, build_model, load_full_weights, perturb
from references import rel_err

TOL = 1e-10  # fp64
PREFILL = 16  # of ParityCase.seq = 32: zigzag chunks of 2 at CP=4, the short-conv halo
PROMPT, NEW = 11, 8  # 11 = 8 prefilled + 3 decoded at CP=2; not shardable at all at CP=4


def off_by_one_tail(self: LongConvState, n: int) -> torch.Tensor:
    """Negative twin of `LongConvState.filter_tail`: the taps of the position before (the cache lags a token)."""
    taps = self.tensors["filter_rev"]
    return F.pad(taps[:, taps.shape[1] - n + 1:], (0, 1))


def decode_logits(model, tokens: torch.Tensor, cp: int, cp_rank: int) -> dict:
    """Prefill ``tokens[:, :PREFILL]`` (this rank's shard), then one step per remaining token."""
    cache = InferenceCache(model, batch_size=tokens.shape[0], capacity=tokens.shape[1])
    prefill = cache.prefill(shard(tokens[:, :PREFILL], 1, "zigzag", cp, cp_rank))
    steps = torch.stack([cache.step(tokens[:, t:t + 1]) for t in range(PREFILL, tokens.shape[1])], dim=1)
    return {"prefill": prefill, "steps": steps, "bytes": cache.nbytes()}


def generation_worker(case: ParityCase) -> dict:
    """On ``case.tp * case.cp`` ranks: the single-process reference (rank 0) and the CP/TP model."""
    rank = dist.get_rank()
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=case.tp, context_parallel_size=case.cp)
    try:
        reference = build_model(case, ProcessGroupCollection(tp=singles[rank], pp=singles[rank], cp=None)).eval()
        perturb(reference)
        model = build_model(case, None, tp_size=case.tp).eval()
        tp_rank, cp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_context_parallel_rank()
        load_full_weights(model, reference, case.tp, tp_rank)
        tokens = torch.randint(0, case.vocab, (case.batch, case.seq), generator=torch.Generator().manual_seed(5))
        prompt = tokens[:, :PROMPT]
        out = {"cp_rank": cp_rank, "tp_rank": tp_rank, **decode_logits(model, tokens, case.cp, cp_rank),
               "greedy": model.generate(prompt, NEW, temperature=0.0),
               "sampled": model.generate(prompt, NEW, temperature=0.9, top_k=5,
                                         generator=torch.Generator().manual_seed(11))}
        exact = LongConvState.filter_tail
        LongConvState.filter_tail = off_by_one_tail
        try:
            out["twin"] = decode_logits(model, tokens, case.cp, cp_rank)
        finally:  # the worker process is reused by later tests
            LongConvState.filter_tail = exact
        if rank == 0:
            with torch.no_grad():
                out["ref"] = reference(tokens)
            out["ref_bytes"] = decode_logits(reference, tokens, 1, 0)["bytes"]
            out["ref_greedy"] = generate_by_recompute(reference, prompt, NEW, temperature=0.0)
            out["ref_sampled"] = generate_by_recompute(reference, prompt, NEW, temperature=0.9, top_k=5,
                                                       generator=torch.Generator().manual_seed(11))
        return out
    finally:
        parallel_state.destroy_model_parallel()


def logit_errors(results: list[dict], key: str = "exact") -> dict[str, float]:
    """Worst relative error of the prefill logits and of each decode position (every rank)."""
    ref = results[0]["ref"]
    runs = [r if key == "exact" else r[key] for r in results]
    cp = 1 + max(r["cp_rank"] for r in results)
    per_cp = [next(run for run, r in zip(runs, results) if r["cp_rank"] == c and r["tp_rank"] == 0)
              for c in range(cp)]
    errors = {"prefill": rel_err(unshard([run["prefill"] for run in per_cp], 1, "zigzag"), ref[:, :PREFILL])}
    for i in range(ref.shape[1] - PREFILL):
        errors[f"position {PREFILL + i}"] = max(rel_err(run["steps"][:, i], ref[:, PREFILL + i]) for run in runs)
    return errors


CASES = [ParityCase(pattern=p, cp=cp) for p in ("HH", "HAH") for cp in (1, 2, 4)]
CASES += [ParityCase(pattern="HAH", tp=2), ParityCase(pattern="HAH", tp=2, cp=2)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.pattern}-tp{c.tp}-cp{c.cp}")
def test_cached_decoding_equals_the_full_forward(dist_run, case):
    results = dist_run(generation_worker, case.tp * case.cp, case)
    errors = logit_errors(results)
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"cached decoding differs from the full forward (tolerance {TOL}): {bad}"
    ref = results[0]
    for r in results:
        assert torch.equal(r["greedy"], ref["ref_greedy"]), (r["greedy"], ref["ref_greedy"])
        assert torch.equal(r["sampled"], ref["ref_sampled"]), (r["sampled"], ref["ref_sampled"])
    twin = max(logit_errors(results, "twin").values())
    assert twin > 1e-3, f"a cache one position off should fail, but its worst error is {twin:.2e}"
    # channels (Hyena) and heads (attention) split over TP, positions (attention) or channels over CP
    assert all(r["bytes"] * case.tp * case.cp == ref["ref_bytes"] for r in results), [r["bytes"] for r in results]


# ------------------------------------------------------------------------- limits
def worker_limits(what: str) -> None:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=dist.get_world_size())
    try:
        max_len = None if what == "relative filters" else 32
        torch.manual_seed(0)
        model = build_hyena_lm(vocab_size=32, max_sequence_length=32, num_layers=2, hidden_size=16,
                               ffn_hidden_size=32, layer_pattern="HA",
                               hyena=HyenaMixerConfig(num_heads=4, filter_width=16, max_len=max_len))
        prompt = torch.zeros(1, 8, dtype=torch.long)
        if what == "too long":
            model.generate(prompt, 25)
        elif what == "temperature":
            model.generate(prompt, 2, temperature=-0.5)
        elif what == "relative filters":
            model.generate(prompt, 2)
        elif what == "capacity":
            InferenceCache(model, batch_size=1, capacity=33)
        elif what == "batch":
            InferenceCache(model, batch_size=1, capacity=4).step(torch.zeros(2, 1, dtype=torch.long))
        elif what == "full":
            cache = InferenceCache(model, batch_size=1, capacity=2)
            cache.step(prompt[:, :1])
            cache.step(prompt[:, :1])
            cache.step(prompt[:, :1])
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("what,world,match", [
    ("too long", 2, "exceeds the model's context of 32 tokens"),
    ("temperature", 2, "temperature=-0.5 must be >= 0"),
    ("relative filters", 2, "decoding needs Hyena filters with a fixed max_len"),
    ("capacity", 2, "capacity=33 must be between 1 and the model's context 32"),
    ("batch", 2, "tokens must be [b=1, s] (the cache's batch)"),
    ("full", 1, "holds 2 of its 2 positions and cannot take 1 more"),
])
def test_limits_raise_on_every_rank_before_communicating(dist_run, what, world, match):
    errors = dist_run(worker_limits, world, what, expect_error=ValueError)
    assert all(match in str(e) for e in errors), errors
