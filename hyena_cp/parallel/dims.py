"""Data x context x tensor parallel process groups for training (torchtitan's `ParallelDims`).

Rank order is megatron-core's (order ``tp-cp-ep-dp-pp``): tp innermost, then cp, then dp::

    global_rank = dp_rank * (cp * tp) + cp_rank * tp + tp_rank

so a TP group (the chattiest dimension: an all-reduce per layer) is consecutive ranks and,
with ``cp * tp`` dividing the GPUs per node, a whole CP x TP block sits inside one node.
Both group builders below (`new_group`, or megatron-core's ``parallel_state``, which
megatron-core models read their groups from) produce the same groups; a test holds them to
this formula.

The dp x tp x cp invariant, and how the groups meet it:

- the TP ranks of one (dp, cp) position hold the same data, different shards of the
  TP-sharded parameters (megatron's ``tensor_model_parallel`` attributes, see `tp_layout`)
  and identical copies of the others, and compute the same loss;
- gradients are SUMMED over CP and AVERAGED over DP for each TP shard, never reduced over
  TP (a replicated parameter already gets the whole gradient on every TP rank from the TP
  layers' own backward all-reduces). ``grad_group`` is therefore the ``dp * cp`` ranks that
  share this rank's ``tp_rank`` (megatron's ``get_data_parallel_group(with_context_parallel=
  True)``): a SUM over it divided by ``dp`` is "sum over CP, average over DP";
- the loss and evaluation sums run over the same ``grad_group`` (summing over TP as well
  would count every token ``tp`` times).

Groups handed to the rest of the code follow the package convention: a dimension of size 1
gets ``None`` (one process, no communication). Issue #11 (FSDP2) will build these groups as
one ``DeviceMesh``; for now only the TP group gets a 1-D mesh (``tp_mesh``), which the
checkpoints use to store TP shards as DTensors.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from .comm_stats import record

__all__ = ["ParallelDims", "ParallelGroups", "init_parallel", "destroy_parallel", "barrier", "broadcast_int",
           "pick_backend"]

DIMS = ("dp", "cp", "tp")  # outermost first: the order of `ParallelDims.coords`


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the ``dp x cp x tp`` mesh; ``dp * cp * tp == world`` is checked here, before any
    group exists (every rank computes the same sizes, so every rank raises alike)."""

    world: int
    cp: int
    tp: int = 1

    def __post_init__(self) -> None:
        if self.world < 1:
            raise ValueError(f"world size must be >= 1, got world={self.world}")
        for name in ("cp", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        block = self.cp * self.tp
        if self.world % block:
            raise ValueError(f"parallel.cp={self.cp} x parallel.tp={self.tp} = {block} must divide the world size "
                             f"{self.world} (dp * cp * tp == world); launch a multiple of {block} processes or "
                             f"change parallel.cp / parallel.tp")

    @property
    def dp(self) -> int:
        return self.world // (self.cp * self.tp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(dp_rank, cp_rank, tp_rank)`` of a global rank."""
        dp_rank, rest = divmod(rank, self.cp * self.tp)
        return (dp_rank, *divmod(rest, self.tp))

    def rank(self, dp_rank: int, cp_rank: int, tp_rank: int) -> int:
        """Global rank of mesh coordinates (inverse of `coords`)."""
        return dp_rank * (self.cp * self.tp) + cp_rank * self.tp + tp_rank

    def rank_groups(self, dims: Sequence[str]) -> list[list[int]]:
        """Every group of ranks that differ only along ``dims`` (names from ``("dp", "cp", "tp")``),
        each in ascending rank order, listed in ascending order of their first rank."""
        if not set(dims) <= set(DIMS):
            raise ValueError(f"mesh dimensions {list(dims)} must be among {list(DIMS)}")
        fixed = [i for i, name in enumerate(DIMS) if name not in dims]
        groups: dict[tuple[int, ...], list[int]] = {}
        for rank in range(self.world):
            coords = self.coords(rank)
            groups.setdefault(tuple(coords[i] for i in fixed), []).append(rank)
        return sorted(groups.values())


@dataclass
class ParallelGroups:
    """This rank's place in the mesh and its groups (``None`` where the dimension has size 1).

    ``grad_group``: the ``dp * cp`` ranks sharing this ``tp_rank`` (gradient, loss and metric
    sums). ``tp_mesh``: a 1-D ``DeviceMesh`` over ``tp_group`` (None when tp == 1)."""

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
    tp_rank: int = 0
    tp_group: ProcessGroup | None = None
    tp_mesh: DeviceMesh | None = None


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


class _Built(NamedTuple):
    """This rank's groups, ``None`` for size 1; ``created``: what `destroy_parallel` destroys."""

    tp: ProcessGroup | None
    cp: ProcessGroup | None
    dp: ProcessGroup | None
    grad: ProcessGroup | None
    created: tuple[ProcessGroup, ...] = ()


def _torch_groups(dims: ParallelDims) -> _Built:
    """The groups with `new_group`: every rank creates every group, in the same order."""
    rank, created, mine = dist.get_rank(), [], {}
    for name, along in (("tp", ("tp",)), ("cp", ("cp",)), ("dp", ("dp",)), ("grad", ("dp", "cp"))):
        if name == "grad" and dims.tp == 1:
            mine[name] = dist.group.WORLD if dims.world > 1 else None  # dp x cp is everyone
            continue
        mine[name] = None
        for ranks in dims.rank_groups(along):
            if len(ranks) == 1:
                break  # all groups along this dimension have size 1
            group = dist.new_group(ranks)
            created.append(group)
            if rank in ranks:
                mine[name] = group
    return _Built(**mine, created=tuple(created))


def _megatron_groups(dims: ParallelDims) -> _Built:
    """The groups from megatron-core's ``parallel_state`` (megatron-core models read their TP
    and CP groups there). Imported here, not at module level, so `hyena_cp` imports without
    megatron-core and runs that do not need it skip its ~6 s import."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=dims.tp, context_parallel_size=dims.cp)

    def sized(group: ProcessGroup) -> ProcessGroup | None:
        return group if group.size() > 1 else None

    return _Built(tp=sized(ps.get_tensor_model_parallel_group()), cp=sized(ps.get_context_parallel_group()),
                  dp=sized(ps.get_data_parallel_group(with_context_parallel=False)),
                  grad=sized(ps.get_data_parallel_group(with_context_parallel=True)))


def init_parallel(cp: int, *, tp: int = 1, backend: str = "auto", timeout_s: float = 300.0,
                  megatron: bool = False) -> ParallelGroups:
    """Create (or join) the default group and the ``dp x cp x tp`` groups; every rank calls this.

    Args:
        cp: context-parallel size.
        tp: tensor-parallel size; ``dp = world // (cp * tp)``.
        backend: "auto" (NCCL on GPU, gloo on CPU), "gloo" or "nccl"; used only when the
            default group does not exist yet (under torchrun it does not; in tests it may).
        timeout_s: collective timeout of the default group.
        megatron: build the groups with megatron-core's ``parallel_state`` instead of `new_group`.
    """
    for name, size in (("cp", cp), ("tp", tp)):
        if size < 1:
            raise ValueError(f"parallel.{name}={size} must be >= 1")
    backend = pick_backend(backend)
    owns = _default_group(backend, timeout_s)
    try:
        dims = ParallelDims(world=dist.get_world_size(), cp=cp, tp=tp)  # raises on every rank alike
    except ValueError:
        if owns:
            dist.destroy_process_group()
        raise
    rank = dist.get_rank()
    dp_rank, cp_rank, tp_rank = dims.coords(rank)
    built = _megatron_groups(dims) if megatron else _torch_groups(dims)
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    tp_mesh = None if built.tp is None else DeviceMesh.from_group(built.tp, device.type, mesh_dim_names=("tp",))
    return ParallelGroups(dims=dims, rank=rank, dp_rank=dp_rank, cp_rank=cp_rank, cp_group=built.cp,
                          dp_group=built.dp, grad_group=built.grad, device=device, owns_default_group=owns,
                          megatron=megatron, created=built.created, tp_rank=tp_rank, tp_group=built.tp,
                          tp_mesh=tp_mesh)


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
