"""``torch.compile(mixer, fullgraph=True)`` under context parallelism (`hyena_cp.parallel.traceable`).

- The collectives' custom ops pass ``torch.library.opcheck`` (schema, fake tensors, autograd
  registration, the compile paths) on a real 2-rank group.
- A whole QKVSequenceMixer compiles in one graph (``fullgraph=True``: a graph break raises) at
  P = 2 (1-D zigzag and 2-D rows) and P = 4, and its outputs, input grads and every parameter
  grad equal the eager mixer's in float64; the byte accounting (`count_comm`, booked inside
  the ops' bodies) is that of eager, at the floor, and a second call neither recompiles nor
  counts differently. (The dispatcher-level `CollectiveCounter` is a TorchDispatchMode, which
  torch.compile refuses; tests/test_cp_mixer.py holds eager to it, and eager runs the same ops.)
- A second length recompiles with symbolic shapes and still equals eager.
- The compiled agreement check raises the same ``ValueError`` on every rank when the ranks'
  shards disagree, before any data communication.

Backend "aot_eager": AOTAutograd traces forward and backward through the custom ops (their
fake and autograd registrations are what compiling needs), without inductor's C++ builds,
so CI pays seconds per case. Inductor on the same graphs is exercised by `launch/bench.py
--sections speed` (single process) and was checked by hand at P = 2 (5.7e-14 in float64).
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.distributed as dist

from hyena_cp.bench.layer import LayerSpec, build_layer, comm_floor_bytes, local_input
from hyena_cp.parallel import count_comm
from hyena_cp.parallel.traceable import (agreement_token, all_gather_op, all_reduce_sum_op, all_to_all,
                                        all_to_all_uneven_op, broadcast_op, group_name, p2p_exchange_op,
                                        reduce_scatter_op, reduce_sum_op)
from references import rel_err

TOL = 1e-12  # float64, the same math through AOTAutograd's decompositions
CASES = {"1d_p2": (LayerSpec(spatial=(48,), channels=8, heads=4, kernel=4), 2),
         "2d_p2": (LayerSpec(spatial=(8, 5), channels=8, heads=4, kernel=3), 2),
         "1d_p4": (LayerSpec(spatial=(48,), channels=8, heads=4, kernel=3), 4),
         "3d_circular_p2": (LayerSpec(spatial=(4, 3, 4), channels=8, heads=4, kernel=3, boundary="circular"), 2),
         "3d_causal_x_circular_p2": (LayerSpec(spatial=(8, 3, 4), channels=8, heads=4, kernel=3,
                                               boundary=("causal", "circular", "circular")), 2)}


def _opcheck_collectives() -> str:
    group = dist.group.WORLD
    name, rank, world = group_name(group), group.rank(), group.size()
    x = torch.randn(world, 3, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(all_to_all, (x, name))
    peer = (rank + 1) % world
    sends = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True)]
    torch.library.opcheck(p2p_exchange_op, (sends, [peer], [(rank - 1) % world], [2, 3], [2], name))
    torch.library.opcheck(agreement_token, ([1, 2, 3], name, "test", "a\nb", "", torch.zeros(4)))
    # forward-only ops (under the autograd.Functions of reductions / redistribute)
    send = [1, 2]
    torch.library.opcheck(all_to_all_uneven_op, (torch.randn(3, 4), send, [send[rank]] * world, name))
    y = torch.randn(2 * world, 3)
    for op, args in ((all_reduce_sum_op, (y, name)), (all_gather_op, (y, name)), (reduce_scatter_op, (y, name)),
                     (broadcast_op, (y, 0, name)), (reduce_sum_op, (y, 1, name))):
        torch.library.opcheck(op, args)
    return "ok"


def test_collective_custom_ops_pass_opcheck(dist_run):
    assert dist_run(_opcheck_collectives, 2) == ["ok", "ok"]


def _step(layer, run, x, group):
    """Forward + backward of a fixed quadratic loss; outputs, grads and the traffic it books."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    with count_comm() as stats:
        y = run(x, cp_group=group)
        (y * y.detach().roll(1, dims=1)).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return {"y": y.detach(), "x.grad": x.grad.clone(), **grads,
            "traffic": (dict(stats.by_op), dict(stats.calls), dict(stats.control_calls))}


def _compiled_vs_eager(spec: LayerSpec) -> dict:
    group = dist.group.WORLD
    torch._dynamo.reset()
    layer = build_layer(spec, dtype=torch.float64)
    x = local_input(spec, group, dtype=torch.float64)
    eager = _step(layer, layer, x, group)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    _step(layer, compiled, x, group)  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = _step(layer, compiled, x, group)  # the counters must not have become guards
    errors = {k: rel_err(again[k], v) for k, v in eager.items() if k != "traffic"}
    floor = comm_floor_bytes((spec.batch, *spec.spatial, spec.channels), spec.kernel, group.size(), group.rank(), 8,
                             spec.geometry)
    return {"errors": errors, "eager": eager["traffic"], "compiled": again["traffic"], "floor": floor}


