"""Memory and traffic measurements of one call.

- `saved_for_backward`: bytes autograd keeps for backward, from
  ``torch.autograd.graph.saved_tensors_hooks``; each storage counts once (q, k, v are views
  of one conv output), parameters and buffers are excluded (they are not activations and
  are replicated on every CP rank), and every byte is attributed to the submodule that was
  running when it was saved, so a miss can be traced to its cause.
- `peak_memory`: the high-water mark above the starting point of what the framework's
  allocator hands out: ``max_memory_allocated`` on CUDA, the profiler's memory records on
  CPU (process RSS is no use here: glibc keeps freed pages, so it misses reused memory).
- `TrafficCounter`: bytes read and written by every eager aten kernel (inputs + outputs,
  views free), a no-fusion model of DRAM traffic for achieved-bandwidth figures.
- `CollectiveCounter`: every ``c10d`` op that reaches a process group, with the bytes it sends
  to other ranks, seen at the dispatcher: a measurement of what the code hands to
  torch.distributed, independent of `hyena_cp.parallel.count_comm`'s own bookkeeping.
"""
from __future__ import annotations

import os

import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hyena_cp.bench.common import sync
from hyena_cp.parallel.traceable import run_body

__all__ = ["CollectiveCounter", "saved_for_backward", "module_prefix", "peak_memory", "time_and_peak", "timed_rounds", "top_ops",
           "TrafficCounter"]


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return str(t.device), storage.data_ptr()


def module_prefix(name: str, depth: int = 2) -> str:
    """Default attribution label: the first ``depth`` components of a submodule's name
    (``hyena.filter.hidden.0`` -> ``hyena.filter``); the root module is "(mixer ops)"."""
    return ".".join(name.split(".")[:depth]) or "(mixer ops)"


def _attribution_hooks(module: nn.Module, stack: list[str], label: Callable[[str], str]) -> list:
    """Forward pre/post hooks that keep ``stack`` = labels of the running submodules."""
    handles = []
    for name, sub in module.named_modules():
        def pre(_mod, _args, tag=label(name)):
            stack.append(tag)

        def post(_mod, _args, _out):
            stack.pop()

        handles += [sub.register_forward_pre_hook(pre), sub.register_forward_hook(post)]
    return handles


def saved_for_backward(module: nn.Module, fn: Callable[[], Any],
                       label: Callable[[str], str] = module_prefix) -> tuple[int, dict[str, int], Any]:
    """Run ``fn()`` (a forward through ``module``) and measure what autograd saves.

    Returns ``(total_bytes, bytes_by_label, fn's result)``; a saved tensor counts for the
    label (``label(submodule name)``) of the innermost submodule running when it was saved.
    The counts are taken at save time; drop the result (or run backward) yourself.
    """
    params = {_storage_key(t) for t in [*module.parameters(), *module.buffers()]}
    seen: set[tuple[str, int]] = set()
    by_part: dict[str, int] = defaultdict(int)
    stack: list[str] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in params and key not in seen and t.untyped_storage().nbytes():
            seen.add(key)
            by_part[stack[-1] if stack else "(outside)"] += t.untyped_storage().nbytes()
        return t

    handles = _attribution_hooks(module, stack, label)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = fn()
    finally:
        for h in handles:
            h.remove()
    return sum(by_part.values()), dict(by_part), result


