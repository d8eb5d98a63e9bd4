"""Tensor x context parallel `MegatronHyenaMixer` (gloo, fp64) against the single-process
mixer built from the same full weights: outputs, input grads and every parameter gradient
(TP shards gathered with `unshard_tp`, CP-summed). Rank order is megatron's: tp innermost,
then cp (``global = cp_rank * tp + tp_rank``). Packed cases hand both mixers the same
``PackedSeqParams`` (each document alone is tests/test_cp_packed_mixer.py's reference)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state
from megatron.core.transformer.spec_utils import build_module

from hyena_cp.megatron import HyenaMixerConfig, get_hyena_layer_spec
from hyena_cp.megatron.compat import ProcessGroupCollection, TransformerConfig, cpu_config_defaults
from hyena_cp.megatron.packing import make_packed_seq_params
from hyena_cp.ops.packing import concat_cu_seqlens
from hyena_cp.parallel import shard, shard_tp, tp_partition, unshard, unshard_tp
from references import rel_err

TOL = 1e-10  # fp64


@dataclass(frozen=True)
class Case:
    tp: int
    cp: int
    seq: int = 32  # CP=4: 8 zigzag chunks of 4 tokens >= the short-conv halo 2
    batch: int = 2
    hidden: int = 16
    heads: int = 4  # divisible by every tp * cp used here
    groups: str = "parallel_state"  # or "explicit": a ProcessGroupCollection built by hand
    norm: str | None = None  # on q * y; under TP its statistics span the TP ranks
    modes: tuple[str, str] = ("alltoall", "halo")  # cp_comm, short_conv_cp (the comparison modes too)
    docs: tuple[tuple[int, ...], ...] | None = None  # packed: token counts of each row's documents
    hyena: tuple = ()  # (field, value) pairs of HyenaMixerConfig: another filter (then no max_len)

    def packed(self) -> dict:
        if self.docs is None:
            return {}
        rows = [torch.tensor([0, *torch.tensor(row).cumsum(0).tolist()]) for row in self.docs]
        return {"packed_seq_params": make_packed_seq_params(concat_cu_seqlens(rows, self.seq))}


def make_config(tp: int, cp: int) -> TransformerConfig:
    return TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=4, hidden_dropout=0.0,
                             attention_dropout=0.0, params_dtype=torch.float64, tensor_model_parallel_size=tp,
                             context_parallel_size=cp, **cpu_config_defaults())


def build_mixer(case: Case, tp: int, cp: int, pg_collection):
    torch.manual_seed(1234)  # the same full weights at every TP size (see MegatronHyenaMixer)
    extra = dict(case.hyena) or {"filter_width": 16, "max_len": case.seq}
    spec = get_hyena_layer_spec(HyenaMixerConfig(num_heads=case.heads, norm=case.norm, cp_comm=case.modes[0],
                                                 short_conv_cp=case.modes[1], **extra))
    return build_module(spec.submodules.self_attention, config=make_config(tp, cp), layer_number=1,
                        pg_collection=pg_collection)


def load_full(model, full: dict[str, torch.Tensor], tp: int, tp_rank: int, wrong_stride: bool = False) -> None:
    """Copy FULL tensors into a TP rank's model (``wrong_stride``: cut strided ones contiguously)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            part = tp_partition(p)
            if part is None:
                p.copy_(full[name])
            else:
                p.copy_(shard_tp(full[name], part.dim, 1 if wrong_stride else part.stride, tp, tp_rank))


def full_weights(case: Case, pg_collection) -> dict[str, torch.Tensor]:
    """A single-process mixer's parameters, perturbed so zero biases cannot hide a bug."""
    model = build_mixer(case, 1, 1, pg_collection)
    gen = torch.Generator().manual_seed(99)
    return {n: p.detach() + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}


