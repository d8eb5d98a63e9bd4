"""The stored form of a model and its optimizer in a checkpoint: which tensor goes under which
key, and how TP-sharded tensors are stored (`CheckpointItems`); the readers of a checkpoint's
index (`read_tensor_metadata`, `saved_partitions`). `hyena_cp.train.checkpoint` writes and reads
them with DCP.

Tensor parallelism (the dp x tp x cp invariant: every item is stored once, as the full
tensor). DCP de-duplicates items that several ranks save under one key, assuming replicas;
that holds for the replicated tensors (the DP, CP and TP ranks hold the same values), but
the TP ranks hold different SHARDS of a TP-sharded parameter (megatron's
``tensor_model_parallel`` attributes, `hyena_cp.parallel.tp_partition`). Those, and their
optimizer state of the parameter's shape, are saved as DTensors whose global value is the
full tensor (`hyena_cp.parallel.stored_view`: over the TP mesh, or under FSDP over the
``(tp, dp_cp)`` mesh; a strided partition is stored "folded", ``[..., stride, full / stride,
...]``, so that each shard is one plain chunk). The DP/CP replicas of a shard then save the
same chunk, which DCP writes once. 0-dim optimizer state (``step``) is the same on every TP
rank and is stored as a replica. State of any other shape (e.g. Adafactor's factored
statistics) has no known partition: it is saved as is at tp=1, where nothing collides, and
refused under TP (on save, and on loading such a checkpoint at tp > 1), with a ValueError on
every rank before any I/O. The folded layout depends only on the model (its partition
strides), so checkpoints of models without strided partitions are unchanged from before TP
existed, and checkpoints from before FSDP load as they are.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict

from hyena_cp.distributed.mesh import ParallelGroups
from hyena_cp.parallel.tp_dtensor import stored_view
from hyena_cp.parallel.tp_layout import TPPartition, tp_partition

__all__ = ["CheckpointItems", "check_partitions", "empty_like_meta", "read_tensor_metadata", "saved_partitions"]


def read_tensor_metadata(path: str | os.PathLike[str]) -> dict[str, TensorStorageMetadata]:
    """Key -> size/dtype of every item of a DCP checkpoint; refuses non-tensor (pickled) items.
    Reading the metadata itself unpickles DCP's ``.metadata`` file (see "Trust model" in
    `hyena_cp.train.checkpoint`)."""
    metadata = dcp.FileSystemReader(os.fspath(path)).read_metadata()
    out = {}
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            raise ValueError(f"checkpoint {path} holds a non-tensor item {key!r}; refusing to unpickle it")
        out[key] = item
    return out


def empty_like_meta(item: TensorStorageMetadata) -> Tensor:
    return torch.empty(tuple(item.size), dtype=item.properties.dtype)


def saved_partitions(path: str | os.PathLike[str]) -> dict[str, TPPartition]:
    """Key -> TP partition of every item a checkpoint stores as a TP-sharded full tensor
    (``meta.json``'s ``tp_partitions``; empty for checkpoints written before TP existed)."""
    meta = Path(path) / "meta.json"
    recorded = json.loads(meta.read_text()).get("tp_partitions", {}) if meta.is_file() else {}
    return {key: TPPartition(*value) for key, value in recorded.items()}


def check_partitions(path: Path, current: dict[str, TPPartition], saved: dict[str, TPPartition]) -> None:
    """The stored layout of a strided item is folded by its stride (see the module docstring),
    so a model with other strides cannot read it; stride-1 items are full tensors either way."""
    for key in sorted(current.keys() | {k for k in saved if k.startswith("model/")}):
        mine, theirs = current.get(key), saved.get(key)
        if (mine is not None and mine.stride > 1 or theirs is not None and theirs.stride > 1) and mine != theirs:
            raise ValueError(f"checkpoint {path} stores {key} with TP partition {theirs} but the model has {mine}: "
                             "the strided (folded) layouts differ; load it into the model that wrote it")


class CheckpointItems:
    """The stored form of a model and optimizer (from ``get_state_dict``): ``state`` (key ->
    tensor or view for DCP), the TP ``partitions`` by key, ``finish`` (copies loaded buffers into
    the state dicts) and the state dicts themselves, for ``set_*_state_dict``.

    Loading (``saved``: the checkpoint's items and ``stored`` partitions): optimizer state the
    checkpoint holds but a fresh optimizer lacks (e.g. a factored statistic) is loaded too, as is."""

    def __init__(self, groups: ParallelGroups, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 saved: dict[str, TensorStorageMetadata] | None = None, stored: dict[str, TPPartition] | None = None):
        self.model_sd, self.optim_sd = get_state_dict(model, optimizer)  # initialises an empty optimizer state
        self.groups, self.loading, self.stored = groups, saved is not None, stored or {}
        self.state: dict[str, Tensor] = {}
        self.partitions: dict[str, TPPartition] = {}
        self.finish: list[Callable[[], None]] = []
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        self.params = dict(named)
        self._check_tensors()
        if saved is not None:
            self._add_saved_optimizer_state(saved)
        self._check_tp()  # before any collective: every rank raises alike
        for name, value in self.model_sd.items():
            if value is not None:  # megatron-core's empty _extra_state
                self._add(f"model/{name}", value, tp_partition(self.params[name]) if name in self.params else None)
        for name, entries in self.optim_sd["state"].items():
            for key, value in entries.items():
                self._add(f"optim/{name}/{key}", value, self._optimizer_partition(name, key, value))

    def _add(self, key: str, value: Tensor, part: TPPartition | None) -> None:
        g = self.groups
        self.state[key], finish = stored_view(value, part, g.tp_mesh, g.tp_dp_cp_mesh, loading=self.loading)
        if part is not None:
            self.partitions[key] = part
        if finish is not None:
            self.finish.append(finish)

    def _optimizer_partition(self, name: str, key: str, value: Tensor) -> TPPartition | None:
        """Stored like its parameter when of the parameter's shape and the parameter is TP-sharded
        (unless the checkpoint being loaded stored it as is); 0-dim state (``step``) as a
        replica; other shapes as is (tp=1 only, see `_check_tp`)."""
        part = tp_partition(self.params[name])
        if part is None or value.dim() == 0 or value.shape != self.params[name].shape:
            return None
        if self.loading and f"optim/{name}/{key}" not in self.stored:
            return None
        return part

    def _add_saved_optimizer_state(self, saved: dict[str, TensorStorageMetadata]) -> None:
        """Match the fresh optimizer's state (``get_state_dict`` makes one with a zero-gradient
        step for EVERY parameter) to the checkpoint's: a parameter the checkpoint holds no state
        for had none when it was saved (never stepped: its gradient was always None), so it
        gets none now either; state keys the checkpoint adds are loaded as they are."""
        with_state = {item.removeprefix("optim/").rsplit("/", 1)[0] for item in saved if item.startswith("optim/")}
        for name in [n for n in self.optim_sd["state"] if n not in with_state]:
            del self.optim_sd["state"][name]
        for item, meta in saved.items():
            if not item.startswith("optim/"):
                continue
            name, key = item.removeprefix("optim/").rsplit("/", 1)
            entries = self.optim_sd["state"].get(name)
            if entries is not None and key not in entries:  # a parameter this model lacks: ignored
                entries[key] = empty_like_meta(meta)

    def _check_tensors(self) -> None:
        for name, value in self.model_sd.items():
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"model state {name} is a {type(value).__name__}, not a tensor; only tensor state "
                                "can be checkpointed without pickling")
        for name, entries in self.optim_sd["state"].items():
            for key, value in entries.items():
                if not isinstance(value, Tensor):
                    raise TypeError(f"optimizer state {name}.{key} is a {type(value).__name__}, not a tensor; "
                                    "only tensor state can be checkpointed without pickling")

    def _check_tp(self) -> None:
        tp = self.groups.dims.tp
        for name, entries in self.optim_sd["state"].items():
            param = self.params[name]
            for key, value in entries.items():
                if tp == 1 or tp_partition(param) is None or value.dim() == 0:
                    continue
                if self.loading and f"optim/{name}/{key}" not in self.stored:
                    raise ValueError(f"the checkpoint holds optim/{name}/{key} of shape {tuple(value.shape)}, not "
                                     f"stored like its TP-sharded parameter, so it cannot be split over tp={tp}; "
                                     "resume it with parallel.tp=1")
                if value.shape != param.shape:
                    raise ValueError(f"optimizer state {name}.{key} has shape {tuple(value.shape)}, its TP-sharded "
                                     f"parameter {tuple(param.shape)}: under tensor parallelism only state of the "
                                     "parameter's shape (sharded like it) or 0-dim state can be checkpointed; use "
                                     "an optimizer like AdamW or tp=1")
