"""Reusable gloo worker pools for multi-process tests (behind the ``dist_run`` fixture).

Start-up cost dominates small distributed tests (a spawned worker re-imports torch and
megatron: 2-6 s). So workers are FORKED from the pytest process, which has already imported
everything during collection, once per world size, and reused by every test. Each worker
initializes gloo once and then loops on tasks: ``fn(*args, **kwargs)`` with the WORLD group
set up; return values come back pickled over a pipe.

Failure policy: a rank error (or a dead worker, or a timeout) tears the whole pool down,
since peers may be stuck in a collective and the group state is unknown; the next call
forks a fresh pool. The exception is ``expect_error`` runs in which every rank raised
before communicating: the group is untouched, so the pool is kept.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

import torch
import torch.distributed as dist

from hyena_cp.parallel import count_comm

# A dead peer must fail a collective in tests, not hang it for gloo's default 30 min.
GLOO_TIMEOUT = timedelta(seconds=60)
# After one rank fails, the others get this long to report (they may be blocked in a
# collective with the failed rank) before the pool is killed.
ERROR_GRACE_S = 2.0


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


def _run_task(conn: Connection, task: tuple) -> None:
    fn, args, kwargs = task
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    try:
        with count_comm() as stats:
            value = fn(*args, **kwargs)
        reply = ("ok", value, None)
    except BaseException as exc:  # report everything, then keep serving
        reply = ("err", (_picklable_error(exc), traceback.format_exc()), stats.calls.copy())
    finally:
        # A task must not leak global state into the next test on this worker.
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        torch.set_num_threads(1)
    try:
        conn.send(reply)
    except Exception as exc:  # e.g. an unpicklable return value
        conn.send(("err", (RuntimeError(f"could not send the result: {exc!r}"), traceback.format_exc()), {}))


def _worker(rank: int, world: int, port: int, conn: Connection) -> None:
    # Intra-op threads would oversubscribe the 2 cores and OpenMP pools are not fork-safe.
    torch.set_num_threads(1)
    parent = os.getppid()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=GLOO_TIMEOUT
    )
    conn.send(("ready", None, None))
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:  # pytest died without closing us: do not linger
                os._exit(1)
            continue
        try:
            task = conn.recv()
        except EOFError:
            os._exit(1)
        if task is None:
            break
        _run_task(conn, task)
    dist.barrier()
    dist.destroy_process_group()
    conn.close()


class RankError(AssertionError):
    """A rank raised: carries every failing rank's traceback."""


class WorkerPool:
    """``world`` forked gloo ranks that run tasks until `close`."""

    def __init__(self, world: int, start_timeout: float = 60.0):
        ctx = mp.get_context("fork")
        port = _free_port()
        self.world = world
        self.procs: list[mp.Process] = []
        self.conns: list[Connection] = []
        for rank in range(world):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, world, port, child_end), daemon=True)
            proc.start()
            child_end.close()  # so the parent sees EOF when the worker dies
            self.procs.append(proc)
            self.conns.append(parent_end)
        replies = self._collect(start_timeout)
        if any(status != "ready" for status, _, _ in replies):
            self.kill()
            raise RuntimeError(f"gloo workers failed to start: {replies}")

    def _collect(self, timeout: float) -> list[tuple]:
        """One reply per rank; a dead worker, an error (after a grace period) or a timeout
        leaves ``("err", ...)``/``("missing", ...)`` entries instead of hanging."""
        replies: list[tuple | None] = [None] * self.world
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
                    code = self.procs[rank].exitcode
                    replies[rank] = ("err", (RuntimeError(f"rank {rank} died (exit code {code})"), ""), {})
                if replies[rank][0] == "err":
                    deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
        return [r if r is not None else ("missing", None, None) for r in replies]

    def run(self, fn: Callable, args: tuple, kwargs: dict, timeout: float) -> list[tuple]:
        for conn in self.conns:
            conn.send((fn, args, kwargs))
        return self._collect(timeout)

    def close(self, timeout: float = 30.0) -> None:
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


def _format(replies: list[tuple]) -> str:
    parts = []
    for rank, (status, payload, _) in enumerate(replies):
        if status == "err":
            parts.append(f"--- rank {rank} raised ---\n{payload[1] or repr(payload[0])}")
        elif status == "missing":
            parts.append(f"--- rank {rank}: no reply (timed out or killed after a peer failed) ---")
    return "\n".join(parts)


class DistRunner:
    """Callable behind the ``dist_run`` fixture; owns one `WorkerPool` per world size."""

    def __init__(self, timeout: float = 120.0):
        self.timeout = timeout
        self.pools: dict[int, WorkerPool] = {}

    def __call__(
        self, fn: Callable, world_size: int, *args: Any,
        expect_error: type[BaseException] | None = None, **kwargs: Any,
    ) -> list:
        """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; per-rank results in rank order.

        ``fn`` must be a module-level function; it gets the group from
        ``torch.distributed.group.WORLD``. With ``expect_error=E`` every rank must raise an
        ``E`` without any `hyena_cp.parallel` communication first; the exceptions are returned.
        """
        return self.run(fn, world_size, args, kwargs, expect_error=expect_error)

    def run(self, fn: Callable, world_size: int, args: tuple = (), kwargs: dict | None = None,
            expect_error: type[BaseException] | None = None, timeout: float | None = None) -> list:
        """`__call__` with explicit ``args``/``kwargs`` and a per-call result ``timeout`` (s)."""
        pool = self.pools.get(world_size)
        if pool is None:
            pool = self.pools[world_size] = self._start(world_size)
        replies = pool.run(fn, args, kwargs or {}, timeout or self.timeout)
        statuses = [status for status, _, _ in replies]
        if expect_error is None:
            if all(s == "ok" for s in statuses):
                return [value for _, value, _ in replies]
            self._discard(world_size)
            raise RankError(f"{fn.__name__} failed on {world_size} ranks:\n{_format(replies)}")
        clean = all(s == "err" and isinstance(p[0], expect_error) and not calls for s, p, calls in replies)
        if clean:
            return [payload[0] for _, payload, _ in replies]
        self._discard(world_size)
        details = [
            f"rank {r}: {s}, communicated={dict(calls or {})}" + (f", raised {p[0]!r}" if s == "err" else "")
            for r, (s, p, calls) in enumerate(replies)
        ]
        raise AssertionError(
            f"expected every rank to raise {expect_error.__name__} before communicating:\n"
            + "\n".join(details) + "\n" + _format(replies)
        )

    @staticmethod
    def _start(world_size: int, attempts: int = 3) -> WorkerPool:
        # The OS-chosen port can be taken by someone else before rank 0 binds it: retry.
        for _ in range(attempts - 1):
            try:
                return WorkerPool(world_size)
            except RuntimeError:
                pass
        return WorkerPool(world_size)

    def _discard(self, world_size: int) -> None:
        pool = self.pools.pop(world_size, None)
        if pool is not None:
            pool.kill()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
