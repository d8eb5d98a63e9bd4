"""The run's ``dp x cp x tp`` DeviceMesh (torchtitan's `ParallelDims`), and who owns which group.

Rank order is megatron-core's (order ``tp-cp-ep-dp-pp``): tp innermost, then cp, then dp::

    global_rank = dp_rank * (cp * tp) + cp_rank * tp + tp_rank

so a TP group (the chattiest dimension: an all-reduce per layer) is consecutive ranks and,
with ``cp * tp`` dividing the GPUs per node, a whole CP x TP block sits inside one node. The
mesh is ``init_device_mesh(device, (dp, cp, tp), mesh_dim_names=("dp", "cp", "tp"))`` plus
the flattened ``dp_cp`` dimension (torchtitan's ``dp_shard_cp``): row-major over the names,
which is exactly the formula above.

Group ownership (one object per job, no group is built by hand):

- **The mesh** (`ParallelGroups.mesh`) owns every group this package uses: ``dp_cp`` (FSDP2 /
  replicate shard and reduce over it, `hyena_cp.distributed.fsdp`; loss and metric sums), ``cp``
  (the ViT-5 nets' ``cp_group``, the data path's zigzag/row shards), ``dp`` (metrics summed
  over replicas) and ``tp`` (the TP-aware grad norm; checkpoints place TP shards on it). The
  megatron-core models of a run are built on these same groups too
  (`hyena_cp.megatron.groups.mesh_pg_collection`, passed by `hyena_cp.train.build_model`).
- **megatron-core's ``parallel_state``** (``parallel.megatron=true``) keeps TP, CP and DP groups
  of its own, for megatron modules built WITHOUT groups (which read them there; what in
  megatron-core 0.16 does so: `hyena_cp.megatron.compat`). megatron cannot adopt the mesh's
  groups, so `init_parallel` initialises it with the same sizes and checks, on every rank, that
  each of its groups holds the same ranks as the mesh's (a ``RuntimeError`` if a megatron
  version ever orders ranks differently); tests hold both to the formula above.

The dp x tp x cp invariant, and how the groups meet it:

- the TP ranks of one (dp, cp) position hold the same data, different shards of the
  TP-sharded parameters (megatron's ``tensor_model_parallel`` attributes, see `tp_layout`)
  and identical copies of the others, and compute the same loss;
- gradients are SUMMED over CP and AVERAGED over DP for each TP shard, never reduced over
  TP (a replicated parameter already gets the whole gradient on every TP rank from the TP
  layers' own backward all-reduces): FSDP averages over ``dp_cp`` (this rank's ``tp_rank``'s
  ``dp * cp`` ranks) the gradients of ``cp x`` each rank's loss share (`fsdp.loss_scale`);
- the loss and evaluation sums run over ``dp_cp`` too (summing over TP as well would count
  every token ``tp`` times).

Groups handed to the rest of the code follow the package convention: a dimension of size 1
gets ``None`` (one process, no communication).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hyena_cp.parallel.comm_stats import record

__all__ = ["DIMS", "ParallelDims", "ParallelGroups", "init_parallel", "destroy_parallel", "barrier",
           "broadcast_int", "pick_backend"]

DIMS = ("dp", "cp", "tp")  # outermost first: the mesh's dimension order and `ParallelDims.coords`'


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

    @property
    def shape(self) -> tuple[int, int, int]:
        """Mesh shape in `DIMS` order."""
        return self.dp, self.cp, self.tp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(dp_rank, cp_rank, tp_rank)`` of a global rank."""
        dp_rank, rest = divmod(rank, self.cp * self.tp)
        return (dp_rank, *divmod(rest, self.tp))

    def rank(self, dp_rank: int, cp_rank: int, tp_rank: int) -> int:
        """Global rank of mesh coordinates (inverse of `coords`)."""
        return dp_rank * (self.cp * self.tp) + cp_rank * self.tp + tp_rank


