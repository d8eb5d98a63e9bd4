"""Naming the peer behind a collective timeout.

A rank whose peer stops responding (hung, not dead) blocks in its next collective until the
group's timeout (``parallel.timeout_s``, `hyena_cp.distributed.mesh.init_parallel`), and gloo
then raises ``Timed out waiting 10000ms for recv operation to complete``, which names neither
the setting nor the peer. `Heartbeat` keeps each rank's current step on the job's key-value
store (the one the default group was created with: torchrun's rendezvous store): one small
``store.set`` per step, no collective, nothing to wait for. `Heartbeat.explain_timeouts`
turns a timeout raised inside it into a `PeerTimeoutError` naming the setting, the step, and
the ranks that had not started that step: the likely hung (or dead) peers. When every rank
has started it, the peer is stuck inside the step; ranks that time out mark themselves on
the store, so the message lists the ranks that had not (yet) done so.

On NCCL a timed-out collective is handled by the NCCL watchdog, which aborts the process
with its own message after the same timeout; the heartbeat keys are still on the store.
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

__all__ = ["Heartbeat", "PeerTimeoutError", "is_timeout"]

_TIMEOUT = re.compile(r"timed? ?out", re.IGNORECASE)  # gloo: "Timed out waiting 10000ms for recv ..."
_PREFIX = "hyena_cp/heartbeat"


class PeerTimeoutError(RuntimeError):
    """A collective waited ``parallel.timeout_s`` for a peer that never answered."""


def is_timeout(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) is a communication timeout."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RuntimeError) and _TIMEOUT.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _default_store() -> dist.Store | None:
    try:  # private, but the only handle on the store the default group was built on
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


class Heartbeat:
    """This rank's current step on the job's store, read back when a collective times out.

    Args:
        rank, world: this rank and the number of ranks of the job.
        timeout_s: the collective timeout (``parallel.timeout_s``), for the message.
    """

    def __init__(self, rank: int, world: int, timeout_s: float):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.store = _default_store() if world > 1 else None
        self.step, self.started = -1, time.perf_counter()
        self.beat(-1)

    def beat(self, step: int) -> None:
        """Record that this rank starts ``step`` (call it before the step's first collective)."""
        self.step, self.started = step, time.perf_counter()
        if self.store is not None:
            self.store.set(f"{_PREFIX}/{self.rank}", str(step))

    def _reports(self) -> dict[int, str]:
        """Every rank's last record (``"<step>"`` or ``"<step>:timeout"``) that the store holds."""
        out = {}
        try:
            for r in range(self.world):
                key = f"{_PREFIX}/{r}"
                if self.store.check([key]):
                    out[r] = self.store.get(key).decode()
        except (RuntimeError, dist.DistError):  # the store's host may be the dead peer
            pass
        return out

    def describe(self, error: BaseException) -> str:
        """The message of the `PeerTimeoutError` for ``error``, raised in step ``self.step``."""
        waited = time.perf_counter() - self.started
        head = (f"rank {self.rank}: a collective of step {self.step} did not complete within parallel.timeout_s="
                f"{self.timeout_s:g} s (the step had run {waited:.1f} s)")
        if self.store is None:
            return f"{head}; a peer is likely hung or dead. Backend error: {error}"
        self.store.set(f"{_PREFIX}/{self.rank}", f"{self.step}:timeout")
        reports = self._reports()
        steps = {r: int(v.split(":")[0]) for r, v in reports.items()}
        behind = sorted(r for r, s in steps.items() if s < self.step)
        if behind:
            last = ", ".join(f"rank {r} at step {steps[r]}" for r in behind)
            peers = f"ranks {behind}" if len(behind) > 1 else f"rank {behind[0]}"
            why = f"{peers} had not started step {self.step} ({last}): the likely hung (or dead) peer"
        else:
            quiet = sorted(r for r in range(self.world) if not reports.get(r, "").endswith(":timeout"))
            why = (f"every rank had started step {self.step}, so a peer is stuck inside it; ranks that have not "
                   f"reported a timeout of their own: {quiet}")
        return (f"{head}; {why}. torchrun --max-restarts=N restarts the job from the newest checkpoint. "
                f"Backend error: {error}")

    @contextmanager
    def explain_timeouts(self) -> Iterator[None]:
        """Re-raise a communication timeout as a `PeerTimeoutError` (see `describe`); others pass."""
        try:
            yield
        except Exception as e:
            if self.world == 1 or not is_timeout(e):
                raise
            raise PeerTimeoutError(self.describe(e)) from e