@pytest.mark.parametrize("case", list(CASES))
def test_fullgraph_compiled_mixer_equals_eager_and_books_the_same_bytes(dist_run, case):
    spec, world = CASES[case]
    for rank, r in enumerate(dist_run(_compiled_vs_eager, world, spec)):
        worst = max(r["errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOL, (rank, worst)
        assert len(r["errors"]) > 8  # y, x.grad and every parameter grad were compared
        assert r["compiled"] == r["eager"], rank
        by_op, calls, control = r["compiled"]
        assert sum(by_op.values()) == r["floor"] and calls["all_to_all"] == 4 and control == {"agreement": 1}


def _compiled_over_lengths(lengths: tuple[int, ...]) -> list[float]:
    group = dist.group.WORLD
    torch._dynamo.reset()
    layer = build_layer(LayerSpec(spatial=(lengths[0],), channels=8, heads=4), dtype=torch.float64)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    errors = []
    for length in lengths:
        x = local_input(LayerSpec(spatial=(length,), channels=8, heads=4), group, dtype=torch.float64)
        errors.append(rel_err(compiled(x, cp_group=group), layer(x, cp_group=group)))
    return errors


def test_a_new_length_recompiles_with_symbolic_shapes_and_equals_eager(dist_run):
    for errors in dist_run(_compiled_over_lengths, 2, (32, 48, 64)):
        assert max(errors) < TOL, errors


def _compiled_with_disagreeing_shards() -> None:
    group = dist.group.WORLD
    torch._dynamo.reset()
    length = 32 if group.rank() == 0 else 24  # local shards of 16 vs 12 tokens
    layer = build_layer(LayerSpec(spatial=(32,), channels=8, heads=4), dtype=torch.float64)
    x = local_input(LayerSpec(spatial=(length,), channels=8, heads=4), group, dtype=torch.float64)
    torch.compile(layer, fullgraph=True, backend="aot_eager")(x, cp_group=group)


def test_compiled_agreement_check_raises_on_every_rank(dist_run):
    errors = dist_run(_compiled_with_disagreeing_shards, 2, expect_error=ValueError)
    assert len({str(e) for e in errors}) == 1
    assert "x.shape: (1, 16, 8) on rank 0 vs (1, 12, 8) on rank 1" in str(errors[0])


def _compiled_hybrid_net_vs_eager() -> dict:
    import torch.nn.functional as F
    from test_vit5_parity import CASES as VIT_CASES, build as build_net

    group = dist.group.WORLD
    torch._dynamo.reset()
    case = VIT_CASES["iso_hybrid_fp32"]
    net, images, labels = build_net(case)
    net = net.double()
    images = images.double()

    def step(run) -> dict:
        net.zero_grad(set_to_none=True)
        logits = run(images, cp_group=group)
        (F.cross_entropy(logits, labels) / group.size()).backward()
        return {"logits": logits.detach(), **{n: p.grad.clone() for n, p in net.named_parameters()}}

    eager = step(net)
    with count_comm() as stats:
        compiled = step(torch.compile(net, fullgraph=True, backend="aot_eager"))
    return {"errors": {k: rel_err(compiled[k], v) for k, v in eager.items()}, "by_op": dict(stats.by_op)}


def test_fullgraph_compiled_hybrid_vit_equals_eager(dist_run):
    # a Hyena block and an attention block (its K/V all-gather and reduce-scatter adjoint are
    # custom ops too), CLS and registers, the network's own agreement check: one graph. (The
    # hierarchical nets' patch merging plans its routing on the host from the layouts: a graph
    # break there; `train.compile` compiles blocks and merges one by one, so it is unaffected.)
    for rank, r in enumerate(dist_run(_compiled_hybrid_net_vs_eager, 2)):
        worst = max(r["errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOL, (rank, worst)
        assert {"all_to_all", "p2p", "all_gather", "reduce_scatter"} <= set(r["by_op"]), r["by_op"]


def _agreement_calls_compiled(use_before: bool) -> int:
    from hyena_cp.parallel import check_ranks_agree

    group = dist.group.WORLD

    def call(x):
        y = check_ranks_agree(group, "test", {"x.shape": tuple(x.shape)}, before=x if use_before else None)
        return (y if use_before else x) * 2

    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    x = torch.randn(4)
    compiled(x)
    with count_comm() as stats:
        compiled(x)
    return stats.control_calls.get("agreement", 0)


def test_a_compiled_check_runs_only_through_its_before_tensor(dist_run):
    # negative twin of the data dependency: the check's result added to ``before`` keeps it in
    # the graph; unused, the compiler prunes it as dead code (why every caller passes before=)
    assert dist_run(_agreement_calls_compiled, 2, True) == [1, 1]
    assert dist_run(_agreement_calls_compiled, 2, False) == [0, 0]