@dataclass
class ParallelGroups:
    """This rank's place in the run's mesh and the groups of its dimensions.

    ``mesh``: the 3-D ``("dp", "cp", "tp")`` DeviceMesh; ``dp_cp_mesh``: its flattened ``dp x cp``
    dimension (kept here: torch deprecates slicing flattened dimensions from the root mesh).
    Group properties are ``None`` where the dimension has size 1; ``grad_group`` is the
    ``dp_cp`` group (the ``dp * cp`` ranks sharing this ``tp_rank``: gradient, loss and
    metric sums)."""

    dims: ParallelDims
    rank: int
    mesh: DeviceMesh
    dp_cp_mesh: DeviceMesh  # the 1-D mesh FSDP shards over (size dp * cp, this rank's TP shard)
    device: torch.device
    owns_default_group: bool = False  # created the default group here, so destroy it at the end
    megatron: bool = False  # megatron-core's parallel_state was initialised (and is destroyed) here

    @property
    def dp_rank(self) -> int:
        return self.dims.coords(self.rank)[0]

    @property
    def cp_rank(self) -> int:
        return self.dims.coords(self.rank)[1]

    @property
    def tp_rank(self) -> int:
        return self.dims.coords(self.rank)[2]

    def submesh(self, dim: str) -> DeviceMesh:
        """The 1-D mesh of dimension ``dim`` (``"dp"``, ``"cp"``, ``"tp"`` or ``"dp_cp"``) through this rank."""
        return self.dp_cp_mesh if dim == "dp_cp" else self.mesh[dim]

    def group(self, dim: str) -> ProcessGroup | None:
        """The group of mesh dimension ``dim`` (see `submesh`), None for size 1."""
        sub = self.submesh(dim)
        return sub.get_group() if sub.size() > 1 else None

    @cached_property
    def cp_group(self) -> ProcessGroup | None:
        return self.group("cp")

    @cached_property
    def dp_group(self) -> ProcessGroup | None:
        return self.group("dp")

    @cached_property
    def tp_group(self) -> ProcessGroup | None:
        return self.group("tp")

    @cached_property
    def world_group(self) -> ProcessGroup | None:
        """Every rank of the job (None for one process)."""
        return dist.group.WORLD if self.dims.world > 1 else None

    @cached_property
    def grad_group(self) -> ProcessGroup | None:
        return self.group("dp_cp")

    @cached_property
    def tp_mesh(self) -> DeviceMesh | None:
        """The 1-D TP mesh (None when tp == 1), on which checkpoints place TP shards."""
        return self.mesh["tp"] if self.dims.tp > 1 else None

    @cached_property
    def tp_dp_cp_mesh(self) -> DeviceMesh | None:
        """The ``(tp, dp_cp)`` mesh, TP first (None when tp == 1): checkpoints place an FSDP shard
        of a TP shard on it, TP's cut before FSDP's. The mesh's own groups, no new ones (a
        DeviceMesh slice must keep the parent's dimension order, so this one is assembled)."""
        if self.dims.tp == 1:
            return None
        tp, dp_cp = self.mesh["tp"], self.dp_cp_mesh
        ranks = torch.arange(self.dims.world).view(self.dims.dp * self.dims.cp, self.dims.tp).T  # [tp, dp_cp]
        return DeviceMesh.from_group([tp.get_group(), dp_cp.get_group()], self.device.type, mesh=ranks,
                                     mesh_dim_names=("tp", "dp_cp"))


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


# One mesh per (default group, device, shape), reused by every `init_parallel` of the process
# and destroyed with the default group. DTensor caches its sharding decisions keyed by mesh
# EQUALITY (layout and names, not groups), so a later mesh of the same layout can be handed an
# earlier one's groups: those must stay alive. (Test pools call `init_parallel` hundreds of
# times; without the cache each call would also leak its groups.)
_MESHES: dict[tuple[int, str, tuple[int, int, int]], tuple[DeviceMesh, DeviceMesh]] = {}


def cached_mesh_groups() -> set[ProcessGroup]:
    """The process groups of the cached run meshes (see `_MESHES`): they outlive any one
    `init_parallel`, so whoever cleans up groups a task left behind (the test pools) keeps them."""
    kept: set[ProcessGroup] = set()
    for mesh, dp_cp in _MESHES.values():
        kept.update(mesh.get_all_groups())
        kept.add(dp_cp.get_group())
    return kept


def _run_mesh(device: torch.device, dims: ParallelDims, timeout: timedelta | None) -> tuple[DeviceMesh, DeviceMesh]:
    """The ``("dp", "cp", "tp")`` mesh and its flattened ``dp_cp`` dimension (collective on first use).

    ``timeout``: given to every group of the mesh on creation. DeviceMesh builds the groups
    that do not span the whole job with ``new_group``'s default timeout (30 min on gloo, not
    the default group's), so without it a hung peer in a CP or FSDP collective of a
    ``dp > 1`` run would stall the job for half an hour instead of ``parallel.timeout_s``."""
    key = (id(dist.group.WORLD), device.type, dims.shape)
    if key not in _MESHES:
        mesh = init_device_mesh(device.type, dims.shape, mesh_dim_names=DIMS)
        dp_cp = mesh["dp", "cp"]._flatten("dp_cp")  # torchtitan's name for the FSDP dimension
        if timeout is not None:
            for group in {*mesh.get_all_groups(), dp_cp.get_group()} - {dist.group.WORLD}:
                dist.distributed_c10d._set_pg_timeout(timeout, group)  # private; public from no release yet
        _MESHES[key] = mesh, dp_cp
    return _MESHES[key]