def _quiet_profiler() -> None:
    """Keep the profiler's C++ logs (kineto's ``USDT ... profiler_start`` lines and c10's
    "Memory block of unknown size" warning, one per call and rank) out of the bench output:
    both are read when a profile starts, so setting them here is enough. A user's own values win."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # above kineto's ERROR and STAGE levels
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


def _cpu_peak(fn: Callable[[], Any]) -> int | None:
    """Peak bytes held by torch's CPU allocator above the start of ``fn()``: the running sum
    of the profiler's allocation (+) and free (-) records, in time order."""
    from torch.profiler import ProfilerActivity, profile

    _quiet_profiler()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        records = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # the raw event API moved: report "unknown" rather than a wrong number
        return None
    live = peak = 0
    for _, nbytes in sorted(records):
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int | None:
    """Peak bytes allocated above the starting point while ``fn()`` runs: CUDA allocator stats,
    or torch's CPU allocator through the profiler's memory records. ``None`` elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    return _cpu_peak(fn) if device.type == "cpu" else None


def _timed(fn: Callable[[], Any], device: torch.device | str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def timed_rounds(fns: dict[str, Callable[[], Any]], *, repeats: int, device: torch.device | str = "cpu",
                 slow_s: float = 2.0) -> tuple[dict[str, list[float]], dict[str, int | None]]:
    """``({name: seconds of every timed call}, {name: peak bytes})`` for callables compared
    with each other.

    Each gets one untimed warm-up call, which also measures its peak memory (`peak_memory`);
    then the timed calls alternate between the callables, so a load change on a shared
    machine hits all of them alike and their ratios stay meaningful. A warm-up slower than
    ``slow_s`` caps the timed rounds at 3 (the quadratic attention points of a CPU run; the
    warm-up runs under the memory profiler, several times slower than a timed call).
    """
    peaks, slow = {}, False
    for name, fn in fns.items():
        start = time.perf_counter()
        peaks[name] = peak_memory(fn, device)
        slow = slow or time.perf_counter() - start > slow_s
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(min(repeats, 3) if slow else repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return times, peaks


def time_and_peak(fns: dict[str, Callable[[], Any]], *, repeats: int, device: torch.device | str = "cpu",
                  slow_s: float = 2.0) -> dict[str, tuple[float, int | None]]:
    """``{name: (median seconds, peak bytes)}`` of `timed_rounds` (same arguments)."""
    times, peaks = timed_rounds(fns, repeats=repeats, device=device, slow_s=slow_s)
    return {name: (statistics.median(times[name]), peaks[name]) for name in fns}


def top_ops(fn: Callable[[], Any], k: int = 6) -> list[tuple[str, float]]:
    """The ``k`` aten ops with the most self CPU time in one ``fn()`` call, as
    ``(name, share of the total self time)``: where a CPU timing goes."""
    from torch.profiler import ProfilerActivity, profile

    _quiet_profiler()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in ops) or 1.0
    return [(name, t / total) for name, t in sorted(ops, key=lambda item: -item[1])[:k]]


def _nbytes(x: Any) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


class TrafficCounter(TorchDispatchMode):
    """Sum of bytes each aten kernel reads (tensor inputs) and writes (tensor outputs).

    View ops (``func.is_view``) move nothing and allocation-only ops write nothing. This is
    the traffic of unfused eager execution: an upper bound for what a fused kernel needs.
    Active in backward too (dispatch modes follow autograd into its worker threads).
    """

    _FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh"}

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.by_op: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in self._FREE:
            return out
        moved = sum(_nbytes(x) for x in tree_leaves((args, kwargs or {}))) + sum(_nbytes(x) for x in tree_leaves(out))
        self.bytes += moved
        self.by_op[name] += moved
        return out


def _group(args: tuple) -> dist.ProcessGroup:
    return dist.ProcessGroup.unbox(next(a for a in args if isinstance(a, torch.ScriptObject)))


def _alltoall_sent(args: tuple) -> int:
    """``alltoall_base_(out, in, group, out_splits, in_splits, ...)``: the input's blocks for
    other ranks (equal blocks when ``in_splits`` is empty)."""
    x, group, splits = args[1], _group(args), args[4]
    if not splits:
        return _nbytes(x) * (group.size() - 1) // group.size()
    return sum(n for i, n in enumerate(splits) if i != group.rank()) * _nbytes(x) // max(1, x.shape[0])


# op name -> bytes this rank sends to other ranks (comm_stats' conventions); other ops count calls only
_SENT: dict[str, Callable[[tuple], int]] = {
    "alltoall_base_": _alltoall_sent,
    "send": lambda args: sum(_nbytes(t) for t in args[0]),
    "_allgather_base_": lambda args: _nbytes(args[1]) * (_group(args).size() - 1),
    "_reduce_scatter_base_": lambda args: _nbytes(args[0]) * (_group(args).size() - 1),
    "allreduce_": lambda args: sum(2 * (_group(args).size() - 1) * _nbytes(t) // _group(args).size()
                                   for t in args[0]),
}


class CollectiveCounter(TorchDispatchMode):
    """Calls (``calls[op]``) and bytes sent to other ranks (``sent[op]``) of every ``c10d`` op
    dispatched inside the block (forward and backward), by c10d op name (``alltoall_base_``,
    ``send``, ``recv_``, ``_allgather_base_``, ...). Bytes are computed from the tensors the op
    receives, for the ops in ``_SENT``; any other op is still counted in ``calls``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = defaultdict(int)
        self.sent: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "hyena_cp":  # our collectives' custom ops: count the c10d ops inside
            with self:
                return run_body(func, args, kwargs)
        if func.namespace == "c10d":
            name = func.overloadpacket.__name__
            self.calls[name] += 1
            self.sent[name] += _SENT[name](args) if name in _SENT else 0
        return func(*args, **(kwargs or {}))
