"""Weights-only export of a trained model to safetensors, for sharing (behind ``launch/export.py``).

    python launch/export.py configs/digits_hyena_tiny.py [export.out=DIR] [export.checkpoint=DIR]

A training checkpoint is a DCP folder whose ``.metadata`` is a pickle that DCP unpickles on
load, so it is for runs you trust (see "Trust model" in `hyena_cp.train.checkpoint`). The
export reads the newest verified checkpoint of the run (any dp x cp x tp layout: checkpoints
store FULL tensors, `load_model_state`) and writes to ``export.out`` (default
``<train.output_dir>/export``):

- ``model.safetensors``: ``model.state_dict()`` of the single-process model, full tensors;
  the header's metadata holds the step and the config name. Reading it parses a JSON header
  and raw tensor bytes: no pickle, no code.
- ``model.yaml``: the ``model`` section of the config (`LazyConfig.save`'s YAML, read with a
  safe YAML loader). Building the model from it calls the ``_target_`` it names, so
  `load_exported` accepts only targets inside ``hyena_cp`` and ``torch`` objects that
  ``${locate:...}`` names (dtypes, ``torch.nn`` layers) unless the caller passes its own config.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from hyena_cp.lazy import LazyConfig, instantiate
from hyena_cp.train.checkpoint import load_model_state
from hyena_cp.train.config import fill_section_defaults
from hyena_cp.train.generate import latest_checkpoint, load_full_state
from hyena_cp.value_types import check_fields

__all__ = ["ExportConfig", "export_model", "load_exported", "load_initial_weights", "with_export_defaults"]

WEIGHTS, CONFIG = "model.safetensors", "model.yaml"
# What a shared model.yaml may name: the project's builders, and torch's dtypes / nn layers.
TRUSTED_TARGETS = ("hyena_cp.",)
TRUSTED_OBJECTS = ("hyena_cp.", "torch.nn.", "torch.float", "torch.bfloat16", "torch.int")


@dataclass(frozen=True)
class ExportConfig:
    """``export`` section.

    out: folder for ``model.safetensors`` and ``model.yaml``; None: ``<train.output_dir>/export``.
    checkpoint: a ``step_*`` folder (verified before it is read); None: the newest verified one of the
        training run.
    """

    out: str | None = None
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        check_fields(self, "export")


def with_export_defaults(cfg: DictConfig) -> DictConfig:
    """Fill the ``export`` keys a config leaves out (in place), so each can be overridden."""
    return fill_section_defaults(cfg, "export", ExportConfig)


def export_model(cfg: DictConfig, *, name: str) -> Path:
    """Write ``model.safetensors`` and ``model.yaml`` of experiment ``cfg`` (named ``name``) from
    its newest checkpoint (or ``export.checkpoint``); one process, no process group. Returns
    the folder."""
    settings = ExportConfig(**instantiate(cfg.export))
    run_dir = Path(cfg.train.output_dir or Path("outputs") / name)
    path = Path(settings.checkpoint) if settings.checkpoint else latest_checkpoint(run_dir / "checkpoints")
    out = Path(settings.out) if settings.out else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in load_model_state(path).items()}
    step = int(path.name.removeprefix("step_")) if path.name.startswith("step_") else -1
    tmp = out / f".{WEIGHTS}.tmp"
    save_file(state, os.fspath(tmp), metadata={"format": "pt", "config": name, "step": str(step)})
    os.replace(tmp, out / WEIGHTS)
    # resolved in the whole config (links into other sections too); objects are saved as ${locate:...}
    model = OmegaConf.to_container(cfg.model, resolve=True)
    LazyConfig.save(OmegaConf.create({"model": model}, flags={"allow_objects": True}), out / CONFIG)
    return out


def _untrusted(node: Any, path: str = "model") -> list[str]:
    """Dotted names in a plain config that `load_exported` would import and call, outside the
    trusted prefixes."""
    if isinstance(node, Mapping):
        target = node.get("_target_")
        bad = [] if target is None or str(target).startswith(TRUSTED_TARGETS) else [f"{path}._target_={target}"]
        return bad + [b for k, v in node.items() if k != "_target_" for b in _untrusted(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [b for i, v in enumerate(node) for b in _untrusted(v, f"{path}.{i}")]
    if isinstance(node, str) and node.startswith("${locate:"):
        return [] if node.removeprefix("${locate:").startswith(TRUSTED_OBJECTS) else [f"{path}={node}"]
    return []


def load_exported(folder: str | os.PathLike[str], model_cfg: DictConfig | None = None, *,
                  overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """The model of an export folder, weights loaded, in one process (CPU, the saved dtypes).

    Args:
        folder: holds ``model.safetensors`` (and ``model.yaml`` unless ``model_cfg`` is given).
        model_cfg: the ``model`` LazyCall to build (e.g. ``LazyConfig.load("configs/x.py").model``);
            None: the folder's ``model.yaml``, refused if it names anything outside the trusted
            prefixes (``TRUSTED_TARGETS`` / ``TRUSTED_OBJECTS``).
        overrides: passed to ``instantiate`` (e.g. ``{"pg_collection": pgs}`` for a megatron-core
            model when megatron's ``parallel_state`` is not initialised).
    """
    folder = Path(folder)
    if model_cfg is None:
        model_cfg = LazyConfig.load(folder / CONFIG).model
        bad = _untrusted(OmegaConf.to_container(model_cfg, resolve=False))
        if bad:
            raise ValueError(f"{folder / CONFIG} names callables outside {TRUSTED_TARGETS + TRUSTED_OBJECTS}: "
                             f"{bad[:3]}; read it, then pass your own model_cfg to load it")
    state = load_file(os.fspath(folder / WEIGHTS))
    torch.manual_seed(0)  # every weight is overwritten; a seed keeps the build deterministic
    model = instantiate(model_cfg, **(overrides or {}))
    own = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    missing, unexpected = sorted(own - state.keys()), sorted(state.keys() - own)
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS} does not fit the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; load it with the config that trained it")
    model.load_state_dict(state, strict=False)  # strict=False: megatron-core's non-tensor _extra_state
    return model


def load_initial_weights(model: nn.Module, folder: str | os.PathLike[str], tp_group=None) -> None:
    """Copy the FULL tensors of ``folder``'s ``model.safetensors`` (an export, or ``launch/convert.py``'s
    output) into ``model``, strictly (`load_full_state`: every tensor of the model, nothing else; this
    TP rank's shard of the TP-sharded ones). Reading safetensors runs no code."""
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise ValueError(f"train.init_from={os.fspath(folder)!r} holds no {WEIGHTS}; point it at the folder "
                         f"launch/convert.py or launch/export.py wrote")
    load_full_state(model, load_file(os.fspath(path)), tp_group)
