"""The long convolution of a Hyena operator on its own, channels last: ``y = h * x + D x``.

What nvSubquadratic calls a bare ``CKConvND``. It runs the `Hyena` operator with ``q = k = 1``
(multiplying by one is exact), so it has the same filters, masks, boundaries, FiLM conditioning
and context parallelism (x is this rank's shard of the first axis, zigzag when it is causal).
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from hyena_cp.modules.hyena import Hyena

__all__ = ["LongConv"]


class LongConv(nn.Module):
    """``forward(x [B, *S_local, C]) -> [B, *S_local, C]``: ``h * x + D x`` of ``hyena`` (a `Hyena`
    without gates or norms; its parameters are this module's ``hyena.*``)."""

    def __init__(self, hyena: Hyena):
        super().__init__()
        if not isinstance(hyena, Hyena):
            raise ValueError(f"hyena must be a Hyena operator, got {type(hyena).__name__}")
        gating = hyena.gating
        if any(g is not None for g in (gating.inner_gate, gating.outer_gate, gating.k_norm, gating.v_norm,
                                        gating.conv_norm)):
            raise ValueError("LongConv is the bare long conv: build its Hyena without gates or norms "
                             "(inner_gate, outer_gate, qk_norm, conv_norm all None)")
        self.hyena = hyena

    def forward(self, x: torch.Tensor, *, cp_group=None, conditioning: torch.Tensor | None = None) -> torch.Tensor:
        u = rearrange(x, "b ... c -> b c ...")
        one = torch.ones_like(u)
        y = self.hyena(one, one, u, cp_group=cp_group, conditioning=conditioning)  # q * (h * (k * v) + D k v)
        return rearrange(y, "b c ... -> b ... c")
