"""Three AdamW steps of the hybrid Hyena/attention LM under dp2, cp2, tp2, tp2 x cp2 and
dp2 x cp2 give the parameters of one process (fp64, < 1e-10), through the training loop's own
pieces: `init_parallel` (megatron rank order), FSDP2 over the dp x cp ranks of a TP shard
(`apply_data_parallel`, ``fsdp`` and ``ddp``; the loss share times `loss_scale`: sum over CP,
mean over DP) and the TP-aware `clip_grad_norm` on FSDP's DTensor gradients (active: the max
norm is below every step's norm)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state  # noqa: F401

from hyena_cp.megatron.compat import ProcessGroupCollection
from torch.distributed.tensor import DTensor

from hyena_cp.parallel import shard, tp_partition, unshard_tp
from hyena_cp.distributed import apply_data_parallel, clip_grad_norm
from hyena_cp.distributed.mesh import destroy_parallel, init_parallel
from hyena_cp.distributed.fsdp import loss_scale
from lm_parity import ParityCase, build_model, load_full_weights, perturb
from references import rel_err

STEPS, MAX_NORM, LR = 3, 0.05, 1e-2
TOL = 1e-10  # fp64


def global_batches(case: ParityCase, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One GLOBAL batch per step; every label counted, so each DP replica holds the same number
    of tokens and the mean of the replicas' mean losses is the global mean loss."""
    gen = torch.Generator().manual_seed(4321)
    tokens = [torch.randint(0, case.vocab, (batch, case.seq + 1), generator=gen) for _ in range(STEPS)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def train(model, batches, groups, dp: int, dp_rank: int, cp: int, cp_rank: int) -> list[float]:
    """STEPS optimizer steps as the training loop takes them; returns the global grad norms."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for inputs, labels in batches:
        rows = inputs.shape[0] // dp
        x, y = (shard(t[dp_rank * rows:(dp_rank + 1) * rows], 1, "zigzag", cp, cp_rank) for t in (inputs, labels))
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)  # b, s_local, vocab: gathered over TP, float64
        share = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / (rows * labels.shape[1])
        (share * loss_scale(cp)).backward()  # FSDP averages over dp x cp
        norms.append(float(clip_grad_norm(params, MAX_NORM, None if groups is None else groups.tp_group)))
        optimizer.step()
    return norms


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.detach().full_tensor() if isinstance(p, DTensor) else p.detach().clone()


def worker(dp: int, tp: int, cp: int, pattern: str, mode: str = "fsdp") -> dict:
    rank = dist.get_rank()
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]  # collective: every rank makes all
    groups = init_parallel(cp, tp=tp, megatron=True)
    try:
        case = ParityCase(pattern=pattern, tp=tp, cp=cp)
        batches = global_batches(case, batch=2 * dp)
        reference = build_model(case, ProcessGroupCollection(tp=singles[rank], pp=singles[rank], cp=None))
        perturb(reference)
        model = build_model(case, None, tp_size=tp)
        load_full_weights(model, reference, tp, groups.tp_rank)
        if dp * cp > 1:
            apply_data_parallel(model, groups.dp_cp_mesh, mode=mode)
        norms = train(model, batches, groups, dp, groups.dp_rank, cp, groups.cp_rank)
        out = {"tp_rank": groups.tp_rank, "norms": norms,
               "params": {n: _full(p) for n, p in model.named_parameters()},
               "partitions": {n: tp_partition(p) for n, p in model.named_parameters()}}
        if rank == 0:
            out["ref_norms"] = train(reference, batches, None, 1, 0, 1, 0)
            out["ref"] = {n: p.detach() for n, p in reference.named_parameters()}
        return out
    finally:
        destroy_parallel(groups)


def check(results: list[dict], tp: int) -> float:
    ref, partitions = results[0]["ref"], results[0]["partitions"]
    assert min(results[0]["ref_norms"]) > 2 * MAX_NORM, "clipping must be active for the test to cover it"
    worst = 0.0
    for r in results:
        assert max(abs(a - b) / b for a, b in zip(r["norms"], results[0]["ref_norms"])) < TOL, "grad norms"
    by_tp = {r["tp_rank"]: r for r in results}  # any DP/CP replica of each TP rank (all must agree, below)
    for name, p_ref in ref.items():
        part = partitions[name]
        full = by_tp[0]["params"][name] if part is None else unshard_tp(
            [by_tp[t]["params"][name] for t in range(tp)], part.dim, part.stride)
        worst = max(worst, rel_err(full, p_ref))
        assert rel_err(full, p_ref) < TOL, f"{name}: {rel_err(full, p_ref):.2e}"
        for r in results:  # replicas over DP and CP (and over TP for unsharded tensors) stay identical
            same = by_tp[r["tp_rank"]] if part is not None else by_tp[0]
            assert rel_err(r["params"][name], same["params"][name]) < TOL, f"{name} diverged across replicas"
    return worst


@pytest.mark.parametrize("dp,tp,cp,mode", [(2, 1, 1, "fsdp"), (1, 1, 2, "fsdp"), (1, 2, 1, "fsdp"),
                                           (1, 2, 2, "fsdp"), (2, 1, 2, "fsdp"), (1, 1, 2, "ddp"), (1, 2, 2, "ddp")])
def test_three_adamw_steps_equal_one_process(dist_run, dp, tp, cp, mode):
    results = dist_run(worker, dp * tp * cp, dp, tp, cp, "HHA", mode)
    print(f"worst parameter error: {check(results, tp):.1e}")


def test_check_catches_a_wrong_update(dist_run):
    """Negative twin: one TP rank's shard of a sharded weight nudged after training."""
    results = dist_run(worker, 4, 1, 2, 2, "HHA")
    name = next(n for n, p in results[0]["partitions"].items() if p is not None and "self_attention.mixer" in n)
    moved = next(r for r in results if r["tp_rank"] == 1)
    moved["params"][name] = moved["params"][name] * (1 + 1e-6)
    with pytest.raises(AssertionError, match="mixer"):
        check(results, 2)
