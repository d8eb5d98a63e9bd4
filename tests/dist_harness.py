"""The ``dist_run`` fixture's runner: `hyena_cp.testing.local_pool` pools with test policy.

Workers are forked from the pytest process, which has already imported everything during
collection, once per world size, and reused by every test; see `hyena_cp.testing.local_pool`
for the mechanics. A rank error (or a dead worker, or a timeout) tears the pool down and
the next call forks a fresh one. The exception is ``expect_error`` runs in which every
rank raised before communicating data: the group is untouched, so the pool is kept. (The
cross-rank agreement check, `hyena_cp.parallel.agreement`, may have run: it is control
traffic, counted apart, and every rank took part in it.)
"""
from __future__ import annotations

from typing import Any, Callable

from hyena_cp.testing.local_pool import LocalPools, format_failures

# A dead peer must fail a collective in tests, not hang it for gloo's default 30 min.
GLOO_TIMEOUT_S = 60.0
# After one rank fails, the others get this long to report before the pool is killed.
ERROR_GRACE_S = 2.0


class RankError(AssertionError):
    """A rank raised: carries every failing rank's traceback."""


class DistRunner:
    """Callable behind the ``dist_run`` fixture; owns one pool per world size."""

    def __init__(self, timeout: float = 120.0):
        self.timeout = timeout
        self.pools = LocalPools(gloo_timeout_s=GLOO_TIMEOUT_S, error_grace_s=ERROR_GRACE_S)

    def __call__(
        self, fn: Callable, world_size: int, *args: Any,
        expect_error: type[BaseException] | None = None, **kwargs: Any,
    ) -> list:
        """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; per-rank results in rank order.

        ``fn`` must be a module-level function; it gets the group from
        ``torch.distributed.group.WORLD``. With ``expect_error=E`` every rank must raise an
        ``E`` without any `hyena_cp.parallel` data communication first (the agreement check,
        control traffic, may run); the exceptions are returned.
        """
        return self.run(fn, world_size, args, kwargs, expect_error=expect_error)

    def run(self, fn: Callable, world_size: int, args: tuple = (), kwargs: dict | None = None,
            expect_error: type[BaseException] | None = None, timeout: float | None = None) -> list:
        """`__call__` with explicit ``args``/``kwargs`` and a per-call result ``timeout`` (s)."""
        replies = self.pools.get(world_size).run(fn, args, kwargs or {}, timeout or self.timeout)
        if expect_error is None:
            if all(r.status == "ok" for r in replies):
                return [r.value for r in replies]
            self.pools.discard(world_size)
            raise RankError(f"{fn.__name__} failed on {world_size} ranks:\n{format_failures(replies)}")
        clean = all(s == "err" and isinstance(v[0], expect_error) and not calls for s, v, calls in replies)
        if clean:
            return [r.value[0] for r in replies]
        self.pools.discard(world_size)
        details = [
            f"rank {r}: {s}, communicated={dict(calls or {})}" + (f", raised {v[0]!r}" if s == "err" else "")
            for r, (s, v, calls) in enumerate(replies)
        ]
        raise AssertionError(
            f"expected every rank to raise {expect_error.__name__} before communicating:\n"
            + "\n".join(details) + "\n" + format_failures(replies)
        )

    def close(self) -> None:
        self.pools.close()
