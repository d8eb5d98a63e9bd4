"""ViT-5 attention token mixer: QK-norm, no qkv bias, 2-D RoPE on patch tokens, and
context parallelism by gathering keys and values.

Under CP each rank holds a block of whole grid rows ``[B, T_local, C]`` of a stage's token
layout (see `hyena_cp.models.token_grid`). Queries stay local; keys and values (after QK-norm
and RoPE) are all-gathered over the CP group (`all_gather_seq`, whose backward is a
reduce-scatter: the exact adjoint), so each rank attends its queries to the whole
sequence. Memory: every attention layer keeps the gathered K and V for backward,
``2 * B * T * C`` elements per rank — P times the K/V of its own shard (for T = 210
tokens, C = 384, that is 161k elements per sample, small next to the activations at the
resolutions this is meant for; ring attention would avoid it at the cost of P steps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from hyena_cp import flops
from hyena_cp.parallel import all_gather_seq, group_rank

__all__ = ["Attention2d", "rope_2d"]


def rope_2d(positions: torch.Tensor, *, grid_w: int, num_patches: int, head_dim: int, theta: float,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2-D RoPE tables ``(cos, sin)``, each ``[T, head_dim]``, for GLOBAL flat positions.

    Patch tokens (``position < num_patches``) rotate the first half of their rotation pairs by
    ``row * f`` and the second half by ``col * f`` (``f = theta^(-k / (head_dim/4))``);
    CLS, registers and padding get the identity (angle 0): they have no grid position.
    """
    quarter = head_dim // 4
    inv_freq = theta ** (-torch.arange(quarter, dtype=torch.float64, device=positions.device) / quarter)
    rows, cols = (positions // grid_w).double(), (positions % grid_w).double()
    angles = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)  # T, head_dim/2
    angles = torch.where((positions < num_patches)[:, None], angles, 0.0)
    angles = torch.cat([angles, angles], dim=-1)  # T, head_dim (pairs (i, i + head_dim/2))
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[..., i], x[..., i + d/2])``; ``x: [B, h, T, d]``, tables ``[T, d]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention2d(nn.Module):
    """Multi-head self-attention over one stage's token layout.

    Args:
        dim: channels C.
        num_heads: attention heads (``dim % num_heads == 0``, head_dim divisible by 4 for
            the axial 2-D RoPE). No constraint from the CP size: K/V are gathered.
        grid_w: the stage's grid width (flat position p is at row p // grid_w, col p % grid_w).
        num_patches: patch tokens of the stage; later positions get no rotation.
        rope_theta: RoPE base (100 suits grids of tens of rows, as in RoPE-ViT).
        norm_eps: epsilon of the per-head RMS QK-norm.
    """

    def __init__(self, *, dim: int, num_heads: int, grid_w: int, num_patches: int, rope_theta: float = 100.0,
                 norm_eps: float = 1e-6):
        super().__init__()
        if num_heads < 1 or dim % num_heads or (dim // num_heads) % 4:
            raise ValueError(f"attention num_heads={num_heads} must divide dim={dim} into heads whose size is a "
                             f"multiple of 4 (2-D RoPE); pick another num_heads for this stage")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.grid_w, self.num_patches, self.rope_theta = grid_w, num_patches, rope_theta
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=norm_eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, *, cp_group=None, num_valid_tokens: int | None = None) -> torch.Tensor:
        """``x: [B, T_local, C]``, this rank's block of the stage layout (global when
        ``cp_group`` is None). Keys at global position ``>= num_valid_tokens`` are masked
        out. Returns ``[B, T_local, C]``."""
        t_local = x.shape[1]
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        positions = group_rank(cp_group) * t_local + torch.arange(t_local, device=x.device)
        cos, sin = rope_2d(positions, grid_w=self.grid_w, num_patches=self.num_patches, head_dim=self.head_dim,
                           theta=self.rope_theta, dtype=x.dtype)
        q, k = _rotate(self.q_norm(q), cos, sin), _rotate(self.k_norm(k), cos, sin)
        k, v = all_gather_seq(torch.stack([k, v]), 3, cp_group).unbind(0)  # B, h, T, d (global, natural order)
        mask = None
        if num_valid_tokens is not None and num_valid_tokens < k.shape[2]:
            mask = (torch.arange(k.shape[2], device=x.device) < num_valid_tokens)[None, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))

    def flop_breakdown(self, num_tokens: int) -> dict[str, float]:
        """Forward FLOPs for one sample of ``num_tokens`` global tokens (all of them attend)."""
        return {"qkv": flops.linear(num_tokens, self.dim, 3 * self.dim),
                "core": flops.attention(num_tokens, num_tokens, self.dim),
                "proj": flops.linear(num_tokens, self.dim, self.dim)}

    def flop_count(self, num_tokens: int, inference: bool = False) -> int:
        return flops.total(self.flop_breakdown(num_tokens), inference)
