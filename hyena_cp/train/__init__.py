"""Training: the data x tensor x context parallel loop, tasks, checkpoints and metrics.

Entry point: ``launch/train.py`` (``torchrun ... launch/train.py configs/<name>.py key=value``),
which calls `train`. Collectives come from `hyena_cp.parallel` (`distributed.mesh` builds the
DeviceMesh, `distributed.fsdp` shards the model and reduces gradients with FSDP2,
`distributed.grad_norm` clips them); this package only composes them.
"""
from __future__ import annotations

from .checkpoint import CheckpointError, Checkpointer, load_model_state, load_optimizer_state
from .config import ParallelConfig, TrainConfig, with_defaults
from .loop import Trainer, train
from .nonfinite import NonFiniteError
from .tasks import ImageClassification, LanguageModeling, Task

__all__ = ["CheckpointError", "Checkpointer", "ImageClassification", "LanguageModeling", "NonFiniteError",
           "ParallelConfig", "Task", "TrainConfig", "Trainer", "load_model_state", "load_optimizer_state", "train",
           "with_defaults"]
