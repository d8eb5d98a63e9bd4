"""Data-parallel x context-parallel process groups for training (torchtitan's `ParallelDims`).

Rank order is Megatron's for ``tensor_model_parallel_size=1`` (order ``tp-cp-ep-dp-pp``): the
CP ranks of one data-parallel replica are consecutive, ``global_rank = dp_rank * cp + cp_rank``.
So a CP group sits inside one node whenever ``cp`` divides the GPUs per node (CP is the
chattier dimension) and both group builders below produce the same groups.

Groups handed to the rest of the code follow the package convention: a dimension of size 1
gets ``None`` (one process, no communication). Gradients are reduced over ``grad_group``
(all ``dp * cp`` ranks): a SUM over it divided by ``dp`` is "sum over CP, average over DP".
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .comm_stats import record

__all__ = ["ParallelDims", "ParallelGroups", "init_parallel", "destroy_parallel", "barrier", "broadcast_int",
           "pick_backend"]


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the ``dp x cp`` mesh; ``dp * cp == world`` is checked here, before any group exists."""

    world: int
    cp: int

    def __post_init__(self) -> None:
        if self.world < 1:
            raise ValueError(f"world size must be >= 1, got world={self.world}")
        if self.cp < 1 or self.world % self.cp:
            raise ValueError(f"parallel.cp={self.cp} must be >= 1 and divide the world size {self.world} "
                             f"(dp * cp == world); launch a multiple of {self.cp} processes or change parallel.cp")

    @property
    def dp(self) -> int:
        return self.world // self.cp

    def coords(self, rank: int) -> tuple[int, int]:
        """``(dp_rank, cp_rank)`` of a global rank."""
        return divmod(rank, self.cp)


@dataclass
class ParallelGroups:
    """This rank's place in the mesh and its groups (``None`` where the dimension has size 1)."""

    dims: ParallelDims
    rank: int
    dp_rank: int
    cp_rank: int
    cp_group: ProcessGroup | None
    dp_group: ProcessGroup | None
    grad_group: ProcessGroup | None
    device: torch.device
    owns_default_group: bool = False  # created the default group here, so destroy it at the end
    megatron: bool = False
    created: tuple[ProcessGroup, ...] = ()  # subgroups built by `init_parallel`, destroyed with it


def pick_backend(backend: str) -> str:
    """``"auto"``: NCCL when CUDA is available, else gloo; anything else passes through."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"parallel.backend={backend!r} must be 'auto', 'gloo' or 'nccl'")
    return backend


def _attempt_store(timeout: timedelta) -> dist.Store:
    """torchrun's rendezvous store, with keys private to this attempt of the job.

    torchrun (2.x) keeps ONE shared TCPStore for all restarts and its workers use it without
    a per-attempt prefix, so after ``--max-restarts`` relaunches the workers, gloo can read
    a dead worker's address left by the previous attempt ("Connection refused" in
    connectFullMesh). Prefixing every key with the restart count gives each attempt a clean
    key space (all ranks of an attempt share the count)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_hosts, timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"hyena_cp/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def _default_group(backend: str, timeout_s: float) -> bool:
    """Initialise the default group from torchrun's env (a single process needs no env at all).

    The finite timeout makes a collective with a dead peer raise instead of hanging, so
    torchrun can restart the job. Returns whether this call created the group."""
    if dist.is_initialized():
        return False
    timeout = timedelta(seconds=timeout_s)
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:  # torchrun (also under srun)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=_attempt_store(timeout), rank=rank, world_size=world, timeout=timeout)
    elif "RANK" in os.environ:  # another launcher that sets the env:// variables
        dist.init_process_group(backend, timeout=timeout)
    else:  # plain `python launch/train.py`: a world of one, no port needed
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return True


