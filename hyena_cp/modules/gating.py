"""The gates and norms around Hyena's long conv: ``y = σ_o(q) * (h * z + D z)`` with
``z = N_c(N_k(k) * σ_i(N_v(v)))``, each part optional (`Gating`).

- ``inner_gate`` σ_i acts on v inside the conv, ``outer_gate`` σ_o on q after it (the original Hyena
  has neither; the ViT-5 Hyena recipe uses SiLU inside and Sigmoid outside).
- ``qk_norm`` (``"l2"`` or ``"rmsnorm"``, per token over the channels) normalises k, and also v when
  there is no inner gate (a gate already bounds v) — nvSubquadratic's QK-norm, whose (q, k) are our
  (k, v).
- ``conv_norm`` normalises z before the long conv: per token (``"rmsnorm"``, ``"layernorm"``) or over
  channel groups and every position (``"groupnorm"``, `PositionGroupNorm`: exact under CP).

All but the group norm are token-local, so they run unchanged on a CP shard; under TP the per-token
norms sum their statistics over the TP group (`hyena_cp.modules.norm`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup

from hyena_cp.modules.norm import PositionGroupNorm, build_norm
from hyena_cp.parallel import group_size

__all__ = ["GATES", "Gating"]

GATES = {"silu": torch.nn.functional.silu, "sigmoid": torch.sigmoid, "gelu": torch.nn.functional.gelu,
         "tanh": torch.tanh, "relu": torch.relu}
QK_NORMS = ("l2", "rmsnorm")
CONV_NORMS = ("rmsnorm", "layernorm", "groupnorm")


def _gate(name: str | None, role: str):
    if name is None:
        return None
    if name not in GATES:
        raise ValueError(f"{role}={name!r} must be None or one of {sorted(GATES)}")
    return GATES[name]


def _channels_last(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A per-token norm over the channels of a channels-first ``[B, C, *S]`` tensor."""
    return norm(x.movedim(1, -1)).movedim(-1, 1)


class Gating(nn.Module):
    """The optional gates and norms of one Hyena operator (module docstring). ``dim``: the layer's
    channels C; under TP this rank holds ``C / T`` of them (``tp_group``). ``norm_eps``: eps of the
    norms (None: torch's defaults); ``conv_norm_eps``: the conv norm's own, when it differs."""

    def __init__(self, dim: int, *, inner_gate: str | None = None, outer_gate: str | None = None,
                 qk_norm: str | None = None, conv_norm: str | None = None, conv_norm_groups: int = 1,
                 norm_eps: float | None = None, conv_norm_eps: float | None = None,
                 tp_group: ProcessGroup | None = None):
        super().__init__()
        self.inner_gate, self.outer_gate = _gate(inner_gate, "inner_gate"), _gate(outer_gate, "outer_gate")
        self.names = (inner_gate, outer_gate)
        if qk_norm is not None and qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={qk_norm!r} must be None or one of {list(QK_NORMS)}")
        if conv_norm is not None and conv_norm not in CONV_NORMS:
            raise ValueError(f"conv_norm={conv_norm!r} must be None or one of {list(CONV_NORMS)}")
        if conv_norm == "groupnorm" and group_size(tp_group) > 1:
            raise ValueError("conv_norm='groupnorm' is not supported with tensor parallelism; use 'rmsnorm' or "
                             "'layernorm' (per token), or no TP")
        self.k_norm = None if qk_norm is None else build_norm(qk_norm, dim, tp_group, norm_eps)
        self.v_norm = None if qk_norm is None or inner_gate is not None else build_norm(qk_norm, dim, tp_group, norm_eps)
        conv_eps = norm_eps if conv_norm_eps is None else conv_norm_eps
        if conv_norm == "groupnorm":
            self.conv_norm = PositionGroupNorm(conv_norm_groups, dim, 1e-5 if conv_eps is None else conv_eps)
        else:
            self.conv_norm = None if conv_norm is None else build_norm(conv_norm, dim, tp_group, conv_eps)

    @property
    def token_local(self) -> bool:
        """True when nothing here reads another channel block (the operator may get channel shards)."""
        return self.k_norm is None and self.conv_norm is None

    def inner(self, k: torch.Tensor, v: torch.Tensor, cp_group=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``z`` from this rank's shard of k and v, ``[B, C, *S_local]``; ``mask`` zeroes padding (after the
        norms, so a norm's bias never lands on a padded position)."""
        if self.k_norm is not None:
            k = _channels_last(self.k_norm, k)
        if self.v_norm is not None:
            v = _channels_last(self.v_norm, v)
        z = k * (v if self.inner_gate is None else self.inner_gate(v))
        if isinstance(self.conv_norm, PositionGroupNorm):
            z = self.conv_norm(z, cp_group, mask)
        elif self.conv_norm is not None:
            z = _channels_last(self.conv_norm, z)
        return z if mask is None else z * mask

    def outer(self, q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (q if self.outer_gate is None else self.outer_gate(q)) * y

    def flop_count(self, tokens: int, channels: int) -> int:
        """Elementwise FLOPs per sample: the two products, and each gate and norm at ~1 and ~3 per value."""
        parts = 2 + (self.inner_gate is not None) + (self.outer_gate is not None)
        parts += 3 * sum(n is not None for n in (self.k_norm, self.v_norm, self.conv_norm))
        return parts * tokens * channels
