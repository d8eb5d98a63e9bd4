"""The run's model from its config, built on the run mesh's process groups where it takes them."""
from __future__ import annotations

from typing import Any

from torch import nn

from hyena_cp.distributed.mesh import ParallelGroups
from hyena_cp.lazy import instantiate, takes_keyword

__all__ = ["build_model"]


def build_model(cfg_model: Any, groups: ParallelGroups, *, megatron: bool) -> nn.Module:
    """``instantiate(cfg_model)`` on ``groups.device``.

    With ``parallel.megatron`` a model whose builder takes ``pg_collection``
    (`hyena_cp.megatron.build_hyena_lm`, `hyena_cp.megatron.HyenaLanguageModel`) is built on the run
    mesh's own groups (`hyena_cp.megatron.groups.mesh_pg_collection`). A megatron-core module built
    without groups reads megatron's ``parallel_state`` instead, which `init_parallel` initialises
    over the same ranks (`hyena_cp.megatron.compat`)."""
    overrides = {}
    if megatron and takes_keyword(cfg_model, "pg_collection"):
        from hyena_cp.megatron.groups import mesh_pg_collection  # megatron-core only when used

        overrides["pg_collection"] = mesh_pg_collection(groups)
    return instantiate(cfg_model, **overrides).to(groups.device)
