"""Byte accounting for the collectives in `hyena_cp.parallel`.

Every communicating wrapper (forward and backward) calls `record(op, nbytes)` once per
collective with the bytes THIS rank sends to OTHER ranks under the conventions below.
Single-process calls (group ``None`` or size 1) communicate nothing and record nothing.
The numbers are a model of the traffic, fixed so tests can predict them exactly; they are
not a measurement of what gloo/NCCL put on the wire.

Conventions (P = group size, ``nbytes`` = bytes of the tensor named):

- ``"all_to_all"`` (equal splits): ``nbytes(input) * (P-1) / P`` -- the block addressed to
  this rank itself stays local.
- ``"p2p"`` (halo / point-to-point): the payload of every send to another rank; local
  copies (e.g. the last rank's own zigzag chunk) are free.
- ``"all_reduce"``: ring all-reduce, ``2 * (P-1) * nbytes // P`` (reduce-scatter then
  all-gather, each sending (P-1)/P of the tensor).
- ``"all_gather"``: ``(P-1) * nbytes(local piece)`` (ring: forward P-1 pieces).
- ``"reduce_scatter"``: ``(P-1) * nbytes(local output piece)`` (ring).
- ``"broadcast"``: flat tree; the source records ``(P-1) * nbytes``, the others 0.
- ``"reduce"``: flat tree; every rank but the destination records ``nbytes``.

A rank that records 0 bytes still counts a call, so ``calls`` is the same on every rank.

Control traffic (``record(..., control=True)``: the cross-rank agreement check of
`hyena_cp.parallel.agreement`, a few hundred bytes per call) is counted apart, in
``control_bytes`` / ``control_calls``, so ``bytes_sent``, ``by_op`` and ``calls`` stay the data
traffic of the operators, which the tests hold to the communication floor.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor


@dataclass(eq=False)  # identity semantics: count_comm removes exactly its own counter
class CommStats:
    """Bytes this rank sent to other ranks, in total and per op, plus call counts per op;
    control traffic apart (see the module docstring)."""

    bytes_sent: int = 0
    by_op: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    control_bytes: int = 0
    control_calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, op: str, nbytes: int, control: bool = False) -> None:
        if control:
            self.control_bytes += nbytes
            self.control_calls[op] += 1
            return
        self.bytes_sent += nbytes
        self.by_op[op] += nbytes
        self.calls[op] += 1


# A process-wide stack rather than thread-local state: autograd may run backward on a
# worker thread, and backward traffic inside a `count_comm()` block must still be counted.
_ACTIVE: list[CommStats] = []


@contextmanager
def count_comm() -> Iterator[CommStats]:
    """Count communication inside the ``with`` block; nested counters all see the traffic."""
    stats = CommStats()
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE.remove(stats)


def record(op: str, nbytes: int, *, control: bool = False) -> None:
    """Add one ``op`` call sending ``nbytes`` from this rank to every active counter
    (``control``: to its control counts)."""
    for stats in _ACTIVE:
        stats.add(op, int(nbytes), control)


def nbytes(x: Tensor) -> int:
    """Size of ``x``'s data in bytes."""
    return x.numel() * x.element_size()
