"""Hyena language model on megatron-core: context-parallel runs (gloo, zigzag shards) equal
the single-process model — logits, loss, every parameter gradient (summed over CP) and one
AdamW step — under ``parallel_state`` and under an explicit ``ProcessGroupCollection``;
hybrids with attention layers (K/V gathered over CP, RoPE) in float64 through the parity
harness of tests/lm_parity.py, with attention over local keys only as the failing twin.
TP and TP x CP: tests/test_megatron_lm_tp.py."""
from __future__ import annotations

import re
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import torch.distributed as dist
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state

from hyena_cp.megatron import HyenaMixerConfig, build_hyena_lm
from hyena_cp.megatron.compat import ProcessGroupCollection
from hyena_cp.parallel import count_comm, group_rank, group_size, group_sum, shard, unshard
from lm_parity import ParityCase, assert_parity, assert_parity_fails, parity_worker
from references import rel_err

# fp32 parity of logits, loss and gradients (norm-wise relative): CP only reorders sums of at most
# N = b*L = 64 float32 terms (split over ranks); reordering moves a sum by <= 2*N*u*sum|terms|
# (u = 2**-24, 64*2*6e-8 = 7.6e-6 of the terms' magnitude), and the norm over a whole tensor is
# dominated by its large, uncancelled entries. Measured <= 1e-6 on AVX-512, AVX2 and default
# kernels (docs/reliability.md).
TOL = 1e-5
U32 = 2.0**-24  # float32 unit roundoff


@dataclass(frozen=True)
class LMCase:
    pattern: str = "HH"
    seq: int = 32  # global; P=4 -> 8 zigzag chunks of 4 tokens >= the short-conv halo 2
    batch: int = 2
    vocab: int = 32
    hidden: int = 16
    heads: int = 4  # Hyena filter groups, divisible by every P
    lr: float = 1e-2


def build(case: LMCase, pg_collection: ProcessGroupCollection | None):
    """The same model and batch on every process (seeded)."""
    torch.manual_seed(1234)
    model = build_hyena_lm(vocab_size=case.vocab, max_sequence_length=case.seq, num_layers=len(case.pattern),
                           hidden_size=case.hidden, ffn_hidden_size=2 * case.hidden, layer_pattern=case.pattern,
                           hyena=HyenaMixerConfig(num_heads=case.heads, filter_width=16, max_len=case.seq),
                           pg_collection=pg_collection)
    with torch.no_grad():  # zero biases / unit norm weights would hide some gradient bugs
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tokens = torch.randint(0, case.vocab, (case.batch, case.seq + 1))
    return model, tokens[:, :-1], tokens[:, 1:]  # labels shifted on the GLOBAL sequence


def run(case: LMCase, pg_collection: ProcessGroupCollection | None, cp_group, twin: str | None = None) -> dict:
    """Forward, backward of this rank's loss share, CP-summed grads, one AdamW step.
    Negative twins of the step: ``"unsummed"`` steps on this rank's share of the gradient,
    ``"lr"`` with a learning rate 0.1 % off."""
    model, inputs, labels = build(case, pg_collection)
    world, rank = group_size(cp_group), group_rank(cp_group)
    x, y = (shard(t, 1, "zigzag", world, rank) for t in (inputs, labels))
    logits = model(x)
    loss_share = model(x, y).sum() / labels.numel()  # sum over CP ranks = global mean loss
    loss_share.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():  # what a CP training loop does before the optimizer step
        p.grad = p.grad if twin == "unsummed" else group_sum(p.grad, cp_group)
    step_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=case.lr * (1.001 if twin == "lr" else 1.0)).step()
    return {"logits": logits.detach(), "loss": loss_share.detach(), "grads": grads, "step_grads": step_grads,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def reference_groups() -> ProcessGroupCollection:
    """One-process groups of parallel_state (tp=pp=1) without CP: the single-process model."""
    return ProcessGroupCollection(tp=parallel_state.get_tensor_model_parallel_group(),
                                  pp=parallel_state.get_pipeline_model_parallel_group(), cp=None)


def worker_parallel_state(case: LMCase, twin: str | None = None) -> dict:
    world = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=world)
    try:
        out = run(case, None, parallel_state.get_context_parallel_group(), twin)
        out["ref"] = run(case, reference_groups(), None) if dist.get_rank() == 0 else None
        return out
    finally:
        parallel_state.destroy_model_parallel()


