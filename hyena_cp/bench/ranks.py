"""Gloo rank groups for the multi-rank benchmark sections, started by the bench itself.

``python launch/bench.py`` stays one command (no torchrun): `RankPools` forks P worker
processes per group size on first use, each joins a gloo group on 127.0.0.1 and then
runs tasks ``fn(group, *args)`` until closed; results come back pickled over a pipe. Pools
are reused by every section. Workers are forked (not spawned) so they skip re-importing
torch (seconds per rank); they run with one intra-op thread, which keeps OpenMP fork-safe.

This module only creates and destroys process groups; every collective the benchmarks
use goes through `hyena_cp.parallel`.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["RankPool", "RankPools", "RankFailure"]


class RankFailure(RuntimeError):
    """A benchmark task failed (or timed out) on at least one rank."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, conn: Connection, timeout_s: float) -> None:
    torch.set_num_threads(1)
    parent = os.getppid()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    conn.send(("ready", None))
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:  # the bench died without closing us
                os._exit(1)
            continue
        try:
            task = conn.recv()
        except EOFError:
            os._exit(1)
        if task is None:
            break
        fn, args = task
        try:
            conn.send(("ok", fn(dist.group.WORLD, *args)))
        except BaseException:  # report and keep serving; the parent decides
            conn.send(("err", traceback.format_exc()))
        torch.set_num_threads(1)
    dist.barrier()  # exiting without destroy aborts gloo processes now and then
    dist.destroy_process_group()
    conn.close()


class RankPool:
    """``world`` forked gloo ranks. `run` sends one task to every rank and returns the
    per-rank results in rank order."""

    def __init__(self, world: int, timeout_s: float = 600.0):
        ctx = mp.get_context("fork")
        port = _free_port()
        self.world, self.timeout_s = world, timeout_s
        self.procs: list[mp.Process] = []
        self.conns: list[Connection] = []
        for rank in range(world):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, world, port, child_end, timeout_s), daemon=True)
            proc.start()
            child_end.close()
            self.procs.append(proc)
            self.conns.append(parent_end)
        self._collect("start-up", 120.0)

    def _collect(self, what: str, timeout_s: float) -> list[Any]:
        replies: dict[int, tuple[str, Any]] = {}
        pending = {conn: rank for rank, conn in enumerate(self.conns)}
        while pending:
            ready = wait(list(pending), timeout=timeout_s)
            if not ready:
                break
            for conn in ready:
                rank = pending.pop(conn)
                try:
                    replies[rank] = conn.recv()
                except EOFError:
                    replies[rank] = ("err", f"rank {rank} died (exit code {self.procs[rank].exitcode})")
            if any(status == "err" for status, _ in replies.values()):
                timeout_s = min(timeout_s, 5.0)  # peers may be stuck in a collective
        if len(replies) == self.world and all(status in ("ok", "ready") for status, _ in replies.values()):
            return [replies[r][1] for r in range(self.world)]
        self.kill()
        lines = [f"--- rank {r}: {replies[r][1] if r in replies else 'no reply (timed out)'}"
                 for r in range(self.world) if r not in replies or replies[r][0] == "err"]
        raise RankFailure(f"{what} failed on a {self.world}-rank gloo group:\n" + "\n".join(lines))

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(group, *args)`` on every rank (``fn`` module-level, args picklable)."""
        for conn in self.conns:
            conn.send((fn, args))
        return self._collect(getattr(fn, "__name__", str(fn)), self.timeout_s)

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(30.0)
        self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5.0)
        for conn in self.conns:
            conn.close()


class RankPools:
    """One `RankPool` per group size, created on first use; a context manager closes them."""

    def __init__(self) -> None:
        self.pools: dict[int, RankPool] = {}

    def run(self, world: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
        pool = self.pools.get(world)
        if pool is None:
            pool = self.pools[world] = RankPool(world)
        try:
            return pool.run(fn, *args)
        except RankFailure:
            self.pools.pop(world, None)  # the pool is dead; a later call forks a fresh one
            raise

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()

    def __enter__(self) -> RankPools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
