"""The job around the model, one concern per file: the device mesh and its process groups by axis
name (`mesh`: ``ParallelDims``, ``init_parallel``), data parallelism with FSDP2 or replication
(`fsdp`), the global gradient norm (`grad_norm`), parameter/gradient/optimizer bytes per rank
(`state_bytes`), liveness of peers (`liveness`) and decisions every rank takes together
(`decisions`). The collectives on the model's path are `hyena_cp.parallel`.
"""
from __future__ import annotations

from .fsdp import DP_MODES, apply_data_parallel, block_modules, full_parameters
from .grad_norm import clip_grad_norm, grad_norm
from .mesh import ParallelDims, ParallelGroups, destroy_parallel, exit_process, init_parallel
from .state_bytes import StateBytes, state_bytes

__all__ = ["DP_MODES", "ParallelDims", "ParallelGroups", "StateBytes", "apply_data_parallel", "block_modules",
           "clip_grad_norm", "destroy_parallel", "exit_process", "full_parameters", "grad_norm", "init_parallel", "state_bytes"]
