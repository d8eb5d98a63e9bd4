"""Section 4: context-parallel efficiency on CPU (forward + backward of one layer).

- Weak scaling: per-rank work fixed (global length x P). P=1 runs 1 thread on 1 core; P=2
  runs 2 ranks of 1 thread, each pinned to its own core. Efficiency = t(P=1) / t(P=2).
- Strong scaling: global size fixed. P=1 runs P threads on the same P cores that the P
  ranks use (1 thread each), so both sides get the same hardware. Efficiency =
  t(P=1, P threads) / t(P ranks).
Per step the ranks start together (an all-reduce of one element) and the step time is the
slowest rank's; the median is over >= 5 steps after warm-up. P is limited to the cores
this process may use (P=4 on 2 cores would measure oversubscription, not CP).
"""
from __future__ import annotations

import os
import statistics
import time
from functools import partial

import torch

from hyena_cp.bench.common import BenchContext, Section, Table, pinned, threads
from hyena_cp.bench.layer import LayerSpec, build_layer, fwd_bwd, local_input
from hyena_cp.parallel import group_rank, group_size, group_sum

__all__ = ["run", "step_times", "per_rank_flops", "cases"]

REPEATS = 7
WARMUP = 2


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def cases(quick: bool) -> list[tuple[str, LayerSpec, LayerSpec]]:
    """``(kind, spec at P=1, spec at P=2)``: weak scaling doubles the global size, strong keeps it."""
    if quick:
        c = dict(channels=16, heads=4)
        l1, l2, g1, g2 = (128,), (256,), (8, 16), (16, 16)
    else:
        c = {}
        l1, l2, g1, g2 = (4096,), (8192,), (32, 64), (64, 64)
    return [("weak", LayerSpec(l1, **c), LayerSpec(l2, **c)), ("strong", LayerSpec(l2, **c), LayerSpec(l2, **c)),
            ("weak", LayerSpec(g1, **c), LayerSpec(g2, **c)), ("strong", LayerSpec(g2, **c), LayerSpec(g2, **c))]


_PREPARED: dict[tuple, tuple[torch.nn.Module, torch.Tensor]] = {}


def _prepared(group, spec: LayerSpec) -> tuple[torch.nn.Module, torch.Tensor]:
    """This process's layer and input shard for ``spec``, built once and reused by the
    measurement rounds (one entry: a new spec replaces the old one)."""
    key = (spec, group_size(group), group_rank(group))
    if key not in _PREPARED:
        _PREPARED.clear()
        _PREPARED[key] = (build_layer(spec), local_input(spec, group))
    return _PREPARED[key]


def step_times(group, spec: LayerSpec, steps: int, cores: list[int] | None) -> list[float]:
    """On one rank (or one process when ``group`` is None): seconds of each of ``steps``
    forward + backward steps, pinned to ``cores[rank]`` when ``cores`` is given."""
    world, rank = group_size(group), group_rank(group)
    core = None if cores is None else {cores[rank % len(cores)]}
    layer, x = _prepared(group, spec)
    times = []
    with pinned(core if world > 1 else None):
        for _ in range(steps):
            if world > 1:
                group_sum(torch.zeros(1), group)  # start the step together
            start = time.perf_counter()
            fwd_bwd(layer, x, group)
            times.append(time.perf_counter() - start)
    return times


def per_rank_flops(spec: LayerSpec, world: int) -> float:
    """Forward FLOPs one rank does: everything / P except the filter MLP, which every rank
    evaluates at every position (an upper bound: its output layer is split)."""
    parts = build_layer(spec).flop_breakdown(spec.tokens, grid_w=spec.spatial[-1] if spec.dims == 2 else None)
    filt = parts.pop("filter_mlp")
    return sum(parts.values()) / world + filt


def _single(spec: LayerSpec, n_threads: int, cores: list[int], steps: int) -> list[float]:
    with threads(n_threads), pinned(set(cores[:n_threads])):
        return step_times(None, spec, steps, None)


def _rounds(ctx: BenchContext, spec1: LayerSpec, spec_p: LayerSpec, single_threads: tuple[int, ...],
            world: int, cores: list[int], repeats: int) -> dict[str, float]:
    """Median step seconds of P=1 (for each thread count) and of the P-rank group, measured
    in alternating rounds so that load from other processes hits every variant alike."""
    runs = {f"p1_{n}": partial(_single, spec1, n, cores) for n in single_threads}
    runs["p"] = lambda steps: [max(step) for step in zip(*ctx.pools.run(world, step_times, spec_p, steps, cores))]
    for run_steps in runs.values():
        run_steps(WARMUP)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run_steps in runs.items():
            times[name] += run_steps(1)  # the slowest rank sets the pace of a P-rank step
    return {name: statistics.median(t) for name, t in times.items()}


def run(ctx: BenchContext) -> Section:
    cores = _cores()
    world = min(2, len(cores))
    repeats = 5 if ctx.quick else REPEATS
    table = Table(f"CP efficiency on CPU, forward + backward, P=1 vs P={world}",
                  ["scaling", "layer P=1 -> P", "P=1 threads", "t(P=1) ms", f"t(P={world}) ms", "efficiency",
                   "per-rank FLOPs P/P=1", "speedup vs 1 thread"])
    data = []
    if world < 2:
        return Section("CP efficiency (CPU)", notes=[f"skipped: this process may use {len(cores)} core(s); CP "
                                                     "efficiency needs at least 2"])
    for kind, spec1, spec_p in cases(ctx.quick):
        single_threads = 1 if kind == "weak" else world
        t = _rounds(ctx, spec1, spec_p, tuple(sorted({1, single_threads})), world, cores, repeats)
        t1, tp, one_thread = t[f"p1_{single_threads}"], t["p"], t["p1_1"]
        flop_ratio = per_rank_flops(spec_p, world) / per_rank_flops(spec1, 1)
        table.rows.append([kind, f"{spec1.label()} -> {spec_p.label()}", single_threads, f"{1e3 * t1:.1f}",
                           f"{1e3 * tp:.1f}", f"{t1 / tp:.2f}", f"{flop_ratio:.2f}", f"{one_thread / tp:.2f}"])
        data.append({"kind": kind, "p1": spec1.label(), "p": spec_p.label(), "world": world, "t1_s": t1, "tp_s": tp,
                     "flop_ratio": flop_ratio, "one_thread_s": one_thread})
    table.notes.append(f"This machine: {len(cores)} usable cores, so P <= {world}. Medians of {repeats} steps after "
                       f"{WARMUP} warm-up steps, P=1 and P={world} steps alternating; step time = slowest rank. "
                       "Efficiency 1.00 is ideal; "
                       "'per-rank FLOPs' > 1 is work that does not split over ranks (the filter MLP is evaluated "
                       "at every position on every rank; FFT length grows with the global size).")
    return Section("CP efficiency (CPU)", [table], [], [], {"rows": data})
