"""Benchmarks: communication floor, activation memory per rank, Hyena vs attention, CP
efficiency on CPU, LM quality, packed sequences, cached decoding, parameter/gradient/AdamW
bytes per rank (FSDP2), speed (eager vs compiled, fp32 vs bf16, vs SDPA and a reference Hyena
layer), the StripedHyena 2 / HyenaDNA operators and models, and one GPU where CUDA is present.

    python launch/bench.py [--out DIR] [--quick] [--sections comm,memory,scaling,cp,lm,packing,gen,sharding,speed,striped,nvsub,gpu] [--threads N]

One command, no torchrun: the multi-rank sections start their own gloo groups of P = 1, 2, 4
local processes (from a fork server, `hyena_cp.bench.ranks`). Writes DIR/bench.md (tables), DIR/bench.json (raw
numbers) and DIR/*.png (plots), and prints the Markdown. DIR defaults to outputs/bench, or
outputs/bench_quick with ``--quick`` (so a smoke run never overwrites a full one). ``--quick`` is
the CI smoke run (tiny sizes, about a minute on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# before torch is imported: c10 reads its log level once (the memory profiler's per-call warning)
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

from hyena_cp.bench import SECTIONS, BenchContext
from hyena_cp.bench.common import machine_line
from hyena_cp.bench.ranks import RankPools
from hyena_cp.bench.report import section_markdown, write_report
from hyena_cp.host_memory import tune_host_memory

# relative to the working directory, like the trainer's outputs/<config>/
DEFAULT_OUT, QUICK_OUT = Path("outputs/bench"), Path("outputs/bench_quick")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder for bench.md, bench.json, *.png (default: {DEFAULT_OUT}, or {QUICK_OUT} "
                             f"with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every section")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch intra-op threads of the single-process CPU sections (default: usable cores)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    return args


def run_note(seconds: float) -> str:
    """Wall time of a section and how busy the machine was: other jobs on a shared machine
    make CPU timings noisy (the ratios less so: compared calls alternate)."""
    load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    busy = " - BUSY machine, CPU timings are noisy" if load > cores else ""
    return f"section wall time {seconds:.1f} s; 1-minute load average {load:.1f} on {cores} cores at its end{busy}"


def main(argv: list[str] | None = None) -> list:
    """Run the chosen sections, write the report, print it; returns the `Section` results."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    header = [f"Machine: {machine_line(args.threads)}.",
              "CPU figures are ratios between runs on the same machine; absolute times are only meaningful from the "
              "GPU section." + (" Quick (smoke) sizes." if args.quick else "")]
    print("\n".join(header), flush=True)
    results = []
    with RankPools() as pools:
        ctx = BenchContext(out=args.out, quick=args.quick, threads=args.threads, pools=pools)
        for name in args.sections:
            start = time.perf_counter()
            section = SECTIONS[name](ctx)
            section.notes.append(run_note(time.perf_counter() - start))
            print("\n" + section_markdown(section), flush=True)
            results.append(section)
    print(f"wrote {write_report(args.out, header, results)}")
    return results


if __name__ == "__main__":
    tune_host_memory()  # before the first large CPU tensor: huge pages, freed memory kept (hyena_cp.host_memory)
    main(sys.argv[1:])
