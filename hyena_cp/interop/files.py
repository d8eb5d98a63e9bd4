"""Files around a conversion (behind ``launch/convert.py``): read a foreign config and checkpoint,
write the converted model as an export folder that `hyena_cp.train.export.load_exported` and
``train.init_from`` read, plus a training config that fine-tunes it.

Output folder:

- ``model.safetensors``: the converted FULL tensors (safetensors: no pickle, no code);
- ``model.yaml``: the ``model`` config (``build_hyena_lm`` and its arguments);
- ``train.yaml``: a complete training config for ``launch/train.py``: that model, initialised from
  this folder (``train.init_from``), on the standard library's text (bytes for Evo 2, the same text
  as nucleotides for HyenaDNA), at any ``parallel.cp`` / ``parallel.tp`` given on the command line.

Inputs: the config as YAML (vortex's ``.yml``) or JSON (HuggingFace's ``config.json``); the
checkpoint as ``.safetensors`` or a torch file of tensors (``.pt``, ``.bin``, ``.ckpt``: read with
``weights_only=True``; a Lightning checkpoint's ``state_dict`` entry is used). Non-tensor entries
(TransformerEngine's ``_extra_state``) are dropped.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import Tensor

from hyena_cp.lazy import LazyConfig

__all__ = ["read_config", "read_state_dict", "write_converted", "finetune_config", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML or JSON mapping."""
    text = Path(path).read_text()
    config = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(config, Mapping):
        raise ValueError(f"{path} does not hold a mapping of config keys")
    return dict(config)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The tensors of a checkpoint file (see the module docstring)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(os.fspath(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # Lightning
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def write_converted(cfg: Mapping[str, Any], state: Mapping[str, Tensor], out: str | os.PathLike[str],
                    dtype: torch.dtype = torch.float32) -> Path:
    """``model.safetensors`` (``state`` in ``dtype``) and ``model.yaml`` under ``out``; the weights are
    written to a temporary name first and renamed, so an interrupted run leaves no partial file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    tmp = out / ".model.safetensors.tmp"
    save_file(tensors, os.fspath(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    model = {**cfg, "config_overrides": {**cfg.get("config_overrides", {}), "params_dtype": dtype}}
    LazyConfig.save(OmegaConf.create({"model": model}, flags={"allow_objects": True}), out / "model.yaml")
    return out


def finetune_config(cfg: Mapping[str, Any], out: str | os.PathLike[str], alphabet: str,
                    dtype: torch.dtype = torch.float32, seq_len: int | None = None) -> Path:
    """``train.yaml`` under ``out``: fine-tune the converted model (see the module docstring)."""
    out = Path(out)
    seq_len = seq_len or min(int(cfg["max_sequence_length"]), 1024)
    model = {**cfg, "config_overrides": {**cfg.get("config_overrides", {}), "params_dtype": dtype}}
    train_cfg = {
        "model": model,
        "task": {"_target_": "hyena_cp.train.tasks.LanguageModeling",
                 "data": {"_target_": "hyena_cp.data.stdlib_text.load_stdlib_text", "seq_len": seq_len,
                          "val_fraction": 0.05, "max_bytes": 2_000_000, "alphabet": alphabet},
                 "global_batch_size": 8, "eval_batch_size": 8, "eval_samples": 32, "pack": True},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.01},
        "parallel": {"cp": 1, "tp": 1, "megatron": True, "dp_mode": "fsdp"},
        "train": {"steps": 100, "seed": 0, "log_every": 10, "eval_every": 50, "ckpt_every": 50, "warmup_steps": 10,
                  "clip_grad_norm": 1.0, "init_from": os.fspath(out.resolve()),
                  "output_dir": os.fspath((out / "finetune").resolve())},
    }
    LazyConfig.save(OmegaConf.create(train_cfg, flags={"allow_objects": True}), out / "train.yaml")
    return out / "train.yaml"