def forward_backward(model, x_full: torch.Tensor, w_full: torch.Tensor, cp: int, cp_rank: int,
                     packed: dict) -> dict:
    """This rank's zigzag shard through the mixer; loss share = <out, w> on the shard."""
    x = shard(x_full, 0, "zigzag", cp, cp_rank).clone().requires_grad_()  # never x_full itself (cp=1)
    out, _ = model(x, **packed)
    (out * shard(w_full, 0, "zigzag", cp, cp_rank)).sum().backward()
    return {"out": out.detach(), "x_grad": x.grad, "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "partitions": {n: tp_partition(p) for n, p in model.named_parameters()}}


def explicit_groups(tp: int, cp: int) -> ProcessGroupCollection:
    """tp and cp groups in megatron's order, by hand (every rank creates every group)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tp_groups = [dist.new_group(list(range(start, start + tp))) for start in range(0, world, tp)]
    cp_groups = [dist.new_group(list(range(t, world, tp))) for t in range(tp)]
    singles = [dist.new_group([r]) for r in range(world)]
    return ProcessGroupCollection(tp=tp_groups[rank // tp], cp=cp_groups[rank % tp], pp=singles[rank])


def worker(case: Case, wrong_stride: bool = False) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == case.tp * case.cp
    singles = [dist.new_group([r]) for r in range(world)]
    reference_groups = ProcessGroupCollection(tp=singles[rank], cp=None, pp=singles[rank])
    if case.groups == "explicit":
        groups = explicit_groups(case.tp, case.cp)
    else:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=case.tp, context_parallel_size=case.cp)
        groups = None
    try:
        tp_rank, cp_rank = rank % case.tp, rank // case.tp
        seeded = build_mixer(case, case.tp, case.cp, groups)
        seeded_weights = {n: p.detach().clone() for n, p in seeded.named_parameters()}
        full = full_weights(case, reference_groups)
        load_full(seeded, full, case.tp, tp_rank, wrong_stride)
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(case.seq, case.batch, case.hidden, generator=gen, dtype=torch.float64)
        w = torch.randn(case.seq, case.batch, case.hidden, generator=gen, dtype=torch.float64)
        out = forward_backward(seeded, x, w, case.cp, cp_rank, case.packed())
        out["seeded_weights"] = seeded_weights
        if rank == 0:
            ref_model = build_mixer(case, 1, 1, reference_groups)
            load_full(ref_model, full, 1, 0)
            out["ref"] = forward_backward(ref_model, x, w, 1, 0, case.packed())
            out["ref_seeded"] = {n: p.detach() for n, p in build_mixer(case, 1, 1, reference_groups).named_parameters()}
        return out
    finally:
        if case.groups != "explicit":
            parallel_state.destroy_model_parallel()


def gather_full(results: list[dict], case: Case, key: str, name: str) -> torch.Tensor:
    """Full tensor ``results[r][key][name]`` (a parameter or its grad): CP-summed per TP rank
    for grads, TP pieces unsharded; replicas must agree across TP ranks."""
    per_tp = []
    for t in range(case.tp):
        ranks = [cp_rank * case.tp + t for cp_rank in range(case.cp)]
        values = [results[r][key][name] for r in ranks]
        per_tp.append(sum(values) if key == "grads" else values[0])
    part = results[0]["partitions"][name]
    if part is None:
        for piece in per_tp[1:]:  # a replica's grad is the same on every TP rank
            assert rel_err(piece, per_tp[0]) < TOL, f"{key} of replicated {name} differs across TP ranks"
        return per_tp[0]
    return unshard_tp(per_tp, part.dim, part.stride)


def check_parity(results: list[dict], case: Case) -> dict[str, float]:
    ref = results[0]["ref"]
    errors = {}
    for name, local in (("out", "out"), ("x_grad", "x_grad")):
        pieces = [results[cp_rank * case.tp][local] for cp_rank in range(case.cp)]  # TP rank 0 of each CP rank
        for t in range(1, case.tp):  # outputs and input grads are replicated over TP
            for cp_rank in range(case.cp):
                assert rel_err(results[cp_rank * case.tp + t][local], pieces[cp_rank]) < TOL, f"{name} over TP"
        errors[name] = rel_err(unshard(pieces, 0, "zigzag"), ref[local])
        assert errors[name] < TOL, f"{name}: {errors[name]:.2e}"
    assert results[0]["grads"].keys() == ref["grads"].keys()
    for name, g_ref in ref["grads"].items():
        assert g_ref.norm() > 0, f"grad of {name} is zero: the comparison would be vacuous"
        errors[name] = rel_err(gather_full(results, case, "grads", name), g_ref)
        assert errors[name] < TOL, f"grad of {name}: {errors[name]:.2e}"
    return errors


CASES = [Case(tp=2, cp=1), Case(tp=1, cp=2), Case(tp=2, cp=2), Case(tp=1, cp=4), Case(tp=4, cp=1),
         Case(tp=2, cp=2, groups="explicit"), Case(tp=2, cp=1, norm="layernorm"), Case(tp=2, cp=2, norm="rmsnorm"),
         Case(tp=2, cp=2, modes=("allgather", "a2a")), Case(tp=2, cp=2, docs=((1, 7, 3, 12, 9), (17, 2, 13))),
         Case(tp=2, cp=2, modes=("allgather", "a2a"), docs=((5, 1, 26), (2, 30))),
         # StripedHyena 2 (SE, MR, LI) and HyenaDNA operators; the explicit filters' groups split over TP only
         Case(tp=2, cp=2, heads=2, hyena=(("filter", "explicit"), ("filter_options", {"length": 7}), ("skip", False),
                                          ("in_proj_bias", False), ("short_conv_bias", False), ("out_proj_bias", True))),
         Case(tp=2, cp=2, hyena=(("filter", "explicit"), ("filter_options", {"length": 8, "decay": "savanna",
                                                                             "L_cache": 32, "init_std": 0.3}),),
              docs=((1, 7, 3, 12, 9), (17, 2, 13))),
         Case(tp=2, cp=2, heads=16, hyena=(("filter", "modal"), ("filter_options", {"state_size": 3}))),
         Case(tp=4, cp=1, heads=16, hyena=(("filter", "modal"), ("filter_options", {"state_size": 2,
                                                                                    "parametrization": "savanna"}))),
         Case(tp=2, cp=2, heads=16, hyena=(("filter", "safari"), ("filter_options", {"l_max": 32, "emb_dim": 5,
                                                                                     "width": 8, "shift": 0.05}))),
         Case(tp=2, cp=2, heads=4, modes=("alltoall", "a2a"), hyena=(("filter", "explicit"),
                                                                     ("filter_options", {"length": 5})))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"tp{c.tp}-cp{c.cp}-{c.groups}-{c.norm}-{'-'.join(c.modes)}"
                                                     f"{'-packed' if c.docs else ''}-{dict(c.hyena).get('filter', 'fourier')}")
def test_tp_cp_mixer_equals_single_process(dist_run, case):
    results = dist_run(worker, case.tp * case.cp, case)
    check_parity(results, case)


def test_one_seed_gives_the_same_full_mixer_at_every_tp_size(dist_run):
    case = Case(tp=2, cp=2)
    results = dist_run(worker, 4, case)
    for name, expected in results[0]["ref_seeded"].items():
        assert torch.equal(gather_full(results, case, "seeded_weights", name), expected), name


def test_wrong_qkv_layout_across_tp_ranks_fails(dist_run):
    """Negative twin: in_proj/short conv cut contiguously (rank 0 gets q and half of k)."""
    case = Case(tp=2, cp=2)
    results = dist_run(worker, 4, case, wrong_stride=True)
    with pytest.raises(AssertionError, match="out"):
        check_parity(results, case)


def test_wrong_norm_statistics_fail(dist_run):
    """Negative twin: a TP norm whose statistics cover only this rank's channels."""
    case = Case(tp=2, cp=1, norm="rmsnorm")
    results = dist_run(worker_local_norm, 2, case)
    with pytest.raises(AssertionError, match="out"):
        check_parity(results, case)


def worker_local_norm(case: Case) -> dict:
    from hyena_cp.modules import norm

    exact = norm.all_reduce_sum
    norm.all_reduce_sum = lambda x, group: x * group.size()  # the local sum, scaled like a total
    try:
        return worker(case)
    finally:  # the worker process is reused by later tests
        norm.all_reduce_sum = exact


def worker_bad_tp(heads: int) -> None:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    try:
        spec = get_hyena_layer_spec(HyenaMixerConfig(num_heads=heads))
        build_module(spec.submodules.self_attention, config=make_config(2, 2), layer_number=1)
    finally:
        parallel_state.destroy_model_parallel()


def test_bad_tp_setup_raises_at_construction_on_every_rank(dist_run):
    errors = dist_run(worker_bad_tp, 4, 2, expect_error=ValueError)
    match = "num_heads=2 and hidden_size=16 must be divisible by tensor-parallel size x context-parallel size = 2x2"
    assert all(match in str(e) for e in errors), errors
