"""Reusable gloo worker pools on one machine, for the multi-process tests and benchmarks.

Start-up cost dominates small distributed runs (a spawned worker re-imports torch and
megatron: 2-6 s). So workers are FORKED from a process that has already imported
everything, and reused: each sets one intra-op thread (the machine has few cores and
OpenMP pools are not fork-safe), joins a gloo group on 127.0.0.1 once, then loops on tasks
``fn(*args, **kwargs)`` with the WORLD group set up; replies come back pickled over a pipe
as `Reply` tuples, one per rank, and the caller decides what a failure means.

Start methods: ``"fork"`` (the default, for the tests: workers inherit the test module's
imports and functions) or ``"forkserver"`` (the benchmarks): GNU OpenMP is not fork-safe, so
a worker forked from a parent that has already run a multi-threaded op hangs in its first
parallel region with more than one thread, which benchmarks that time "one rank with P
threads" need. A fork server is a fresh interpreter that has never run one; it preloads
``preload`` (torch, megatron-core) once, so its workers still start in well under a second.

Failure policy: after a rank error (or a dead worker, or a timeout) the peers may be stuck
in a collective and the group state is unknown, so the caller should `LocalPools.discard`
the pool; the next `LocalPools.get` forks a fresh one.

Forking a process that holds garbage: the parent may have dropped process groups that its
garbage collector has not reached yet. Freed in a worker, a gloo group's destructor joins
threads that only the parent has and never returns (tests/test_local_pool.py); that was the
stack of the rare "no reply" hangs of test workers forked late in the suite. So the parent
collects before it forks and each worker freezes what it inherited (`gc.freeze`).

Post-mortems: a worker that dies of a signal (a crash in native code: glibc's heap checks
abort, a segfault) or does not reply in time leaves its Python stacks, all threads, in the
reply (`faulthandler`, written to a per-rank file the parent reads): a rare hang or crash on
a CI machine then says where it happened instead of only "no reply".
"""
from __future__ import annotations

import faulthandler
import gc
import multiprocessing as mp
import os
import pickle
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from hyena_cp.parallel.comm_stats import count_comm
from hyena_cp.distributed.mesh import cached_mesh_groups

__all__ = ["LocalPool", "LocalPools", "Reply", "format_failures"]


class Reply(NamedTuple):
    """One rank's answer. ``status``: "ok" (``value`` is the result), "err" (``value`` is
    ``(exception, traceback text)``), "missing" (no reply in time; ``value`` is the rank's
    Python stacks when it could dump them, else None) or "ready" (start-up).
    ``calls``: `hyena_cp.parallel` collectives per op made by a failed task."""

    status: str
    value: Any
    calls: dict[str, int] | None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _picklable_error(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


START_METHODS = ("fork", "forkserver")


def _live_groups() -> set:
    """Every process group this process holds (WORLD included). torch has no public list, so
    read c10d's registry; an empty set (no cleanup) if a torch version moves it."""
    world = getattr(dist.distributed_c10d, "_world", None)
    return set(getattr(world, "pg_map", {}))


def _destroy_new_groups(before: set) -> None:
    """Destroy the groups a task created and left behind (``new_group``, megatron's
    ``parallel_state``, whose ``destroy_model_parallel`` only drops its references): each gloo
    group keeps its threads, and a worker that serves hundreds of tasks would otherwise
    gather thousands of them. The run meshes `init_parallel` caches are kept: they are reused by
    the next task's `init_parallel` (and DTensor's caches may hold them)."""
    for group in _live_groups() - before - cached_mesh_groups():
        if group is not dist.group.WORLD:
            dist.destroy_process_group(group)


def _run_task(conn: Connection, task: tuple) -> None:
    fn, args, kwargs = task
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    groups = _live_groups()
    try:
        with count_comm() as stats:
            value = fn(*args, **kwargs)
        reply = Reply("ok", value, None)
    except BaseException as exc:  # report everything, then keep serving
        reply = Reply("err", (_picklable_error(exc), traceback.format_exc()), dict(stats.calls))
    finally:
        # A task must not leak global state into the next task on this worker.
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        torch.set_num_threads(1)
        _destroy_new_groups(groups)
    try:
        conn.send(reply)
    except Exception as exc:  # e.g. an unpicklable return value
        conn.send(Reply("err", (RuntimeError(f"could not send the result: {exc!r}"), traceback.format_exc()), {}))


# how long a worker gets to write its stacks after the parent asks (SIGUSR1) on a timeout
DUMP_GRACE_S = 2.0


def _worker(rank: int, world: int, port: int, conn: Connection, gloo_timeout_s: float, stack_path: str) -> None:
    gc.freeze()  # what the fork inherited is never collected here (module docstring: "Forking ...")
    # Kept open for the worker's life: faulthandler writes to it from a signal handler.
    stacks = open(stack_path, "w")  # noqa: SIM115
    faulthandler.enable(file=stacks, all_threads=True)  # fatal signals: SIGSEGV, SIGABRT, ...
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)  # the parent's "where are you?"
    torch.set_num_threads(1)
    parent = os.getppid()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=gloo_timeout_s))
    conn.send(Reply("ready", None, None))
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:  # the parent died without closing us: do not linger
                os._exit(1)
            continue
        try:
            task = conn.recv()
        except EOFError:
            os._exit(1)
        if task is None:
            break
        _run_task(conn, task)
    dist.barrier()  # exiting without destroy aborts gloo processes now and then
    dist.destroy_process_group()
    conn.close()