def worker_pg_collection(case: LMCase) -> dict:
    assert not parallel_state.model_parallel_is_initialized()
    rank, world = dist.get_rank(), dist.get_world_size()
    singles = [dist.new_group([r]) for r in range(world)]  # collective: every rank creates every group
    pgs = ProcessGroupCollection(tp=singles[rank], pp=singles[rank], cp=dist.group.WORLD)
    out = run(case, pgs, dist.group.WORLD)
    out["ref"] = run(case, ProcessGroupCollection(tp=singles[0], pp=singles[0], cp=None), None) if rank == 0 else None
    return out


def check_parity(results: list[dict]) -> None:
    """Gathered logits, summed loss shares and CP-summed grads against the single process."""
    ref = results[0]["ref"]
    assert rel_err(unshard([r["logits"] for r in results], 1, "zigzag"), ref["logits"]) < TOL, "logits"
    assert rel_err(sum(r["loss"] for r in results), ref["loss"]) < TOL, "loss"
    assert results[0]["grads"].keys() == ref["grads"].keys()
    for name, g_ref in ref["grads"].items():
        assert g_ref.norm() > 0, f"grad of {name} is zero: the comparison would be vacuous"
        assert rel_err(sum(r["grads"][name] for r in results), g_ref) < TOL, f"grad of {name}"


@pytest.mark.parametrize("world", [1, 2, 4])
def test_lm_parity_under_parallel_state(dist_run, world):
    check_parity(dist_run(worker_parallel_state, world, LMCase()))


@pytest.mark.parametrize("world", [2, 4])
def test_lm_parity_with_explicit_process_groups(dist_run, world):
    check_parity(dist_run(worker_pg_collection, world, LMCase()))


