"""megatron-core ``dist_checkpointing`` of the hybrid Hyena LM (float64, gloo, 2 ranks): a checkpoint
saved at one layout loads at another with every rank's parameters bitwise those of the saved
model (each TP rank its exact shard of the full tensor) and the same logits: TP=2 -> TP=2
(bitwise logits), TP=2 -> TP=1, TP=1 -> TP=2, CP=2 -> CP=1, and megatron's stacked layer axis
(a Hyena-only pattern). The stored in_proj is the full ``[q; k; v]`` weight as ``[3, C, C]``.

Negative twins, each a plausible bug that must be caught: megatron's default
``MegatronModule.sharded_state_dict`` for the mixer (what shipped before: TP rank 1 silently
loads rank 0's in_proj, short conv, D, norm and out_proj), and a layout that ignores
``partition_stride`` (what delegating to ``ColumnParallelLinear.sharded_state_dict`` stores: q, k
and v blocks permuted across TP sizes); for CP, a model that did not load.

All round trips run in one call on one pool (`round_trips`, module scope): megatron's writer
starts a multiprocessing Manager on first save, which is then reused.
"""
from __future__ import annotations

import contextlib
import gc
import multiprocessing
from dataclasses import replace
from pathlib import Path
from typing import Literal
from unittest import mock

import psutil  # noqa: F401  megatron-core's checkpoint writer imports it lazily; fail here, not in a writer process
import pytest
import torch
import torch.distributed as dist
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from hyena_cp.megatron import MegatronHyenaMixer
from hyena_cp.megatron.compat import MegatronModule, ProcessGroupCollection
from hyena_cp.parallel import shard, shard_tp, tp_partition, unshard, unshard_tp
from lm_parity import ParityCase, batch, build_model, load_full_weights, perturb
from references import rel_err

TOL = 1e-10  # float64 logits of another TP/CP layout: only the order of the TP/CP sums differs

Layout = Literal["exact", "megatron_default", "stride_ignored", "not_loaded"]

# GQA, SwiGLU (megatron's stride-2 fc1 factory) and a TP-sharded norm in the Hyena mixer
HYBRID = ParityCase(pattern="HHA", glu=True, query_groups=2, hyena_norm="rmsnorm")
STACKED = ParityCase(pattern="HH", hyena_norm="rmsnorm")  # one kind of layer: megatron's layer axis
STRIPED = ParityCase(pattern="SDHA", striped=True)  # Evo 2's layers and block


def _tp(case: ParityCase, tp: int, cp: int = 1) -> ParityCase:
    return replace(case, tp=tp, cp=cp)


# (name, saved case, layout at save and load, loaded case)
TRIPS = [
    ("tp2->tp2", _tp(HYBRID, 2), "exact", _tp(HYBRID, 2)),
    ("tp2->tp2 megatron_default", _tp(HYBRID, 2), "megatron_default", _tp(HYBRID, 2)),
    ("tp2->tp1", _tp(HYBRID, 2), "exact", _tp(HYBRID, 1)),
    ("tp2->tp1 stride_ignored", _tp(HYBRID, 2), "stride_ignored", _tp(HYBRID, 1)),
    ("tp1->tp2", _tp(HYBRID, 1), "exact", _tp(HYBRID, 2)),
    ("tp1->tp2 stride_ignored", _tp(HYBRID, 1), "stride_ignored", _tp(HYBRID, 2)),
    ("cp2->cp1", _tp(HYBRID, 1, cp=2), "exact", _tp(HYBRID, 1)),
    ("cp2->cp1 not_loaded", _tp(HYBRID, 1, cp=2), "not_loaded", _tp(HYBRID, 1)),
    ("stacked tp2->tp1", _tp(STACKED, 2), "exact", _tp(STACKED, 1)),
    ("striped tp2->tp1", _tp(STRIPED, 2), "exact", _tp(STRIPED, 1)),
    ("striped tp1->tp2", _tp(STRIPED, 1), "exact", _tp(STRIPED, 2)),
]
HYENA_TP_SHARDED = ("mixer.in_proj.weight", "mixer.short_conv.weight", "mixer.hyena.skip", "mixer.norm.weight",
                    "mixer.out_proj.weight")


# ------------------------------------------------------------------ the layouts
def stride_ignoring_sharded_state_dict(self: MegatronHyenaMixer, prefix: str = "", sharded_offsets: tuple = (),
                                       metadata: dict | None = None) -> dict:
    """Negative twin: every TP-sharded tensor cut contiguously on its partition dim, as
    megatron's ``ColumnParallelLinear.sharded_state_dict`` stores it (``partition_stride`` ignored)."""
    state = self.mixer.state_dict(prefix="", keep_vars=True)
    axes = {name: tp_partition(t).dim for name, t in state.items() if isinstance(t, Tensor) and tp_partition(t)}
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    return make_sharded_tensors_for_checkpoint(state, f"{prefix}mixer.", axes, sharded_offsets,
                                               tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])


