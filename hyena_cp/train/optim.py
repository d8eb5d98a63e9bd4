"""Optimizer parameter groups: which parameters weight decay applies to (timm / megatron-core).

Policy ``"timm"`` (the default) exempts from decay every parameter with ``ndim <= 1`` -- norm
weights and biases, linear/conv biases, LayerScale gammas, Hyena's skip ``D`` and the
filter's sine frequencies (timm's ``param_groups_weight_decay`` and megatron-core's rule) --
and every parameter whose name matches one of the ``no_weight_decay`` patterns
(`fnmatch`, on the unwrapped model's ``named_parameters()`` names): by default the learned
position embedding, CLS and register tokens (timm's ``no_weight_decay()`` of a ViT) and all
parameters of Hyena's implicit filter and its mask (safari builds the filter MLP with ``wd=0``): decaying
a filter MLP's weights pulls every long filter towards the decay window alone. Embedding and
projection matrices decay. ``"all"``: one group, every parameter decays (torch's default).

The groups hold the parameters the optimizer sees: under FSDP2 the ``DTensor`` shards (whose
``ndim`` is the full tensor's) and under TP megatron's local shards (same ``ndim``, same
names), so every rank makes the same split. The optimizer's per-parameter state is keyed by
parameter name in checkpoints (`hyena_cp.train.checkpoint`) and the groups' hyper-parameters
come from the config, so changing the policy does not change what a checkpoint holds.

A parameter without a gradient (unused in the forward) is skipped by ``torch.optim``
(no decay, no moment update, no step count): FSDP2 leaves such gradients None, and nothing
in the loop fills them in.
"""
from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

__all__ = ["NO_WEIGHT_DECAY", "WEIGHT_DECAY_POLICIES", "decays", "param_groups"]

WEIGHT_DECAY_POLICIES = ("timm", "all")
NO_WEIGHT_DECAY = ("*pos_embed", "*cls_token", "*reg_tokens", "*.filter.*", "*.mask.*")


def decays(name: str, param: nn.Parameter, policy: str, no_weight_decay: Iterable[str]) -> bool:
    """Whether weight decay applies to parameter ``name`` under ``policy`` (see the module docstring)."""
    if policy not in WEIGHT_DECAY_POLICIES:
        raise ValueError(f"train.weight_decay_policy={policy!r} must be one of {list(WEIGHT_DECAY_POLICIES)}")
    if policy == "all":
        return True
    return param.ndim > 1 and not any(fnmatchcase(name, pattern) for pattern in no_weight_decay)


def param_groups(model: nn.Module, policy: str, no_weight_decay: Iterable[str]) -> list[dict[str, Any]]:
    """``[{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]`` for ``torch.optim``
    (the first group takes the optimizer's own ``weight_decay``); empty groups are left out."""
    patterns = tuple(no_weight_decay)
    decayed, exempt = [], []
    for name, param in model.named_parameters():
        (decayed if decays(name, param, policy, patterns) else exempt).append(param)
    groups = [{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
