"""Atomic training checkpoints of tensors only, with ``torch.distributed.checkpoint`` (DCP).

Layout under ``root`` (a folder every rank can reach, e.g. ``<output_dir>/checkpoints``)::

    step_00000040/      complete checkpoint: DCP shards + .metadata + meta.json + checksums.json
    step_00000050.tmp/  being written, or left by a crash: never read, removed on the next save
    step_00000030.unverified-1/  failed verification when a run resumed: set aside, never read
    step_00000060.replaced-1/    was in the way of a new save of its step: set aside, never read
    latest              text file naming the newest complete checkpoint ("step_00000040")

Save protocol: the state is checked finite on every rank (one agreed verdict: a non-finite
model raises `NonFiniteError` and writes nothing) -> every rank writes into ``step_N.tmp/``
(DCP, collective) and records the size and SHA-256 of the shard files it wrote -> barrier ->
rank 0 writes ``meta.json`` and ``checksums.json`` (every file of the folder,
`hyena_cp.train.verify`), sets aside a ``step_N/`` already there, renames the folder to
``step_N/``, then replaces ``latest`` atomically (temporary file + ``os.replace``) and deletes
the checkpoints beyond ``keep`` (of those not newer than ``step_N``) -> barrier. A crash at any
point leaves the previous complete checkpoint and ``latest`` untouched.

Resume protocol (`Checkpointer.resume_step`): rank 0 verifies the checkpoint the pointer names,
else the newest ``step_N`` folder, going back until one verifies (`hyena_cp.train.verify`), and
broadcasts the outcome, so every rank loads the same one. Each folder that fails is named with
what is wrong in a `CheckpointWarning` and set aside; with none verified the run stops with a
`CheckpointError` naming the folder, or, under ``train.resume=false``, sets them aside and
starts from scratch. A ``latest`` that is not a checkpoint name (not UTF-8, garbage, a missing
folder) is reported and the folders are scanned instead.

What is stored comes from ``torch.distributed.checkpoint.state_dict.get_state_dict`` (and goes
back through ``set_model_state_dict`` / ``set_optimizer_state_dict``): under FSDP
(`hyena_cp.distributed.fsdp`) the model and optimizer state are DTensor shards over the ``dp_cp``
mesh, and every rank writes only its shard; FSDP's replicate and one process give whole
tensors, which DCP writes once. Contents, all tensors (no pickled Python objects of ours; see
"Trust model" below):

- ``model/<name>``: the tensors of the model state dict (canonical names, as
  ``named_parameters()`` of the unwrapped model), each stored ONCE as its FULL
  (single-process) tensor, see "Tensor parallelism" below
- ``optim/<param name>/<key>``: the optimizer's per-parameter state (AdamW: ``step``,
  ``exp_avg``, ``exp_avg_sq``), stored like its parameter; none for a parameter that was
  never stepped (no gradient yet), and loading leaves such a parameter without state. Hyper-parameters (the state dict's
  ``param_groups``) are not stored: the config is their source of truth, the learning rate
  is a function of the step, and they are not tensors (DCP would pickle them).
- ``progress/step``, ``progress/epoch``, ``progress/global_batch_size``: the data position
  (batches are a pure function of ``(seed, step)``, see `hyena_cp.data.sampling`)
- ``rng/dp<r>/cpu`` (and ``/cuda``): the RNG state of data-parallel replica ``r``; the CP and
  TP ranks of a replica share it (stochastic depth must agree across them).

``meta.json`` (plain JSON, written after the shards) holds the step, the mesh (``world``, ``dp``, ``cp``,
``tp``, ``dp_mode``), the progress, the learning-rate ``schedule`` (the loop's ``info``), and
``tp_partitions``: ``{key: [dim, stride]}`` of every TP-sharded item, so the folded layout
(`hyena_cp.train.checkpoint_items`) can be undone without the model (`load_model_state`).
``checksums.json`` (written last, `hyena_cp.train.verify`) holds the size and SHA-256 of every
other file.

Trust model: a checkpoint folder is as trusted as code (the checksums catch accidental damage,
not tampering: see `hyena_cp.train.verify`). DCP writes its ``.metadata`` (the index
of items, shards and files) with ``pickle.dump`` and reads it with a plain ``pickle.load`` (torch's
``FileSystemReader.read_metadata``) before anything here can look at it, so a crafted
``.metadata`` runs code on load: resume, generate from and export only checkpoints you (or
someone you trust) wrote. What this module adds on top is narrower: every item it saves is a
tensor, `read_tensor_metadata` refuses a checkpoint holding any non-tensor (byte-pickled) item
before reading it, and DCP reads each tensor with ``torch.load(weights_only=True)`` (a restricted
unpickler that builds only tensors and plain containers). To share a model, export its weights
(`hyena_cp.train.export`, ``launch/export.py``): ``model.safetensors`` loads without any pickle.

Resharding: the stored tensors are the full ones, so a checkpoint loads at any ``dp``, ``cp``,
``tp`` and ``dp_mode`` (DCP reads the overlapping chunks into each rank's shard), bitwise;
tests hold dp2 x cp2 (FSDP) -> cp2 and -> one process, tp2 x (FSDP over cp2) -> one process,
and tp2 <-> tp1 to identical full parameters and optimizer state. The RNG streams are per
replica: they are restored when ``dp`` is unchanged, and `load` reports when it is not (the
loop then reseeds the replicas, `hyena_cp.train.loop.Trainer.resume`).

Tensor parallelism: every item is stored once, as the full tensor, TP shards included
(`hyena_cp.train.checkpoint_items`).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor

from hyena_cp.distributed.decisions import any_rank, broadcast_text
from hyena_cp.distributed.mesh import ParallelGroups, barrier
from hyena_cp.parallel.tp_dtensor import tp_unfold
from hyena_cp.parallel.tp_layout import TPPartition
from hyena_cp.train.checkpoint_items import (CheckpointItems, check_partitions, empty_like_meta,
                                             read_tensor_metadata, saved_partitions)
from hyena_cp.train.nonfinite import NonFiniteError
from hyena_cp.train.verify import (LATEST, Choice, digest_files, newest_verified, set_aside, step_folders,
                                   verify_folder, write_checksums)

__all__ = ["CheckpointError", "CheckpointWarning", "Checkpointer", "load_model_state", "load_optimizer_state",
           "read_tensor_metadata", "saved_partitions"]


class CheckpointError(ValueError):
    """No checkpoint that verifies where one is needed (raised on every rank)."""


class CheckpointWarning(UserWarning):
    """A checkpoint folder or pointer that failed verification and was skipped (rank 0 only)."""


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


def _step_of(name: str) -> int:
    return int(name.removeprefix("step_"))


_OWN_DIGESTS = ".sha256-rank"  # per-rank digests inside step_N.tmp/, merged into checksums.json


def _load_full(path: str | os.PathLike[str], prefix: str) -> dict[str, Tensor]:
    """The items under ``prefix`` of a checkpoint folder as FULL (tp=1) tensors, in one process,
    after verifying the folder's checksums."""
    problem = verify_folder(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} failed verification: {problem}; use another checkpoint")
    meta = read_tensor_metadata(path)
    state = {k: empty_like_meta(v) for k, v in meta.items() if k.startswith(prefix)}
    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=os.fspath(path), no_dist=True)
    parts = saved_partitions(path)
    return {k.removeprefix(prefix): tp_unfold(v, parts[k]) if k in parts else v for k, v in state.items()}


