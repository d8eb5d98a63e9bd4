"""Gloo rank groups for the multi-rank benchmark sections, started by the bench itself.

``python launch/bench.py`` stays one command (no torchrun): `RankPools` starts P worker
processes per group size on first use (from a fork server, see `hyena_cp.testing.local_pool`) (`hyena_cp.testing.local_pool` holds the
mechanics), each joins a gloo group on 127.0.0.1 and then runs tasks ``fn(group, *args)``
until closed. Pools are reused by every section; a failed task discards its pool and a
later call forks a fresh one.

This module only asks for process groups; every collective the benchmarks use goes
through `hyena_cp.parallel`.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from hyena_cp.testing.local_pool import LocalPools, format_failures

__all__ = ["RankPools", "RankFailure"]

# Benchmark steps at the largest sizes take minutes; the timeouts only catch a hung rank.
TIMEOUT_S = 600.0
START_TIMEOUT_S = 120.0
ERROR_GRACE_S = 5.0
# imported once by the fork server, inherited by every worker (megatron-core: ~5 s to import)
PRELOAD = ("hyena_cp.bench.preload",)


class RankFailure(RuntimeError):
    """A benchmark task failed (or timed out) on at least one rank."""


def _on_world(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(dist.group.WORLD, *args)


class RankPools:
    """One gloo rank pool per group size, created on first use; a context manager closes them."""

    def __init__(self) -> None:
        # c10's warnings level is read when torch is imported: set it for the fork server's (see
        # `measure._quiet_profiler`: the profiler warns once per call and rank otherwise)
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        # forkserver: sections time ranks with several threads, which a forked worker cannot use
        # safely once the bench process itself has run multi-threaded ops (see local_pool)
        self.pools = LocalPools(gloo_timeout_s=TIMEOUT_S, start_timeout_s=START_TIMEOUT_S,
                                error_grace_s=ERROR_GRACE_S, start_method="forkserver", preload=PRELOAD)

    def run(self, world: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(group, *args)`` on every rank of a ``world``-rank group (``fn`` module-level,
        args picklable); the per-rank results in rank order."""
        try:
            pool = self.pools.get(world)
        except RuntimeError as exc:
            raise RankFailure(str(exc)) from exc
        replies = pool.run(_on_world, (fn, *args), {}, TIMEOUT_S)
        if all(r.status == "ok" for r in replies):
            return [r.value for r in replies]
        self.pools.discard(world)
        name = getattr(fn, "__name__", str(fn))
        raise RankFailure(f"{name} failed on a {world}-rank gloo group:\n{format_failures(replies)}")

    def close(self) -> None:
        self.pools.close()

    def __enter__(self) -> RankPools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
