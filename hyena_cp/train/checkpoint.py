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

- ``model/<name>``: the tensors of ``model.state_dict()`` (replicated; DCP writes one copy)
- ``optim/<param name>/<key>``: the optimizer's per-parameter state (AdamW: ``step``,
  ``exp_avg``, ``exp_avg_sq``). Hyper-parameters are not stored: the config is their source
  of truth and the learning rate is a function of the step.
- ``progress/step``, ``progress/epoch``, ``progress/global_batch_size``: the data position
  (batches are a pure function of ``(seed, step)``, see `hyena_cp.data.sampling`)
- ``rng/dp<r>/cpu`` (and ``/cuda``): the RNG state of data-parallel replica ``r``; the CP
  ranks of a replica share it (stochastic depth must agree across them).
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

from hyena_cp.parallel.dims import ParallelGroups, barrier, broadcast_int

__all__ = ["Checkpointer", "load_model_state", "read_tensor_metadata"]

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


def load_model_state(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """``model.state_dict()`` of a checkpoint folder, in one process without a process group."""
    meta = read_tensor_metadata(path)
    state = {k: _empty_like_meta(v) for k, v in meta.items() if k.startswith("model/")}
    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=os.fspath(path), no_dist=True)
    return {k.removeprefix("model/"): v for k, v in state.items()}


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


class Checkpointer:
    """Save/resume for one run; every rank constructs it and calls `save`/`load` together.

    Args:
        root: checkpoint folder (shared by all ranks).
        groups: this rank's parallel groups (for the rank, the DP replica and the barriers).
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
    def _state(self, model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, int]) -> dict[str, Tensor]:
        state = _model_tensors(model)
        names = {p: n for n, p in model.named_parameters()}
        for p, entries in optimizer.state.items():
            for key, value in entries.items():
                if not isinstance(value, Tensor):
                    raise TypeError(f"optimizer state {names[p]}.{key} is a {type(value).__name__}, not a tensor; "
                                    "only tensor state can be checkpointed without pickling")
                state[f"optim/{names[p]}/{key}"] = value
        state.update({f"progress/{k}": torch.tensor(v, dtype=torch.int64) for k, v in progress.items()})
        prefix = f"rng/dp{self.groups.dp_rank}"
        state[f"{prefix}/cpu"] = torch.get_rng_state()
        if self.groups.device.type == "cuda":
            state[f"{prefix}/cuda"] = torch.cuda.get_rng_state(self.groups.device)
        return state

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, int],
             before_commit: Callable[[], None] | None = None) -> Path:
        """Write checkpoint ``step`` atomically (collective). ``before_commit`` runs on every
        rank after the data is written and before it is committed (fault-injection hook)."""
        final = self.path(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.groups.rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        barrier(self.groups)
        dcp.save(self._state(model, optimizer, progress), checkpoint_id=os.fspath(tmp))
        if before_commit is not None:
            before_commit()
        barrier(self.groups)
        if self.groups.rank == 0:
            self._commit(step, tmp, final, progress)
        barrier(self.groups)
        return final

    def _commit(self, step: int, tmp: Path, final: Path, progress: dict[str, int]) -> None:
        dims = self.groups.dims
        meta = {"step": step, "world": dims.world, "dp": dims.dp, "cp": dims.cp, **progress}
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
        returns the saved progress (``step``, ``epoch``, ``global_batch_size``, ...)."""
        path = self.path(step)
        meta_items = read_tensor_metadata(path)
        saved = json.loads((path / "meta.json").read_text())
        rng_key = f"rng/dp{self.groups.dp_rank}/cpu"
        if saved["dp"] != self.groups.dims.dp:  # every rank reads the same files, so all raise alike
            raise ValueError(f"checkpoint {path} was written with dp={saved['dp']}; resuming needs the same "
                             f"data-parallel size (got dp={self.groups.dims.dp}): the RNG streams are per replica")
        state = _model_tensors(model)
        opt_keys = [k for k in meta_items if k.startswith("optim/")]
        state.update({k: _empty_like_meta(meta_items[k]) for k in opt_keys})
        state.update({k: _empty_like_meta(v) for k, v in meta_items.items()
                      if k.startswith("progress/") or k.startswith(f"rng/dp{self.groups.dp_rank}/")})
        dcp.load(state, checkpoint_id=os.fspath(path))
        self._restore_optimizer(model, optimizer, {k: state[k] for k in opt_keys})
        torch.set_rng_state(state[rng_key])
        if self.groups.device.type == "cuda":
            torch.cuda.set_rng_state(state[f"rng/dp{self.groups.dp_rank}/cuda"], self.groups.device)
        return {k.removeprefix("progress/"): int(v) for k, v in state.items() if k.startswith("progress/")}

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
