"""Conditioning of a mixer on a per-sample vector ``c: [B, cond_dim]``.

Each module maps ``c`` to ``(scale, shift, gate)``: the mixer computes
``out_proj(scale * y + shift)`` and multiplies that by ``gate`` when it is not None. All
are token-local, so they run unchanged on a sequence shard under context parallelism.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["FiLM", "AdaLNZero", "build_conditioning", "broadcast_tokens"]

Modulation = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def broadcast_tokens(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` -> ``[B, 1, ..., 1, C]`` to broadcast over the token dims of ``like``."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 2)), t.shape[1])


class FiLM(nn.Module):
    """``gamma(c) * y + beta(c)`` with ``[gamma, beta] = Linear(c)``; initialised to the
    identity (gamma=1, beta=0) so conditioning is learned from a neutral start. No gate."""

    def __init__(self, cond_dim: int, hidden_dim: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * hidden_dim)
        nn.init.zeros_(self.proj.weight)
        with torch.no_grad():
            self.proj.bias.copy_(torch.cat([torch.ones(hidden_dim), torch.zeros(hidden_dim)]))

    def forward(self, c: torch.Tensor) -> Modulation:
        gamma, beta = self.proj(c).chunk(2, dim=-1)
        return gamma, beta, None


class AdaLNZero(nn.Module):
    """DiT's adaLN-Zero: ``[shift, scale, gate] = Linear(SiLU(c))``, zero-initialised, used as
    ``gate * out_proj(y * (1 + scale) + shift)``: a fresh mixer outputs zeros, so its
    residual branch starts as the identity."""

    def __init__(self, cond_dim: int, hidden_dim: int):
        super().__init__()
        self.act = nn.SiLU()
        self.proj = nn.Linear(cond_dim, 3 * hidden_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, c: torch.Tensor) -> Modulation:
        shift, scale, gate = self.proj(self.act(c)).chunk(3, dim=-1)
        return 1 + scale, shift, gate


def build_conditioning(kind: str | None, cond_dim: int | None, hidden_dim: int) -> nn.Module | None:
    if kind is None:
        return None
    kinds = {"film": FiLM, "adaln": AdaLNZero}
    if kind not in kinds:
        raise ValueError(f"conditioning={kind!r} is not one of {sorted(kinds)} or None")
    if cond_dim is None or cond_dim < 1:
        raise ValueError(f"conditioning={kind!r} needs cond_dim (the size of the conditioning vector)")
    return kinds[kind](cond_dim, hidden_dim)
