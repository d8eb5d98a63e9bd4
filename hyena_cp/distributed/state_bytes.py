"""Bytes of parameters, gradients and optimizer state one rank holds (what FSDP shards).

Counted from the storages of the local tensors (a ``DTensor``'s local shard; each storage
once, so FSDP's padded shards and gradients that are views of one buffer count as what is
allocated), next to the bytes the same tensors take whole (a ``DTensor``'s global shape: one
TP rank's full tensors), which is what every rank holds when data parallelism replicates them.
Activations and buffers are not included.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor

from hyena_cp.parallel.comm_stats import nbytes, record
from hyena_cp.parallel.groups import group_size

__all__ = ["StateBytes", "max_over_ranks", "state_bytes"]


@dataclass(frozen=True)
class StateBytes:
    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _bytes(tensors: Iterable[Tensor]) -> tuple[int, int]:
    """(allocated bytes of the local storages, each once; bytes of the whole tensors)."""
    storages: dict[int, int] = {}
    whole = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        whole += t.numel() * t.element_size()
    return sum(storages.values()), whole


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[StateBytes, StateBytes]:
    """``(this rank's bytes, the replicated layout's bytes)`` of parameters, gradients (those
    that exist now) and optimizer state tensors. No communication."""
    params = list(model.parameters())
    p_local, p_whole = _bytes(params)
    g_local, g_whole = _bytes(p.grad for p in params if p.grad is not None)
    state = [v for entries in optimizer.state.values() for v in entries.values() if isinstance(v, Tensor)]
    o_local, o_whole = _bytes(state)
    return StateBytes(p_local, g_local, o_local), StateBytes(p_whole, g_whole, o_whole)


def max_over_ranks(value: StateBytes, group: ProcessGroup | None,
                   device: torch.device | str = "cpu") -> StateBytes:
    """The per-field maximum over ``group`` (the fullest rank decides what fits); every rank
    of the group must call it. ``None``: ``value`` itself."""
    world = group_size(group)
    if world == 1:
        return value
    t = torch.tensor([value.params, value.grads, value.optimizer], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    record("all_reduce", 2 * (world - 1) * nbytes(t) // world)
    return StateBytes(*(int(x) for x in t))