def load_model_state(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """``model.state_dict()`` of a checkpoint folder as FULL (single-process, tp=1) tensors, in one
    process without a process group, whatever the dp x cp x tp layout it was written at."""
    return _load_full(path, "model/")


def load_optimizer_state(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The optimizer's per-parameter state of a checkpoint folder, ``"<param name>/<key>"`` (AdamW:
    ``step``, ``exp_avg``, ``exp_avg_sq``) -> FULL tensor, like `load_model_state`."""
    return _load_full(path, "optim/")


class Checkpointer:
    """Save/resume for one run; every rank constructs it and calls `save`/`load` together.

    Args:
        root: checkpoint folder (shared by all ranks).
        groups: this rank's parallel groups (for the rank, the DP replica, the meshes of the
            TP-sharded tensors and the barriers).
        keep: complete checkpoints to keep (older ones are deleted after each save; never one
            newer than the one just saved, nor a folder set aside).
        dp_mode: recorded in ``meta.json`` (any mode loads any other's checkpoints).
    """

    def __init__(self, root: str | os.PathLike[str], groups: ParallelGroups, keep: int = 2, dp_mode: str = "fsdp"):
        if keep < 1:
            raise ValueError(f"checkpoint keep={keep} must be >= 1")
        self.root, self.groups, self.keep, self.dp_mode = Path(root), groups, keep, dp_mode
        self._verified: set[str] = set()  # folder names verified (or written) by this instance
        if groups.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step_*.tmp"):  # partial saves of a crashed attempt
                shutil.rmtree(stale)
        barrier(groups)

    # ----------------------------------------------------------------- choose
    def _on_rank0(self, decide: Callable[[], str]) -> str:
        """Rank 0's ``decide()`` on every rank; an exception there reaches every rank too (as
        text), so no rank waits in the broadcast for a rank 0 that failed."""
        text = ""
        if self.groups.rank == 0:
            try:
                text = decide()
            except Exception as e:
                text = json.dumps({"error": f"{type(e).__name__}: {e}"})
        return broadcast_text(text, self.groups)

    def survey(self) -> Choice:
        """The newest verified checkpoint and what is wrong with the folders rejected on the way
        (`hyena_cp.train.verify.newest_verified`, run on rank 0), the same on every rank
        (collective). Moves nothing; rank 0 warns about a bad ``latest`` pointer."""
        data = json.loads(self._on_rank0(lambda: newest_verified(self.root).to_json()))
        if "error" in data:
            raise CheckpointError(f"choosing a checkpoint in {self.root} failed on rank 0: {data['error']}")
        choice = Choice(**data)
        if choice.chosen is not None:
            self._verified.add(choice.chosen)
        if self.groups.rank == 0 and choice.pointer_problem:
            warnings.warn(f"{choice.pointer_problem}: choosing among the step_* folders instead", CheckpointWarning,
                          stacklevel=2)
        return choice

    def latest_step(self) -> int:
        """Step of the newest verified checkpoint (-1 if none), the same on every rank (`survey`)."""
        choice = self.survey()
        return _step_of(choice.chosen) if choice.chosen is not None else -1

    def resume_step(self, resume: bool = True) -> int:
        """The step a run continues from (-1: from scratch), the same on every rank (collective).

        ``resume=True``: the newest verified checkpoint (`survey`); each folder that failed on
        the way is set aside (``step_N.unverified-K``) with a `CheckpointWarning` naming it and
        what is wrong. With none verified: `CheckpointError` naming the folder and each problem,
        moving nothing. ``resume=False``: a verified checkpoint is refused (a run never continues
        or overwrites another); folders that fail are set aside and the run starts from scratch."""
        choice = self.survey()
        if resume and choice.chosen is None and choice.rejected:
            problems = "; ".join(f"{name}: {problem}" for name, problem in choice.rejected.items())
            raise CheckpointError(f"no checkpoint in {self.root} verifies ({problems}); restore a good copy of one, or "
                                  f"pass train.resume=false to start afresh (the folders are then kept, renamed "
                                  f"step_N.unverified-K), or choose another train.output_dir")
        if not resume and choice.chosen is not None:
            raise ValueError(f"{self.root} already holds checkpoints (newest verified: {choice.chosen}); pass "
                             f"train.resume=true to continue that run or choose another train.output_dir")
        failed = self._on_rank0(lambda: self._set_aside_rejected(choice))
        if failed:
            raise CheckpointError(f"setting aside the checkpoints in {self.root} that failed verification failed on "
                                  f"rank 0: {json.loads(failed)['error']}")
        return _step_of(choice.chosen) if choice.chosen is not None else -1

    def _set_aside_rejected(self, choice: Choice) -> str:
        """Rank 0: rename each rejected folder ``step_N.unverified-K``, warning, and point
        ``latest`` at the chosen one; "" when done."""
        outcome = f"resuming from {choice.chosen}" if choice.chosen is not None else "starting from scratch"
        for name, problem in choice.rejected.items():
            moved = set_aside(self.root / name, "unverified")
            warnings.warn(f"checkpoint {self.root / name} failed verification: {problem}; kept as {moved.name} for "
                          f"inspection (never read; delete it when done); {outcome}", CheckpointWarning, stacklevel=4)
        if choice.chosen is not None and (choice.rejected or choice.pointer_problem):
            _write_atomic(self.root / LATEST, choice.chosen + "\n")
        return ""

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    # ------------------------------------------------------------------- save
    def _extras(self, progress: dict[str, int]) -> dict[str, Tensor]:
        """Progress and this replica's RNG."""
        state = {f"progress/{k}": torch.tensor(v, dtype=torch.int64) for k, v in progress.items()}
        prefix = f"rng/dp{self.groups.dp_rank}"
        state[f"{prefix}/cpu"] = torch.get_rng_state()
        if self.groups.device.type == "cuda":
            state[f"{prefix}/cuda"] = torch.cuda.get_rng_state(self.groups.device)
        return state

    def _check_finite(self, step: int, state: dict[str, Tensor]) -> None:
        """Refuse to write a non-finite model or optimizer state (one verdict for all ranks: under
        DCP's de-duplication a replica's bad copy might otherwise never reach the disk, or be the
        only one that does)."""
        bad = [k for k, v in state.items() if v.is_floating_point()
               and not bool(torch.isfinite(v.to_local() if isinstance(v, DTensor) else v).all())]
        if any_rank(bool(bad), self.groups):
            where = f"{bad[:3]} on rank {self.groups.rank}" if bad else "on another rank"
            raise NonFiniteError(f"checkpoint {self.path(step)} not written: the state is not finite ({where}); "
                                 f"the newest finite checkpoint stays the newest")

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, int],
             before_commit: Callable[[], None] | None = None, info: Mapping[str, Any] | None = None) -> Path:
        """Write checkpoint ``step`` atomically (collective). ``before_commit`` runs on every
        rank after the data is written and before it is committed (fault-injection hook);
        ``info``: more JSON entries for ``meta.json`` (e.g. the learning-rate schedule)."""
        final = self.path(step)
        tmp = final.with_name(final.name + ".tmp")
        items = CheckpointItems(self.groups, model, optimizer)  # raises on every rank alike
        self._check_finite(step, items.state)
        items.state.update(self._extras(progress))
        if self.groups.rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        barrier(self.groups)
        dcp.save(items.state, checkpoint_id=os.fspath(tmp))
        if before_commit is not None:
            before_commit()
        self._record_own_digests(tmp)
        barrier(self.groups)
        if self.groups.rank == 0:
            self._commit(step, tmp, final, progress, items.partitions, info or {})
        barrier(self.groups)
        self._verified.add(final.name)
        return final

    def _record_own_digests(self, tmp: Path) -> None:
        """Each rank hashes the shard files it wrote (DCP names them ``__<rank>_<i>.distcp``), so
        no rank reads the whole checkpoint back; rank 0 hashes whatever no rank claims."""
        mine = sorted(p.name for p in tmp.glob(f"__{self.groups.rank}_*") if p.is_file())
        _write_atomic(tmp / f"{_OWN_DIGESTS}{self.groups.rank}.json", json.dumps(digest_files(tmp, mine)))

    def _commit(self, step: int, tmp: Path, final: Path, progress: dict[str, int],
                partitions: dict[str, TPPartition], info: Mapping[str, Any]) -> None:
        dims = self.groups.dims
        meta = {"step": step, "world": dims.world, "dp": dims.dp, "cp": dims.cp, "tp": dims.tp,
                "dp_mode": self.dp_mode, **progress, **info,
                "tp_partitions": {k: list(v) for k, v in sorted(partitions.items())}}
        _write_atomic(tmp / "meta.json", json.dumps(meta, indent=1) + "\n")
        digests = {}
        for own in sorted(tmp.glob(f"{_OWN_DIGESTS}*.json")):
            digests.update(json.loads(own.read_text()))
            own.unlink()
        unclaimed = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name not in digests)
        digests.update(digest_files(tmp, unclaimed))
        write_checksums(tmp, digests)
        _fsync_dir(tmp)
        if final.exists():  # another timeline's (``latest`` set back, or a crash before its pointer update)
            moved = set_aside(final, "replaced")
            warnings.warn(f"checkpoint {final} was in the way of a new save of step {step}: kept as {moved.name} "
                          f"(never read; delete it when done)", CheckpointWarning, stacklevel=2)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        _write_atomic(self.root / LATEST, final.name + "\n")
        # later steps belong to another timeline: they are set aside when their step is saved again
        done = [p for p in step_folders(self.root) if _step_of(p.name) <= step]
        for old in done[:-self.keep]:
            shutil.rmtree(old)

    # ------------------------------------------------------------------- load
    def meta(self, step: int) -> dict[str, Any]:
        """``meta.json`` of checkpoint ``step``: its mesh (``world``, ``dp``, ``cp``, ``tp``), progress, ..."""
        return json.loads((self.path(step) / "meta.json").read_text())

    def load(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """Restore model, optimizer and this replica's RNG from checkpoint ``step`` (collective);
        returns the saved progress (``step``, ``epoch``, ``global_batch_size``, ...). Any dp, cp,
        tp and dp_mode may differ from the saving run's; at another dp the RNG is left as it is
        (the saved streams are per replica; see ``meta(step)["dp"]``)."""
        path = self.path(step)
        if path.name not in self._verified:  # `survey` verified the one it chose
            problem = self._on_rank0(lambda: verify_folder(path) or "")
            if problem:
                raise CheckpointError(f"checkpoint {path} failed verification: {problem}")
            self._verified.add(path.name)
        meta_items = read_tensor_metadata(path)
        saved = self.meta(step)
        stored = saved_partitions(path)
        items = CheckpointItems(self.groups, model, optimizer, saved=meta_items, stored=stored)
        check_partitions(path, {k: v for k, v in items.partitions.items() if k.startswith("model/")}, stored)
        missing = sorted(items.state.keys() - meta_items.keys())
        if missing:  # every rank reads the same files, so all raise alike
            raise ValueError(f"checkpoint {path} lacks {len(missing)} items of this model/optimizer, e.g. "
                             f"{missing[:3]}; resume it with the model and optimizer that wrote it")
        rng_restored = saved["dp"] == self.groups.dims.dp
        prefixes = ("progress/", f"rng/dp{self.groups.dp_rank}/") if rng_restored else ("progress/",)
        extras = {k: empty_like_meta(v) for k, v in meta_items.items() if k.startswith(prefixes)}
        dcp.load({**items.state, **extras}, checkpoint_id=os.fspath(path))
        for finish in items.finish:
            finish()
        set_model_state_dict(model, items.model_sd)
        # not strict: a parameter the checkpoint holds no optimizer state for was never stepped
        # (`_Items._add_saved_optimizer_state`); every other item was checked present above
        set_optimizer_state_dict(model, optimizer, items.optim_sd, options=StateDictOptions(strict=False))
        if rng_restored:
            torch.set_rng_state(extras[f"rng/dp{self.groups.dp_rank}/cpu"])
            if self.groups.device.type == "cuda":
                torch.cuda.set_rng_state(extras[f"rng/dp{self.groups.dp_rank}/cuda"], self.groups.device)
        return {k.removeprefix("progress/"): int(v) for k, v in extras.items() if k.startswith("progress/")}
