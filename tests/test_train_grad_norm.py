"""TP-aware gradient clipping (`hyena_cp.distributed.grad_norm`): at TP = 2 and 4, the norm every
rank computes (and the factor it clips by) is that of the FULL single-process gradient, for a
module of megatron-core TP layers with sharded (stride 3 and 1) and replicated parameters.
The negative twins show what the test guards against: torch's local-only norm (and local
clipping) on a TP rank misses the other ranks' shards."""
from __future__ import annotations

import megatron.core.parallel_state  # noqa: F401  (imported before the dist_run workers fork)
import pytest
import torch
import torch.nn.functional as F

from hyena_cp.parallel import count_comm, tp_partition, unshard_tp
from hyena_cp.distributed import clip_grad_norm, grad_norm
from hyena_cp.distributed.mesh import destroy_parallel, init_parallel
from tp_helpers import FEATURES, TinyTPModel

MAX_NORM_FRACTION = 0.25  # clip to a quarter of the norm, so clipping changes every gradient


def _grads_and_norms(tp: int) -> dict:
    """Backward of one loss at TP size ``tp`` (= world), then the norms and both kinds of clipping."""
    groups = init_parallel(1, tp=tp, megatron=True)
    try:
        torch.manual_seed(0)  # the same FULL model at every TP size (megatron's CPU init)
        model = TinyTPModel(dtype=torch.float64)
        gen = torch.Generator().manual_seed(1)
        x, y = (torch.randn(5, FEATURES, generator=gen, dtype=torch.float64) for _ in range(2))
        F.mse_loss(model(x), y, reduction="sum").backward()
        params = dict(model.named_parameters())
        grads = {n: p.grad.clone() for n, p in params.items()}
        with count_comm() as stats:
            norm = grad_norm(params.values(), groups.tp_group)
        max_norm = MAX_NORM_FRACTION * float(norm)
        clip_grad_norm(params.values(), max_norm, groups.tp_group)
        clipped = {n: p.grad.clone() for n, p in params.items()}
        for n, p in params.items():
            p.grad.copy_(grads[n])
        local_norm = torch.nn.utils.clip_grad_norm_(params.values(), max_norm)  # the naive twin
        return {"grads": grads, "norm": norm, "clipped": clipped, "max_norm": max_norm, "local_norm": local_norm,
                "local_clipped": {n: p.grad.clone() for n, p in params.items()},
                "partitions": {n: tp_partition(p) for n, p in params.items()}, "calls": dict(stats.calls)}
    finally:
        destroy_parallel(groups)


def _full(results: list[dict], key: str) -> dict[str, torch.Tensor]:
    """Full tensors from every TP rank's ``results[rank][key]``: shards joined, replicas checked equal."""
    out = {}
    for name, part in results[0]["partitions"].items():
        pieces = [r[key][name] for r in results]
        if part is None:
            assert all(torch.equal(p, pieces[0]) for p in pieces), f"replicated {name} differs over TP"
            out[name] = pieces[0]
        else:
            out[name] = unshard_tp(pieces, part.dim, part.stride)
    return out


@pytest.fixture(scope="module")
def single(dist_run) -> dict:
    return dist_run(_grads_and_norms, 1, 1)[0]


@pytest.mark.parametrize("tp", [2, 4])
def test_every_tp_rank_clips_by_the_single_process_norm(dist_run, single, tp):
    results = dist_run(_grads_and_norms, tp, tp)
    parts = results[0]["partitions"]
    assert {n: p for n, p in parts.items() if p is not None} == {
        "fc1.weight": (0, 3), "fc1.bias": (0, 3), "fc2.weight": (1, 3), "fc3.weight": (0, 1), "fc3.bias": (0, 1),
        "fc4.weight": (1, 1)}  # norm.weight and fc2.bias are replicated
    full = _full(results, "grads")
    for name, grad in single["grads"].items():  # the TP module computes the single-process gradients
        torch.testing.assert_close(full[name], grad, rtol=1e-12, atol=1e-14)
    for r in results:
        torch.testing.assert_close(r["norm"], single["norm"], rtol=1e-12, atol=0)
        assert r["calls"] == {"all_reduce": 1}  # one scalar over the TP group
    scale = single["max_norm"] / (float(single["norm"]) + 1e-6)  # torch's clip coefficient
    clipped = _full(results, "clipped")
    for name, grad in single["clipped"].items():
        torch.testing.assert_close(clipped[name], grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(clipped[name], single["grads"][name] * scale, rtol=1e-12, atol=1e-14)


def test_local_only_norm_misses_the_other_shards(dist_run, single):
    """The negative twin: ``clip_grad_norm_`` on one TP rank's parameters is NOT the norm above."""
    results = dist_run(_grads_and_norms, 2, 2)
    for r in results:
        assert float(r["local_norm"]) < 0.99 * float(single["norm"])  # a shard's norm is smaller
        with pytest.raises(AssertionError):
            torch.testing.assert_close(r["local_norm"], single["norm"], rtol=1e-6, atol=0)
    with pytest.raises(AssertionError, match="differs over TP|Tensor-likes are not close"):
        local = _full(results, "local_clipped")  # ranks clip by different factors ...
        for name, grad in single["clipped"].items():  # ... so the step is not the single-process one
            torch.testing.assert_close(local[name], grad, rtol=1e-6, atol=0)
