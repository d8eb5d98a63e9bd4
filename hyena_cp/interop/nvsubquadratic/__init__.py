"""nvSubquadratic 0.2.0 configs and checkpoints as hyena_cp modules: `convert`.

``convert(cfg, state_dict=None) -> (config, state_dict)``: ``cfg`` is an nvSubquadratic config node as
plain data (nested dicts and lists with ``__target__`` dotted strings, e.g.
``OmegaConf.to_container(cfg, resolve=True)`` of its ``LazyConfig``), or a resolvable ``DictConfig``;
nvSubquadratic need not be installed. The result is our config node, built by `hyena_cp.instantiate`,
and our state_dict for ``load_state_dict(strict=True)``. The converted module computes the same
function: one process, and under context parallelism given each rank's shard and ``cp_group``.

What converts (the module returned):

- ``QKVSequenceMixer`` with ``Hyena`` + ``CKConvND``, 1/2/3-D -> `QKVSequenceMixer` (same input
  ``[B, *S, C]``, channels last; ``conditioning=`` for FiLM kernels). Every kernel class, mask, gate,
  norm and boundary of nvSubquadratic 0.2.0: `hyena_cp.interop.nvsubquadratic.kernels`,
  `hyena_cp.interop.nvsubquadratic.mixer`.
- ``ViT5HyenaAdapter`` -> `ViT5HyenaAdapter` (``[B, T, C]``).
- a bare ``CKConvND`` -> `LongConv` (``y = h * x + D x`` on ``[B, *S, C]``).
- ``ViT5ClassificationNet`` and ``ViT5HierarchicalClassificationNet`` (layout "pure") -> ours
  (`hyena_cp.interop.nvsubquadratic.networks`). Input: ours takes images ``[B, C_in, H, W]`` and returns
  logits; theirs takes ``{"input": [B, H, W, C_in]}`` and returns ``{"logits": ...}``:
  ``ours(x.permute(0, 3, 1, 2)) == theirs({"input": x})["logits"]``.

Permutations: their ``(q, k, v)`` are our ``(k', v', q')``, so the row blocks of ``qkv_proj`` and the
channel blocks of the short conv go ``[q; k; v] -> [v; q; k]`` (`mixer.QKV_TO_OURS`); their ``q_norm``
is our ``k_norm``, their ``k_norm`` our ``v_norm``; ``L_cache`` is halved on circular axes as
CKConvND does before building its kernel. Refused with a ``ValueError`` naming the key: settings with
no exact counterpart (each module's docstring says which and why) and any key or ``__target__`` the
converter does not know. Init callables only decide initial weights: ``small_init`` and Wang's init
map to ours, nvSubquadratic's other inits are dropped (`hyena_cp.interop.nvsubquadratic.inits`).

Numbers: nvSubquadratic computes its kernels, masks, FFTs and RMS norms in float32 even in a float64
model; ours follow the model's dtype, so float64 models agree with nvSubquadratic's definition to
rounding (~1e-13) and with its float64 outputs to its float32 rounding (~1e-6). Parameter clamps
(Gaussian widths, learnable ω scales) happen in place before nvSubquadratic's forward and inside ours:
equal outputs, and equal gradients while the parameters are inside their range.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import Container, DictConfig, OmegaConf

from hyena_cp.interop.nvsubquadratic.mixer import QKV_TO_OURS, convert_adapter, convert_bare_ckconv, convert_qkv_mixer
from hyena_cp.interop.nvsubquadratic.networks import convert_classification_net, convert_hierarchical_net
from hyena_cp.interop.nvsubquadratic.nodes import Node, StateMap

__all__ = ["convert", "QKV_TO_OURS"]


def _mixer(node: Node) -> tuple[DictConfig, StateMap]:
    plan = convert_qkv_mixer(node)
    return plan.config(), plan.state


_CONVERTERS = {
    "QKVSequenceMixer": _mixer,
    "ViT5HyenaAdapter": convert_adapter,
    "CKConvND": convert_bare_ckconv,
    "ViT5ClassificationNet": convert_classification_net,
    "ViT5HierarchicalClassificationNet": convert_hierarchical_net,
}


def convert(cfg: Mapping[str, Any] | DictConfig,
            state_dict: Mapping[str, torch.Tensor] | None = None) -> tuple[DictConfig, dict[str, torch.Tensor] | None]:
    """nvSubquadratic 0.2.0 ``cfg`` (and its module's ``state_dict``) -> our config node (and
    state_dict). ``ValueError`` naming the key for anything that does not convert exactly."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, Container) else cfg
    if not isinstance(data, Mapping):
        raise ValueError(f"cfg must be an nvSubquadratic config node (a mapping with __target__), got {type(cfg)}")
    node = Node(data, "")
    if node.root != "nvsubquadratic" or node.name not in _CONVERTERS:
        node.fail("__target__", f"{node.target!r}: converts from nvsubquadratic's {sorted(_CONVERTERS)}")
    config, state = _CONVERTERS[node.name](node)
    return config, None if state_dict is None else state.apply(state_dict)
