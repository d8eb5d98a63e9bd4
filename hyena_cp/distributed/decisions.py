"""Job-wide decisions: every rank takes the same branch, so none waits in a collective that the
others skipped (a hang until ``parallel.timeout_s``).

- `any_rank`: a flag that is true on some rank becomes true on all (a non-finite loss seen on
  one rank stops, or skips, the step everywhere).
- `broadcast_text`: global rank 0's text on every rank (a decision read from files on rank 0,
  e.g. which checkpoint verified, together with its warnings and errors).

One process: the identity, no communication.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from hyena_cp.parallel.comm_stats import nbytes, record
from .mesh import ParallelGroups

__all__ = ["any_rank", "broadcast_text"]


def any_rank(flag: bool, groups: ParallelGroups) -> bool:
    """Whether ``flag`` is true on any rank of the job, the same on every rank (collective)."""
    world = groups.dims.world
    if world == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=groups.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    record("all_reduce", 2 * (world - 1) * nbytes(t) // world)
    return bool(t.item())


def broadcast_text(text: str, groups: ParallelGroups) -> str:
    """Global rank 0's ``text`` on every rank (collective; the other ranks' ``text`` is ignored)."""
    world = groups.dims.world
    if world == 1:
        return text
    data = text.encode("utf-8") if groups.rank == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=groups.device)
    dist.broadcast(size, src=0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=groups.device)
    if buf.numel():  # "" is a decision too (e.g. "nothing went wrong"): its size says it all
        if groups.rank == 0:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, src=0)
    sent = (world - 1) * (nbytes(size) + nbytes(buf)) if groups.rank == 0 else 0
    record("broadcast", sent)
    return bytes(buf.cpu().tolist()).decode("utf-8")
