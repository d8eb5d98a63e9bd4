"""Section: packed sequences. Forward + backward of one 1-D Hyena mixer layer (one process)
on a batch of N packed documents (random lengths, seeded) against the same layer and input
unpacked, at L=16k with N in {1, 8, 64}: time and peak-memory ratios, measured in one run
with the calls alternating (`timed_rounds`). Target: time ratio <= 1.3 at every N, judged on
the fastest of the alternating calls (on a shared machine other jobs only ever add time, so
the minimum is the least disturbed measurement); the ratio of the medians is reported too.
Every round runs (no cap on slow warm-ups: at L=16k the profiled warm-up of one call takes
seconds, which would otherwise leave 3 rounds).

What packing costs: the short conv subtracts its few cross-document tap terms after the
plain conv (O(documents * K^2 * C)), and the long conv gathers the documents into buckets
(`hyena_cp.ops.packing.DocumentBuckets`), runs FFTs of 2m per document (m < 1.5 n) instead of
2L per row and scatters the result back: the gathers cost a few copies, the shorter FFTs save
more than that (O(sum n log n) < O(L log L)). One document per row is detected and takes the
plain path: N=1 runs the same code as "unpacked", so its distance from 1.00 is the noise.
"""
from __future__ import annotations

import statistics
from functools import partial

import torch

from hyena_cp.bench.common import BenchContext, Section, Table, fmt_bytes, threads
from hyena_cp.bench.layer import LayerSpec, build_layer, fwd_bwd, local_input
from hyena_cp.bench.measure import timed_rounds

__all__ = ["run", "random_cu_seqlens", "TARGET"]

TARGET = 1.3  # packed / unpacked forward + backward time


def random_cu_seqlens(length: int, documents: int, seed: int) -> torch.Tensor:
    """``[documents + 1]`` boundaries of one row of ``length`` tokens cut at random (seeded)
    distinct positions: document lengths as uneven as real data."""
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(length - 1, generator=gen)[:documents - 1] + 1
    return torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values, torch.tensor([length])])


def _setup(quick: bool) -> tuple[LayerSpec, tuple[int, ...], int]:
    """``(layer, document counts, timed repeats)``."""
    if quick:
        return LayerSpec((256,), channels=16, heads=4), (1, 4), 2
    return LayerSpec((16384,)), (1, 8, 64), 9


def run(ctx: BenchContext) -> Section:
    spec, counts, repeats = _setup(ctx.quick)
    length = spec.spatial[0]
    with threads(ctx.threads):
        # absolute filter positions (at L the same filter as a relative one): packing needs them
        layer, x = build_layer(spec, max_len=length), local_input(spec, None)
        bounds = {n: random_cu_seqlens(length, n, seed=n) for n in counts}
        fns = {"unpacked": partial(fwd_bwd, layer, x)}
        fns.update({f"{n} documents": partial(fwd_bwd, layer, x, cu_seqlens=cu) for n, cu in bounds.items()})
        times, peaks = timed_rounds(fns, repeats=repeats, slow_s=float("inf"))
    base_s, base_median, base_peak = min(times["unpacked"]), statistics.median(times["unpacked"]), peaks["unpacked"]
    table = Table(f"Packed vs unpacked mixer layer, forward + backward, L={length}, C={spec.channels}, "
                  f"K={spec.kernel}, B={spec.batch}",
                  ["documents", "lengths min / median / max", "time (fastest)", "time ratio", "median ratio",
                   "peak alloc", "peak ratio", f"<= {TARGET}"])
    table.rows.append(["unpacked", f"{length}", f"{base_s * 1e3:.1f} ms", "1.00", "1.00", fmt_bytes(base_peak), "1.00",
                       ""])
    rows = []
    for n, cu in bounds.items():
        name = f"{n} documents"
        seconds, peak = min(times[name]), peaks[name]
        sizes = cu.diff().tolist()
        ratio, median_ratio = seconds / base_s, statistics.median(times[name]) / base_median
        peak_ratio = None if peak is None or not base_peak else peak / base_peak
        table.rows.append([str(n), f"{min(sizes)} / {statistics.median(sizes):.0f} / {max(sizes)}",
                           f"{seconds * 1e3:.1f} ms", f"{ratio:.2f}", f"{median_ratio:.2f}", fmt_bytes(peak),
                           "n/a" if peak_ratio is None else f"{peak_ratio:.2f}", "yes" if ratio <= TARGET else "NO"])
        rows.append({"documents": n, "seconds": seconds, "ratio": ratio, "median_ratio": median_ratio,
                     "times": times[name], "peak": peak, "peak_ratio": peak_ratio})
    table.notes.append(f"{repeats} alternating timed calls each after one warm-up (which also measures the peak of "
                       "torch's CPU allocator); time = the fastest call, the least disturbed by other jobs; the "
                       "median ratio is the ratio of the medians. Random document lengths (seeded cut points). "
                       "1 document per row takes the plain path: its distance from 1.00 is the measurement noise.")
    misses = [r["documents"] for r in rows if r["ratio"] > TARGET]
    notes = [f"Target time ratio <= {TARGET}: " + ("met at every document count." if not misses else
                                                  f"missed at {misses} documents.")]
    return Section("Packed sequences (one process)", [table], [], notes,
                   {"length": length, "unpacked_seconds": base_s, "unpacked_times": times["unpacked"], "rows": rows})