def _torch_groups(dims: ParallelDims) -> tuple[ProcessGroup | None, ProcessGroup | None, tuple[ProcessGroup, ...]]:
    """CP and DP groups with `new_group` (every rank creates every group, in the same order)."""
    rank, created = dist.get_rank(), []
    cp_group = dp_group = None
    if dims.cp > 1:
        for dp_rank in range(dims.dp):
            group = dist.new_group(list(range(dp_rank * dims.cp, (dp_rank + 1) * dims.cp)))
            created.append(group)
            cp_group = group if dims.coords(rank)[0] == dp_rank else cp_group
    if dims.dp > 1:
        for cp_rank in range(dims.cp):
            group = dist.new_group(list(range(cp_rank, dims.world, dims.cp)))
            created.append(group)
            dp_group = group if dims.coords(rank)[1] == cp_rank else dp_group
    return cp_group, dp_group, tuple(created)


def _megatron_groups(dims: ParallelDims) -> tuple[ProcessGroup | None, ProcessGroup | None]:
    """CP and DP groups from megatron-core's ``parallel_state`` (models built with megatron-core
    read their CP group there). Imported here, not at module level, so `hyena_cp` imports
    without megatron-core and runs that do not need it skip its ~6 s import."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=dims.cp)
    cp_group = parallel_state.get_context_parallel_group() if dims.cp > 1 else None
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=False) if dims.dp > 1 else None
    return cp_group, dp_group


def init_parallel(cp: int, *, backend: str = "auto", timeout_s: float = 300.0,
                  megatron: bool = False) -> ParallelGroups:
    """Create (or join) the default group and the ``dp x cp`` groups; every rank calls this.

    Args:
        cp: context-parallel size; ``dp = world // cp``.
        backend: "auto" (NCCL on GPU, gloo on CPU), "gloo" or "nccl"; used only when the
            default group does not exist yet (under torchrun it does not; in tests it may).
        timeout_s: collective timeout of the default group.
        megatron: build the groups with megatron-core's ``parallel_state`` instead of `new_group`.
    """
    if cp < 1:
        raise ValueError(f"parallel.cp={cp} must be >= 1")
    backend = pick_backend(backend)
    owns = _default_group(backend, timeout_s)
    try:
        dims = ParallelDims(world=dist.get_world_size(), cp=cp)  # raises on every rank alike
    except ValueError:
        if owns:
            dist.destroy_process_group()
        raise
    rank = dist.get_rank()
    dp_rank, cp_rank = dims.coords(rank)
    if megatron:
        (cp_group, dp_group), created = _megatron_groups(dims), ()
    else:
        cp_group, dp_group, created = _torch_groups(dims)
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return ParallelGroups(dims=dims, rank=rank, dp_rank=dp_rank, cp_rank=cp_rank, cp_group=cp_group,
                          dp_group=dp_group, grad_group=dist.group.WORLD if dims.world > 1 else None,
                          device=device, owns_default_group=owns, megatron=megatron, created=created)


def destroy_parallel(groups: ParallelGroups, clean: bool = True) -> None:
    """Tear down what `init_parallel` created; the default group only if it created it.

    ``clean``: all ranks got here together, so end with a barrier before destroying the
    default group (exiting without ``destroy_process_group`` aborts gloo processes in a good
    share of runs); False after an error, when peers may be gone and a barrier would wait."""
    if groups.megatron:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    for group in groups.created:
        dist.destroy_process_group(group)
    if groups.owns_default_group:
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def barrier(groups: ParallelGroups) -> None:
    """Wait for every rank of the job (no-op for one process)."""
    if groups.dims.world > 1:
        dist.barrier()
        record("barrier", 0)


def broadcast_int(value: int, groups: ParallelGroups) -> int:
    """Global rank 0's ``value`` on every rank, so a decision read from files (which checkpoint
    to resume) is the same everywhere even if ranks see the file system at different times."""
    if groups.dims.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=groups.device)
    dist.broadcast(t, src=0)
    record("broadcast", t.element_size() * (groups.dims.world - 1) if groups.rank == 0 else 0)
    return int(t.item())