def mixer_layout(layout: Layout):
    if layout == "megatron_default":  # the mixer without its own sharded_state_dict
        return mock.patch.object(MegatronHyenaMixer, "sharded_state_dict", MegatronModule.sharded_state_dict)
    if layout == "stride_ignored":
        return mock.patch.object(MegatronHyenaMixer, "sharded_state_dict", stride_ignoring_sharded_state_dict)
    return contextlib.nullcontext()


# ------------------------------------------------------- megatron's writer on CPU
@contextlib.contextmanager
def writer_processes_allowed():
    """megatron-core's checkpoint writer starts processes (a spawned Manager for its results
    queue, forked writers); a pool worker is daemonic, so it is marked otherwise meanwhile. The
    Manager megatron caches is dropped at the end, so that no process outlives the worker."""
    me = multiprocessing.current_process()
    daemon, me.daemon = me.daemon, False
    try:
        yield
    finally:
        me.daemon = daemon
        filesystem_async._results_queue = None  # its Manager shuts down when collected
        gc.collect()


def save_on_cpu(model, path: Path) -> None:
    """``dist_checkpointing.save`` on a CPU-only torch: megatron-core 0.16's writer calls
    ``torch.cuda.synchronize()`` (after copies to the CPU, here already done) and puts a status
    flag on ``torch.cuda.current_device()``, which become a no-op and the CPU."""
    path.mkdir(parents=True, exist_ok=True)
    with mock.patch.object(torch.cuda, "synchronize", lambda *args, **kwargs: None), \
            mock.patch.object(torch.cuda, "current_device", lambda: "cpu"):
        dist_checkpointing.save(model.sharded_state_dict(), str(path))


# ------------------------------------------------------------------- the worker
def snapshot(model, case: ParityCase) -> dict:
    """This rank's parameters (its TP pieces) and logits of the fixed batch (its CP shard,
    gathered over TP)."""
    cp, cp_rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    inputs, _ = batch(case)
    with torch.no_grad():
        logits = model(shard(inputs, 1, "zigzag", cp, cp_rank))
    return {"tp": case.tp, "cp": cp, "tp_rank": parallel_state.get_tensor_model_parallel_rank(), "cp_rank": cp_rank,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "partitions": {n: tp_partition(p) for n, p in model.named_parameters()}, "logits": logits}


@contextlib.contextmanager
def model_parallel(case: ParityCase):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=case.tp, context_parallel_size=case.cp)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()


def save(case: ParityCase, layout: Layout, path: Path, singles: list) -> dict:
    """The perturbed full model, cut for ``case``'s layout, saved; its snapshot."""
    rank = dist.get_rank()
    with model_parallel(case):
        reference = build_model(case, ProcessGroupCollection(tp=singles[rank], pp=singles[rank], cp=None))
        perturb(reference)
        model = build_model(case, None, tp_size=case.tp)
        load_full_weights(model, reference, case.tp, parallel_state.get_tensor_model_parallel_rank())
        with mixer_layout(layout):
            save_on_cpu(model, path)
        return snapshot(model, case)


def load(case: ParityCase, layout: Layout, path: Path) -> dict:
    """A fresh (unperturbed) model of ``case``'s layout, loaded from ``path``; its snapshot."""
    with model_parallel(case):
        model = build_model(case, None, tp_size=case.tp)
        if layout != "not_loaded":
            with mixer_layout(layout):
                state = dist_checkpointing.load(model.sharded_state_dict(), str(path))
            model.load_state_dict(state)  # strict: every key came back
        return snapshot(model, case)


def worker_round_trips(root: str) -> dict:
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]  # collective: every rank makes all
    saved, out = {}, {}
    with writer_processes_allowed():
        for name, saved_case, layout, loaded_case in TRIPS:
            key = (saved_case, "exact" if layout == "not_loaded" else layout)
            try:  # megatron raises a failed save or load on every rank: record it, go on to the next trip
                if key not in saved:
                    path = Path(root) / f"ckpt{len(saved)}"
                    saved[key] = (save(saved_case, key[1], path, singles), path)
                snap, path = saved[key]
                out[name] = {"saved": snap, "loaded": load(loaded_case, layout, path)}
            except (Exception, CheckpointException) as exc:  # reported by the test of this trip
                out[name] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}"}
        # A save that failed on one rank only (megatron validates on rank 0) leaves the group broken:
        # then this raises, and the pool is replaced instead of failing later tests.
        dist.barrier()
        if (_tp(HYBRID, 2), "exact") in saved:
            with model_parallel(_tp(HYBRID, 1)):  # every tensor whole, as stored
                plain = dist_checkpointing.load_plain_tensors(str(saved[(_tp(HYBRID, 2), "exact")][1]))
            out["stored in_proj"] = plain["decoder.layers.0.self_attention.mixer.in_proj.weight"]
    return out


