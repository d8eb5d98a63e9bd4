"""Start a run from another run's weights: a curriculum over runs (short sequences first, then
longer ones) without repeating the short stage in every config.

In a config, wrap the model's call::

    model = LazyCall(warm_start)(model=LazyConfig.load_rel("recall_ar_2k.py", "model"),
                                 checkpoint="outputs/recall_ar_2k")

The model is built as usual, then every tensor of its state dict is overwritten with the
checkpoint's (verified, `hyena_cp.train.verify`); the optimizer state, the step and the
learning-rate schedule are NOT taken over: the run starts at step 0 with a fresh optimizer.
When the run has checkpoints of its own (a restart), the loop resumes from those and
overwrites these weights, as it should.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from hyena_cp.train.checkpoint import load_model_state
from hyena_cp.train.generate import latest_checkpoint, load_full_state

__all__ = ["checkpoint_folder", "warm_start"]


def checkpoint_folder(path: str | os.PathLike[str]) -> Path:
    """A ``step_N`` folder from a run's output folder (its newest verified checkpoint), a
    ``checkpoints`` folder (likewise) or a ``step_N`` folder itself."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not path.is_dir():
        raise FileNotFoundError(f"warm_start checkpoint={str(path)!r} does not exist; train that run first (its "
                                f"config's docstring names it) or point to a run's output folder")
    return latest_checkpoint(path)


def warm_start(model: nn.Module, checkpoint: str) -> nn.Module:
    """``model`` with the weights of ``checkpoint`` (see `checkpoint_folder`); every tensor of the
    model must be in it with the same full shape (a megatron-core model takes its TP piece)."""
    load_full_state(model, load_model_state(checkpoint_folder(checkpoint)), getattr(model, "tp_group", None))
    return model
