"""Shared benchmark plumbing: result containers, the run context, timing and thread pinning.

Timings are wall-clock medians after warm-up; on CUDA every timed call is bracketed by
``torch.cuda.synchronize`` so the host clock measures finished kernels.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Table", "Section", "BenchContext", "median_time", "sync", "threads", "pinned", "machine_line",
           "fmt_bytes"]


@dataclass
class Table:
    """One Markdown table: ``rows`` hold already formatted cells (str) or numbers."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Section:
    """What a section returns: tables, plot file names (relative to the output folder),
    free-text findings, and the raw numbers (JSON-serialisable) that tests can check."""

    title: str
    tables: list[Table] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchContext:
    """Settings every section gets. ``pools`` runs functions on gloo rank groups
    (`hyena_cp.bench.ranks.RankPools`); ``threads`` is the intra-op thread count of the
    single-process sections."""

    out: Path
    quick: bool
    threads: int
    pools: Any


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels (CUDA); a no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], *, repeats: int, warmup: int = 1, device: torch.device | str = "cpu",
                min_seconds: float = 0.0) -> float:
    """Median seconds of ``fn()`` over at least ``repeats`` runs after ``warmup`` runs; more runs
    are added (up to 5x ``repeats``) until ``min_seconds`` of timed work, which steadies the
    median of sub-millisecond calls."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < 5 * repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def pinned(cores: set[int] | None) -> Iterator[None]:
    """Restrict this process to ``cores`` (Linux ``sched_setaffinity``) for the block, so P
    ranks with one thread each and one rank with P threads use the same cores. ``None`` or
    an OS without affinity control leaves scheduling alone."""
    if cores is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def machine_line(threads_used: int) -> str:
    """One line naming the machine, for every report."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return (f"{platform.processor() or platform.machine()}, {cores} CPU cores available, {cuda}; "
            f"torch {torch.__version__}, Python {platform.python_version()}; "
            f"single-process CPU sections use torch.set_num_threads({threads_used})")


def fmt_bytes(n: float | None) -> str:
    """Human-readable bytes (binary units); ``None`` -> "n/a"."""
    if n is None:
        return "n/a"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.2f} {units[i]}"
