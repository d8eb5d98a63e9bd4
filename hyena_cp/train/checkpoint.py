"""Atomic, pickle-free training checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout under ``root`` (a folder every rank can reach, e.g. ``<output_dir>/checkpoints``)::

    step_00000040/      complete checkpoint: DCP shards + .metadata + meta.json
    step_00000050.tmp/  being written, or left by a crash: never read, removed on the next save
    latest              text file naming the newest complete checkpoint ("step_00000040")

Save protocol: every rank writes into ``step_N.tmp/`` (DCP, collective) -> barrier -> rank 0
writes ``meta.json``, renames the folder to ``step_N/``, then replaces ``latest`` atomically
(temporary file + ``os.replace``) -> barrier. A crash at any point leaves the previous
complete checkpoint and ``latest`` untouched.

Contents, all tensors (so loading unpickles nothing but DCP's own metadata file; tensors are
read with ``weights_only=True``):

- ``model/<name>``: the tensors of ``model.state_dict()``, each stored ONCE as its FULL
  (single-process) tensor, see "Tensor parallelism" below
- ``optim/<param name>/<key>``: the optimizer's per-parameter state (AdamW: ``step``,
  ``exp_avg``, ``exp_avg_sq``), stored like its parameter. Hyper-parameters are not stored:
  the config is their source of truth and the learning rate is a function of the step.
- ``progress/step``, ``progress/epoch``, ``progress/global_batch_size``: the data position
  (batches are a pure function of ``(seed, step)``, see `hyena_cp.data.sampling`)
- ``rng/dp<r>/cpu`` (and ``/cuda``): the RNG state of data-parallel replica ``r``; the CP and
  TP ranks of a replica share it (stochastic depth must agree across them).

``meta.json`` (plain JSON, written last) holds the step, the mesh (``world``, ``dp``, ``cp``,
``tp``), the progress, and ``tp_partitions``: ``{key: [dim, stride]}`` of every TP-sharded
item, so the folded layout below can be undone without the model (`load_model_state`).

Tensor parallelism (the dp x tp x cp invariant: every item is stored once, as the full
tensor). DCP de-duplicates items that several ranks save under one key, assuming replicas;
that holds for the replicated tensors (the DP, CP and TP ranks hold the same values), but
the TP ranks hold different SHARDS of a TP-sharded parameter (megatron's
``tensor_model_parallel`` attributes, `hyena_cp.parallel.tp_partition`). Those, and their
optimizer state of the parameter's shape, are saved as DTensors over the TP mesh whose
global value is the full tensor (`hyena_cp.parallel.tp_full_view`; a strided partition is
stored "folded", ``[..., stride, full / stride, ...]``, so that each shard is one plain
chunk). The DP/CP replicas of a shard then save the same chunk, which DCP writes once.
0-dim optimizer state (``step``) is the same on every TP rank and is stored as a replica.
State of any other shape (e.g. Adafactor's factored statistics) has no known partition: it
is saved as is at tp=1, where nothing collides, and refused under TP (on save, and on
loading such a checkpoint at tp > 1), with a ValueError on every rank before any I/O.

Resuming needs the same ``dp`` (the RNG streams are per replica) but NOT the same ``tp`` or
``cp``: since the stored tensors are the full ones, loading at another TP size reshards
(DCP reads the overlapping chunks into each rank's shard), bitwise; tests hold a tp=2
checkpoint loaded at tp=1 and the reverse to identical full parameters and optimizer state.
The folded layout depends only on the model (its partition strides), so checkpoints of
models without strided partitions are unchanged from before TP existed.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh

from hyena_cp.parallel.dims import ParallelGroups, barrier, broadcast_int
from hyena_cp.parallel.tp_dtensor import tp_full_view, tp_unfold
from hyena_cp.parallel.tp_layout import TPPartition, tp_partition

__all__ = ["Checkpointer", "load_model_state", "read_tensor_metadata", "saved_partitions"]

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_tensor_metadata(path: str | os.PathLike[str]) -> dict[str, TensorStorageMetadata]:
    """Key -> size/dtype of every item of a DCP checkpoint; refuses non-tensor (pickled) items."""
    metadata = dcp.FileSystemReader(os.fspath(path)).read_metadata()
    out = {}
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            raise ValueError(f"checkpoint {path} holds a non-tensor item {key!r}; refusing to unpickle it")
        out[key] = item
    return out


def _empty_like_meta(item: TensorStorageMetadata) -> Tensor:
    return torch.empty(tuple(item.size), dtype=item.properties.dtype)


def saved_partitions(path: str | os.PathLike[str]) -> dict[str, TPPartition]:
    """Key -> TP partition of every item a checkpoint stores as a TP-sharded full tensor
    (``meta.json``'s ``tp_partitions``; empty for checkpoints written before TP existed)."""
    meta = Path(path) / "meta.json"
    recorded = json.loads(meta.read_text()).get("tp_partitions", {}) if meta.is_file() else {}
    return {key: TPPartition(*value) for key, value in recorded.items()}


def load_model_state(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """``model.state_dict()`` of a checkpoint folder as FULL (single-process, tp=1) tensors, in one
    process without a process group, whatever the TP size it was written at."""
    meta = read_tensor_metadata(path)
    state = {k: _empty_like_meta(v) for k, v in meta.items() if k.startswith("model/")}
    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=os.fspath(path), no_dist=True)
    parts = saved_partitions(path)
    return {k.removeprefix("model/"): tp_unfold(v, parts[k]) if k in parts else v for k, v in state.items()}


def _model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """``model/<name>`` -> tensor of ``model.state_dict()``. Empty extra state (megatron-core
    modules report ``_extra_state = None`` without TransformerEngine) has nothing to save;
    any other non-tensor entry would need pickling and is refused."""
    state = {}
    for key, value in model.state_dict().items():
        if isinstance(value, Tensor):
            state[f"model/{key}"] = value
        elif value is not None:
            raise TypeError(f"model state {key} is a {type(value).__name__}, not a tensor; only tensor state "
                            "can be checkpointed without pickling")
    return state


def _model_items(model: nn.Module, mesh: DeviceMesh | None) -> tuple[dict[str, Tensor], dict[str, TPPartition]]:
    """`_model_tensors` with every TP-sharded tensor as its piece of the full tensor (sharing
    storage, so loading writes into the model), and the partitions of those items. The
    partition is read from the parameter or buffer: ``state_dict()`` returns detached
    tensors without megatron's attributes."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    partitions = {f"model/{n}": part for n, t in named if (part := tp_partition(t)) is not None}
    state = _model_tensors(model)
    for key in state.keys() & partitions.keys():
        state[key] = tp_full_view(state[key], partitions[key], mesh)
    return state, {k: v for k, v in partitions.items() if k in state}


def _optimizer_item(name: str, key: str, param: nn.Parameter, value: Tensor,
                    mesh: DeviceMesh | None) -> tuple[Tensor, TPPartition | None]:
    """How one optimizer state tensor is stored: like its parameter when it has the parameter's
    shape and the parameter is TP-sharded; 0-dim state (``step``) as a replica; state of
    another shape as is at tp=1 (where it cannot collide) and refused under TP."""
    part = tp_partition(param)
    if part is None or value.dim() == 0 or (value.shape != param.shape and mesh is None):
        return value, None
    if value.shape != param.shape:
        raise ValueError(f"optimizer state {name}.{key} has shape {tuple(value.shape)}, its TP-sharded parameter "
                         f"{tuple(param.shape)}: under tensor parallelism only state of the parameter's shape "
                         "(sharded like it) or 0-dim state can be checkpointed; use an optimizer like AdamW or tp=1")
    return tp_full_view(value, part, mesh), part


def _check_partitions(path: Path, current: dict[str, TPPartition], saved: dict[str, TPPartition]) -> None:
    """The stored layout of a strided item is folded by its stride (see the module docstring),
    so a model with other strides cannot read it; stride-1 items are full tensors either way."""
    for key in sorted(current.keys() | {k for k in saved if k.startswith("model/")}):
        mine, theirs = current.get(key), saved.get(key)
        if (mine is not None and mine.stride > 1 or theirs is not None and theirs.stride > 1) and mine != theirs:
            raise ValueError(f"checkpoint {path} stores {key} with TP partition {theirs} but the model has {mine}: "
                             "the strided (folded) layouts differ; load it into the model that wrote it")


class Checkpointer:
    """Save/resume for one run; every rank constructs it and calls `save`/`load` together.

    Args:
        root: checkpoint folder (shared by all ranks).
        groups: this rank's parallel groups (for the rank, the DP replica, the TP mesh of the
            TP-sharded tensors and the barriers).
        keep: complete checkpoints to keep (older ones are deleted after each save).
    """

    def __init__(self, root: str | os.PathLike[str], groups: ParallelGroups, keep: int = 2):
        if keep < 1:
            raise ValueError(f"checkpoint keep={keep} must be >= 1")
        self.root, self.groups, self.keep = Path(root), groups, keep
        if groups.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step_*.tmp"):  # partial saves of a crashed attempt
                shutil.rmtree(stale)
        barrier(groups)

    # ------------------------------------------------------------------ paths
    def _complete(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step_*") if p.suffix != ".tmp" and (p / "meta.json").is_file())

    def latest_step(self) -> int:
        """Step of the newest complete checkpoint (-1 if none), the same on every rank: the
        ``latest`` pointer if it names a complete checkpoint, else the newest complete folder."""
        step = -1
        if self.groups.rank == 0:
            pointer = self.root / LATEST
            name = pointer.read_text().strip() if pointer.is_file() else ""
            if name and (self.root / name / "meta.json").is_file():
                step = int(name.removeprefix("step_"))
            elif self._complete():
                step = int(self._complete()[-1].name.removeprefix("step_"))
        return broadcast_int(step, self.groups)

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    # ------------------------------------------------------------------- save
    def _state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
               progress: dict[str, int]) -> tuple[dict[str, Tensor], dict[str, TPPartition]]:
        """Everything to save (TP shards as pieces of their full tensors) and the partitions."""
        mesh = self.groups.tp_mesh
        state, partitions = _model_items(model, mesh)
        names = {p: n for n, p in model.named_parameters()}
        for p, entries in optimizer.state.items():
            for key, value in entries.items():
                if not isinstance(value, Tensor):
                    raise TypeError(f"optimizer state {names[p]}.{key} is a {type(value).__name__}, not a tensor; "
                                    "only tensor state can be checkpointed without pickling")
                item = f"optim/{names[p]}/{key}"
                state[item], part = _optimizer_item(names[p], key, p, value, mesh)
                if part is not None:
                    partitions[item] = part
        state.update({f"progress/{k}": torch.tensor(v, dtype=torch.int64) for k, v in progress.items()})
        prefix = f"rng/dp{self.groups.dp_rank}"
        state[f"{prefix}/cpu"] = torch.get_rng_state()
        if self.groups.device.type == "cuda":
            state[f"{prefix}/cuda"] = torch.cuda.get_rng_state(self.groups.device)
        return state, partitions

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, int],
             before_commit: Callable[[], None] | None = None) -> Path:
        """Write checkpoint ``step`` atomically (collective). ``before_commit`` runs on every
        rank after the data is written and before it is committed (fault-injection hook)."""
        final = self.path(step)
        tmp = final.with_name(final.name + ".tmp")
        state, partitions = self._state(model, optimizer, progress)  # raises on every rank alike
        if self.groups.rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        barrier(self.groups)
        dcp.save(state, checkpoint_id=os.fspath(tmp))
        if before_commit is not None:
            before_commit()
        barrier(self.groups)
        if self.groups.rank == 0:
            self._commit(step, tmp, final, progress, partitions)
        barrier(self.groups)
        return final

    def _commit(self, step: int, tmp: Path, final: Path, progress: dict[str, int],
                partitions: dict[str, TPPartition]) -> None:
        dims = self.groups.dims
        meta = {"step": step, "world": dims.world, "dp": dims.dp, "cp": dims.cp, "tp": dims.tp, **progress,
                "tp_partitions": {k: list(v) for k, v in sorted(partitions.items())}}
        _write_atomic(tmp / "meta.json", json.dumps(meta, indent=1) + "\n")
        if final.exists():  # left by a crash between an earlier rename and its pointer update
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        _write_atomic(self.root / LATEST, final.name + "\n")
        for old in self._complete()[:-self.keep]:
            shutil.rmtree(old)

    # ------------------------------------------------------------------- load
    def load(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """Restore model, optimizer and this replica's RNG from checkpoint ``step`` (collective);
        returns the saved progress (``step``, ``epoch``, ``global_batch_size``, ...). The TP and
        CP sizes may differ from the saving run's; the DP size may not."""
        path = self.path(step)
        meta_items = read_tensor_metadata(path)
        saved = json.loads((path / "meta.json").read_text())
        rng_key = f"rng/dp{self.groups.dp_rank}/cpu"
        if saved["dp"] != self.groups.dims.dp:  # every rank reads the same files, so all raise alike
            raise ValueError(f"checkpoint {path} was written with dp={saved['dp']}; resuming needs the same "
                             f"data-parallel size (got dp={self.groups.dims.dp}): the RNG streams are per replica")
        state, partitions = _model_items(model, self.groups.tp_mesh)
        stored = saved_partitions(path)
        _check_partitions(path, partitions, stored)
        opt_items = {k: v for k, v in meta_items.items() if k.startswith("optim/")}
        opt_local = self._optimizer_buffers(path, model, opt_items, stored, state)
        state.update({k: _empty_like_meta(v) for k, v in meta_items.items()
                      if k.startswith("progress/") or k.startswith(f"rng/dp{self.groups.dp_rank}/")})
        dcp.load(state, checkpoint_id=os.fspath(path))
        self._restore_optimizer(model, optimizer, opt_local)
        torch.set_rng_state(state[rng_key])
        if self.groups.device.type == "cuda":
            torch.cuda.set_rng_state(state[f"rng/dp{self.groups.dp_rank}/cuda"], self.groups.device)
        return {k.removeprefix("progress/"): int(v) for k, v in state.items() if k.startswith("progress/")}

    def _optimizer_buffers(self, path: Path, model: nn.Module, items: dict[str, TensorStorageMetadata],
                           stored: dict[str, TPPartition], state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Tensors the optimizer state is loaded into (put into ``state`` for DCP, as full-tensor
        views where the checkpoint stores the item like its TP-sharded parameter); returns them
        by key in this rank's (local) shape."""
        params, local, mesh = dict(model.named_parameters()), {}, self.groups.tp_mesh
        for key, item in items.items():
            param = params.get(key.removeprefix("optim/").rsplit("/", 1)[0])
            part = None if param is None else tp_partition(param)
            if part is not None and key in stored:
                local[key] = torch.empty(param.shape, dtype=item.properties.dtype, device=param.device)
                state[key] = tp_full_view(local[key], part, mesh)
            elif part is not None and mesh is not None and len(item.size) > 0:
                raise ValueError(f"checkpoint {path} holds {key} of shape {tuple(item.size)}, not stored like its "
                                 f"TP-sharded parameter, so it cannot be split over tp={self.groups.dims.tp}; "
                                 "resume it with parallel.tp=1")
            else:  # replicated (or a parameter this model does not have: loaded, then ignored)
                local[key] = state[key] = _empty_like_meta(item)
        return local

    @staticmethod
    def _restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, flat: dict[str, Tensor]) -> None:
        """Rebuild ``optimizer.state_dict()`` (per-parameter state by index) from ``optim/<name>/<key>``."""
        current = optimizer.state_dict()
        names = {p: n for n, p in model.named_parameters()}
        ordered = [p for group in optimizer.param_groups for p in group["params"]]
        per_param: dict[int, dict[str, Tensor]] = {}
        for index, p in enumerate(ordered):
            prefix = f"optim/{names[p]}/"
            entries = {k.removeprefix(prefix): v for k, v in flat.items() if k.startswith(prefix)}
            if entries:
                per_param[index] = entries
        optimizer.load_state_dict({"state": per_param, "param_groups": current["param_groups"]})