@pytest.fixture(scope="module")
def round_trips(dist_run, tmp_path_factory) -> list[dict]:
    return dist_run.run(worker_round_trips, 2, (str(tmp_path_factory.mktemp("dist_ckpt")),), timeout=300)


# ----------------------------------------------------------------- the checks
def full_tensors(snaps: list[dict], key: str) -> dict[str, Tensor]:
    """Full parameters (``key="params"``) of a run from its ranks' TP pieces (CP rank 0's)."""
    ranks = sorted((s for s in snaps if s["cp_rank"] == 0), key=lambda s: s["tp_rank"])[:snaps[0]["tp"]]
    out = {}
    for name, part in ranks[0]["partitions"].items():
        pieces = [s[key][name] for s in ranks]
        out[name] = pieces[0] if part is None else unshard_tp(pieces, part.dim, part.stride)
    return out


def differences(results: list[dict], trip: str) -> tuple[list[str], float, bool]:
    """(parameters that differ on some rank from its shard of the saved full tensor, worst
    relative error of a rank's logits against the saved model's, whether all logits are bitwise equal)."""
    if "error" in results[0][trip]:
        raise AssertionError(f"{trip} raised {results[0][trip]['error']}")
    saved = [r[trip]["saved"] for r in results]
    loaded = [r[trip]["loaded"] for r in results]
    full = full_tensors(saved, "params")
    by_cp = {s["cp_rank"]: s["logits"] for s in saved if s["tp_rank"] == 0}  # replicated over TP (and DP)
    logits = unshard([by_cp[c] for c in sorted(by_cp)], 1, "zigzag")
    wrong, worst, bitwise = set(), 0.0, True
    for snap in loaded:
        for name, value in snap["params"].items():
            part = snap["partitions"][name]
            expected = full[name] if part is None else shard_tp(full[name], part.dim, part.stride, snap["tp"],
                                                                snap["tp_rank"])
            if not torch.equal(value, expected):
                wrong.add(name)
        expected = shard(logits, 1, "zigzag", snap["cp"], snap["cp_rank"])
        worst = max(worst, rel_err(snap["logits"], expected))
        bitwise &= torch.equal(snap["logits"], expected)
    return sorted(wrong), worst, bitwise


def assert_exact(results: list[dict], trip: str) -> float:
    wrong, worst, _ = differences(results, trip)
    assert not wrong, f"{trip}: parameters differ from the saved model's: {wrong}"
    assert worst < TOL, f"{trip}: logits differ from the saved model's by {worst:.2e}"
    return worst


def assert_caught(results: list[dict], trip: str, expected_wrong: tuple[str, ...]) -> None:
    wrong, worst, _ = differences(results, trip)
    missed = [s for s in expected_wrong if not any(name.endswith(s) for name in wrong)]
    assert not missed, f"{trip}: these should differ but do not: {missed} (differing: {wrong})"
    assert worst > 1e-3, f"{trip}: logits should differ but the worst error is {worst:.2e}"


def test_tp2_to_tp2_is_bitwise(round_trips):
    assert_exact(round_trips, "tp2->tp2")
    assert differences(round_trips, "tp2->tp2")[2], "same layout, same arithmetic: logits must be bitwise equal"


def test_megatron_default_mixer_state_loses_tp_rank_1(round_trips):
    assert_caught(round_trips, "tp2->tp2 megatron_default", HYENA_TP_SHARDED)


@pytest.mark.parametrize("trip", ["tp2->tp1", "tp1->tp2", "stacked tp2->tp1", "striped tp2->tp1", "striped tp1->tp2"])
def test_tp_reshard_is_exact(round_trips, trip):
    assert_exact(round_trips, trip)


@pytest.mark.parametrize("trip", ["tp2->tp1 stride_ignored", "tp1->tp2 stride_ignored"])
def test_stride_ignoring_layout_permutes_qkv(round_trips, trip):
    assert_caught(round_trips, trip, ("mixer.in_proj.weight", "mixer.short_conv.weight"))


def test_cp2_to_cp1_is_exact_and_a_missed_load_is_caught(round_trips):
    assert_exact(round_trips, "cp2->cp1")
    wrong, worst, _ = differences(round_trips, "cp2->cp1 not_loaded")
    assert wrong and worst > 1e-3, (wrong, worst)


def test_stored_in_proj_is_the_full_qkv_weight_viewed_3_c_c(round_trips):
    assert "stored in_proj" in round_trips[0], round_trips[0]["tp2->tp2"].get("error")
    full = full_tensors([r["tp2->tp2"]["saved"] for r in round_trips], "params")
    weight = full["decoder.layers.0.self_attention.mixer.in_proj.weight"]  # [q; k; v]: 3C x C
    stored = round_trips[0]["stored in_proj"]
    assert stored.shape == (3, HYBRID.hidden, HYBRID.hidden)
    assert torch.equal(stored, weight.view(3, HYBRID.hidden, HYBRID.hidden))