def _init_megatron(dims: ParallelDims, groups: ParallelGroups, timeout: timedelta | None) -> None:
    """Initialise megatron-core's ``parallel_state`` (megatron modules built without groups read
    theirs there) and check that its groups hold the mesh's ranks. Imported here, not at module level, so
    `hyena_cp` imports without megatron-core and runs that do not need it skip its ~6 s import."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=dims.tp, context_parallel_size=dims.cp)
    theirs = {"tp": ps.get_tensor_model_parallel_group(), "cp": ps.get_context_parallel_group(),
              "dp": ps.get_data_parallel_group(with_context_parallel=False),
              "dp_cp": ps.get_data_parallel_group(with_context_parallel=True)}
    for dim, group in theirs.items():
        if timeout is not None and group is not dist.group.WORLD:  # megatron's own default: 30 min (`_run_mesh`)
            dist.distributed_c10d._set_pg_timeout(timeout, group)
        ours = dist.get_process_group_ranks(groups.submesh(dim).get_group())
        if dist.get_process_group_ranks(group) != ours:  # the same on every rank: all raise alike
            ps.destroy_model_parallel()
            raise RuntimeError(f"megatron-core's {dim} group {dist.get_process_group_ranks(group)} differs from the "
                               f"DeviceMesh's {ours}: megatron's rank order is not tp-cp-dp")


def init_parallel(cp: int, *, tp: int = 1, backend: str = "auto", timeout_s: float = 300.0,
                  megatron: bool = False) -> ParallelGroups:
    """Create (or join) the default group and the run's ``dp x cp x tp`` mesh; every rank calls this.

    Args:
        cp: context-parallel size.
        tp: tensor-parallel size; ``dp = world // (cp * tp)``.
        backend: "auto" (NCCL on GPU, gloo on CPU), "gloo" or "nccl"; used only when the
            default group does not exist yet (under torchrun it does not; in tests it may).
        timeout_s: collective timeout of the default group and (when this call creates the default
            group) of every group of the mesh.
        megatron: also initialise megatron-core's ``parallel_state`` (same sizes; its groups
            are checked against the mesh's), for megatron modules built without groups; a
            model built with ``hyena_cp.megatron.groups.mesh_pg_collection(groups)`` does not
            need it.
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
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if owns:
        _MESHES.clear()  # meshes of an earlier default group
    timeout = timedelta(seconds=timeout_s) if owns else None
    mesh, dp_cp = _run_mesh(device, dims, timeout)
    groups = ParallelGroups(dims=dims, rank=dist.get_rank(), mesh=mesh, dp_cp_mesh=dp_cp, device=device,
                            owns_default_group=owns)
    if megatron:
        _init_megatron(dims, groups, timeout)
        groups.megatron = True
    return groups


def destroy_parallel(groups: ParallelGroups, clean: bool = True) -> None:
    """Tear down what `init_parallel` created: megatron's ``parallel_state``, and the default group
    (with the mesh's groups) only if it created it; otherwise the mesh stays for the next call.

    ``clean``: all ranks got here together, so end with a barrier before destroying the
    default group (exiting without ``destroy_process_group`` aborts gloo processes in a good
    share of runs); False after an error, when peers may be gone and a barrier would wait."""
    if groups.megatron:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    if groups.owns_default_group:
        if clean:
            dist.barrier()
        _MESHES.clear()
        dist.destroy_process_group()  # every group, the mesh's too


def exit_process(code: int = 0) -> None:
    """End a launcher's process with exit status ``code``, after `destroy_parallel`.

    Under torchrun (``WORLD_SIZE`` > 1) the process flushes its streams and logging, then leaves with
    ``os._exit``: a normal interpreter exit runs C++ static destructors that abort a gloo worker in a
    share of runs ("terminate called without an active exception" after all work is done and the
    process group is destroyed; about 1 run in 10 of ``launch/cp_example.py`` with torch 2.13 on CPU),
    and torchrun then reports the finished job as failed. Launchers write their files inside ``with``
    blocks (closed before this call), so only those destructors are skipped. One process exits normally."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


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