class LocalPool:
    """``world`` forked gloo ranks that run tasks until `close`.

    Args:
        gloo_timeout_s: gloo's collective timeout; finite, so a dead peer fails a
            collective instead of hanging it for gloo's default 30 min.
        start_timeout_s: how long the ranks get to join the group.
        error_grace_s: after one rank fails, how long the others get to report (they may
            be blocked in a collective with the failed rank) before `run` gives up on them.
    """

    def __init__(self, world: int, *, gloo_timeout_s: float, start_timeout_s: float = 60.0,
                 error_grace_s: float = 2.0, start_method: str = "fork", preload: tuple[str, ...] = ()):
        if start_method not in START_METHODS:
            raise ValueError(f"start_method={start_method!r} must be one of {START_METHODS}")
        ctx = mp.get_context(start_method)
        if start_method == "forkserver" and preload:
            ctx.set_forkserver_preload(list(preload))  # read when the server starts (once per process)
        port = _free_port()
        self.world, self.error_grace_s = world, error_grace_s
        self.procs: list[mp.Process] = []
        self.conns: list[Connection] = []
        self.stack_paths: list[str] = []
        if start_method == "fork":
            gc.collect()  # the parent's garbage (dropped process groups, ...) dies here, with its threads
        for rank in range(world):
            fd, stack_path = tempfile.mkstemp(prefix=f"hyena_cp-pool-rank{rank}-", suffix=".stacks")
            os.close(fd)
            self.stack_paths.append(stack_path)
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, world, port, child_end, gloo_timeout_s, stack_path),
                               daemon=True)
            proc.start()
            child_end.close()  # so the parent sees EOF when the worker dies
            self.procs.append(proc)
            self.conns.append(parent_end)
        replies = self._collect(start_timeout_s)
        if any(reply.status != "ready" for reply in replies):
            self.kill()
            raise RuntimeError(f"gloo workers failed to start on a {world}-rank group:\n{format_failures(replies)}")

    def _collect(self, timeout: float) -> list[Reply]:
        """One reply per rank; a dead worker, an error (after the grace period) or a timeout
        leaves "err"/"missing" replies instead of hanging."""
        replies: list[Reply | None] = [None] * self.world
        deadline = time.monotonic() + timeout
        pending = {c: r for r, c in enumerate(self.conns)}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for conn in wait(list(pending), timeout=left):
                rank = pending.pop(conn)
                try:
                    replies[rank] = conn.recv()
                except EOFError:
                    self.procs[rank].join(1.0)  # the exit code is set once it is reaped
                    code = self.procs[rank].exitcode
                    died = RuntimeError(f"rank {rank} died (exit code {code})")
                    stacks = self._stacks(rank)  # a fatal signal's dump, if it was one
                    replies[rank] = Reply("err", (died, f"{died!r}\n{stacks}" if stacks else ""), {})
                if replies[rank].status == "err":
                    deadline = min(deadline, time.monotonic() + self.error_grace_s)
        return [r if r is not None else Reply("missing", self._dump_stacks(rank), None)
                for rank, r in enumerate(replies)]

    def _stacks(self, rank: int, start: int = 0) -> str:
        """What rank ``rank``'s faulthandler wrote from byte ``start`` on ("" if nothing)."""
        try:
            with open(self.stack_paths[rank]) as f:
                f.seek(start)
                return f.read()
        except OSError:
            return ""

    def _dump_stacks(self, rank: int) -> str | None:
        """Ask a silent, live rank for its Python stacks (all threads); None if it gives none."""
        proc = self.procs[rank]
        if not proc.is_alive():
            return self._stacks(rank) or None
        start = os.path.getsize(self.stack_paths[rank])
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + DUMP_GRACE_S
        text = ""
        while time.monotonic() < deadline:
            time.sleep(0.1)
            new = self._stacks(rank, start)
            if new and new == text:  # stopped growing: the dump is complete
                break
            text = new
        return text or None

    def run(self, fn: Callable[..., Any], args: tuple, kwargs: dict, timeout: float) -> list[Reply]:
        """``fn(*args, **kwargs)`` on every rank (``fn`` module-level, arguments picklable);
        replies in rank order, after at most ``timeout`` seconds."""
        for conn in self.conns:
            conn.send((fn, args, kwargs))
        return self._collect(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Shut down cleanly (barrier, destroy the group), killing what has not exited in time."""
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:  # that worker is already gone; kill() reaps the rest
                pass
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        """Stop every worker now (they may be blocked in gloo) and reap them."""
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(5.0)
        for conn in self.conns:
            conn.close()
        for path in self.stack_paths:
            try:
                os.remove(path)
            except OSError:
                pass


class LocalPools:
    """One `LocalPool` per world size, forked on first use and reused until discarded;
    the arguments are those of `LocalPool`, plus how often to try a start."""

    def __init__(self, *, gloo_timeout_s: float, start_timeout_s: float = 60.0, error_grace_s: float = 2.0,
                 start_attempts: int = 3, start_method: str = "fork", preload: tuple[str, ...] = ()):
        self.gloo_timeout_s, self.start_timeout_s = gloo_timeout_s, start_timeout_s
        self.start_method, self.preload = start_method, preload
        if start_attempts < 1:
            raise ValueError(f"start_attempts must be at least 1, got {start_attempts}")
        self.error_grace_s, self.start_attempts = error_grace_s, start_attempts
        self.pools: dict[int, LocalPool] = {}

    def get(self, world: int) -> LocalPool:
        pool = self.pools.get(world)
        if pool is None:
            pool = self.pools[world] = self._start(world)
        return pool

    def _start(self, world: int) -> LocalPool:
        # The OS-chosen port can be taken by someone else before rank 0 binds it: retry.
        for attempt in range(self.start_attempts):
            try:
                return LocalPool(world, gloo_timeout_s=self.gloo_timeout_s, start_timeout_s=self.start_timeout_s,
                                 error_grace_s=self.error_grace_s, start_method=self.start_method,
                                 preload=self.preload)
            except RuntimeError:
                if attempt == self.start_attempts - 1:
                    raise
        raise AssertionError("unreachable: start_attempts >= 1")

    def discard(self, world: int) -> None:
        """Kill the ``world``-rank pool (after a failure); the next `get` forks a fresh one."""
        pool = self.pools.pop(world, None)
        if pool is not None:
            pool.kill()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()


def format_failures(replies: list[Reply]) -> str:
    """The tracebacks of the failed ranks and the ranks that did not reply, one block each."""
    parts = []
    for rank, (status, value, _) in enumerate(replies):
        if status == "err":
            parts.append(f"--- rank {rank} raised ---\n{value[1] or repr(value[0])}")
        elif status == "missing":
            parts.append(f"--- rank {rank}: no reply (timed out or killed after a peer failed) ---"
                         + (f"\nits stacks when it was given up on:\n{value}" if value else ""))
    return "\n".join(parts)