def adamw_first_step(grad: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """AdamW's first update per unit learning rate, exactly (float64): with bias correction
    m_hat = g and sqrt(v_hat) = |g|, so the step is ``g / (|g| + eps)`` (torch's default eps)."""
    g = grad.double()
    return g / (g.abs() + eps)


def check_adamw_step(results: list[dict], lr: float) -> None:
    """Every CP rank holds the same updated model, stepped with the summed gradient (parity
    `TOL`), and each parameter moved as the single process's did, up to what the two runs'
    float32 gradients and roundoff explain, element by element:

        |p_cp - p_ref| <= lr * |s(g_cp) - s(g_ref)| + 2 * u * (3 |p| + 10 lr),   s = `adamw_first_step`

    A norm-wise tolerance cannot hold on every CPU: ``s`` maps a gradient entry below Adam's
    eps (1e-8) with relative error r to a step error of up to ~r * lr; entries of 1e-9, from sums
    that nearly cancel, carry r of 10 % (2.9e-4 on an element of in_proj here), and the entries,
    and r, depend on the CPU's summation order. The roundoff term: each run rounds the decayed
    parameter (twice), the moments, ``sqrt(v) + eps``, the quotient and the sum, each to u
    relative of |p| or of the update lr * |s| <= lr."""
    ref = results[0]["ref"]
    for name, p_ref in ref["params"].items():
        for r in results[1:]:
            assert torch.equal(r["params"][name], results[0]["params"][name]), f"{name} differs across CP ranks"
        g_cp, g_ref = results[0]["step_grads"][name], ref["step_grads"][name]
        assert rel_err(g_cp, g_ref) < TOL, f"step gradient of {name}: {rel_err(g_cp, g_ref):.2e}"
        allowed = lr * (adamw_first_step(g_cp) - adamw_first_step(g_ref)).abs() \
            + 2 * U32 * (3 * p_ref.double().abs() + 10 * lr)
        excess = (results[0]["params"][name].double() - p_ref.double()).abs() - allowed
        assert excess.max() <= 0, f"{name}: a step is off by {excess.max():.2e} more than the bound allows"


def test_one_adamw_step_gives_the_same_parameters(dist_run):
    check_adamw_step(dist_run(worker_parallel_state, 2, LMCase()), LMCase().lr)


@pytest.mark.parametrize("twin,match", [("unsummed", "differs across CP ranks"), ("lr", "more than the bound allows")])
def test_the_adamw_check_catches_a_wrong_step(dist_run, twin, match):
    """Negative twins: stepping on this rank's gradient share, or with lr off by 0.1 %."""
    with pytest.raises(AssertionError, match=match):
        check_adamw_step(dist_run(worker_parallel_state, 2, LMCase(), twin), LMCase().lr)


def test_parity_check_catches_a_wrong_gradient(dist_run):
    results = dist_run(worker_parallel_state, 2, LMCase())
    name = next(n for n in results[1]["grads"] if "hyena.filter" in n)
    results[1]["grads"][name] = results[1]["grads"][name] * 1.001
    with pytest.raises(AssertionError, match=re.escape(name)):
        check_parity(results)


# ------------------------------------------------------------ hybrids with attention
def forbidden_cuda(*args, **kwargs):
    raise AssertionError("CUDA was initialised or queried on the CPU path")


def worker_hybrid_no_cuda(case: LMCase) -> dict:
    """Build, forward, backward of an LM with CUDA forbidden. Every Python-level CUDA call
    (current_device, RNG states, synchronize, the lazy init of a CUDA tensor) passes through
    ``torch.cuda._lazy_init``; on a CPU-only torch any CUDA use raises anyway."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=1)
    try:
        with mock.patch.object(torch.cuda, "_lazy_init", forbidden_cuda):
            model, inputs, labels = build(case, None)
            logits = model(inputs)
            model(inputs, labels).mean().backward()
            cut = case.seq // 2
            changed = inputs.clone()
            changed[:, cut:] = (changed[:, cut:] + 1) % case.vocab
            logits_changed = model(changed)
        return {"logits": logits.detach(), "logits_changed": logits_changed.detach(), "cut": cut,
                "grad_norms": {n: p.grad.norm().item() for n, p in model.named_parameters()}}
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("pattern", ["HH", "HAH"])
def test_lm_is_causal_and_cuda_free(dist_run, pattern):
    (out,) = dist_run(worker_hybrid_no_cuda, 1, LMCase(pattern=pattern))
    cut = out["cut"]
    # FFT round-off (fp32) is the only way later tokens may touch earlier logits.
    torch.testing.assert_close(out["logits_changed"][:, :cut], out["logits"][:, :cut], rtol=0, atol=1e-5)
    assert (out["logits_changed"][:, cut:] - out["logits"][:, cut:]).abs().max() > 1e-3
    assert all(norm > 0 for norm in out["grad_norms"].values()), out["grad_norms"]


@pytest.mark.parametrize("pattern", ["HHA", "HAH"])
@pytest.mark.parametrize("cp", [2, 4])
def test_hybrid_lm_parity_in_float64(dist_run, cp, pattern):
    """Attention and Hyena layers under CP (RoPE), fp64; local-keys attention must fail."""
    results = dist_run(parity_worker, cp, ParityCase(pattern=pattern, cp=cp), ("exact", "local_keys"))
    assert_parity(results)
    assert_parity_fails(results, "local_keys")


def worker_bad_batch(case: LMCase, local_len: int) -> None:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=dist.get_world_size())
    try:
        model, _, _ = build(case, None)
        model(torch.zeros(1, local_len, dtype=torch.long))
    finally:
        parallel_state.destroy_model_parallel()


def worker_disagreeing_batch(case: LMCase) -> None:
    """Local lengths 8 and 6 (each valid alone): the attention layer's K/V all-gather comes first."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=dist.get_world_size())
    try:
        model, _, _ = build(case, None)
        with count_comm() as stats:
            try:
                model(torch.zeros(1, 6 if dist.get_rank() == dist.get_world_size() - 1 else 8, dtype=torch.long))
            finally:
                assert stats.control_calls == {"agreement": 1}, stats.control_calls  # once, not once per layer
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("cp", [2, 4])
def test_disagreeing_ranks_all_raise_the_same_error(dist_run, cp):
    errors = dist_run.run(worker_disagreeing_batch, cp, (LMCase(pattern="AH"),), expect_error=ValueError, timeout=30)
    assert len({str(e) for e in errors}) == 1, errors
    assert "input_ids.shape: (1, 8) on rank" in str(errors[0]) and f"(1, 6) on rank {cp - 1}" in str(errors[0])


@pytest.mark.parametrize("local_len,match", [
    (3, r"global sequence length \(s_local=3 x cp_size\)=6 must be divisible by 2\*cp_size=4 .*pad it"),
    (20, "exceeds max_sequence_length"),
])
def test_bad_batch_raises_on_every_rank_before_communicating(dist_run, local_len, match):
    errors = dist_run(worker_bad_batch, 2, LMCase(), local_len, expect_error=ValueError)
    assert all(re.search(match, str(e)) for e in errors), errors


def worker_outputs_are_not_views(case: LMCase) -> tuple[bool, bool]:
    world = dist.group.WORLD
    model, inputs, labels = build(case, ProcessGroupCollection(tp=world, pp=world, cp=None))
    return model(inputs)._base is None, model(inputs, labels)._base is None


def test_outputs_are_tensors_of_their_own(dist_run):
    """FSDP2 hooks the root's output; a view would make it warn (and an in-place op drop the hook)."""
    assert dist_run(worker_outputs_are_not_views, 1, LMCase(batch=1)) == [(True, True)]
    assert dist_run(worker_outputs_are_not_views, 1, LMCase(batch=2)) == [(True, True)]
