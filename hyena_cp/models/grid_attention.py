"""Global self-attention over every token of an N-D grid (``[B, L, C]``, ``[B, H, W, C]`` or
``[B, T, H, W, C]``, channels last): QK-norm, axial RoPE, no qkv bias — the attention baseline of
the `hyena_cp.models.ccnn` networks, which attend over all H·W (·T) tokens without patching.

Axial RoPE: a head's ``head_dim / 2`` rotation pairs are dealt out to the D axes in equal
blocks of ``head_dim // (2 D)`` pairs; a block turns by the token's coordinate on its axis times
``theta^(-k / n)`` (k = 0..n-1 within the block); leftover pairs do not turn. The 2-D scheme of
`hyena_cp.models.attention.rope_2d` (rows, then columns) for any number of axes, on whole grids.

Context parallelism (``cp_group`` of P ranks): each rank holds a block of the first axis (the
``"rows"`` layout: rank r has positions ``[r S0/P, (r+1) S0/P)``); queries stay local, keys and
values are rotated with their GLOBAL coordinates and then all-gathered (`all_gather_seq`, backward:
reduce-scatter), so every query attends to the whole grid. Memory: the gathered K and V,
``2 B T C`` per rank and layer (T: all tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from hyena_cp import flops
from hyena_cp.parallel import all_gather_seq, group_rank

__all__ = ["GridAttention", "axial_rope"]


def axial_rope(coords: torch.Tensor, *, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` tables ``[T, head_dim]`` for tokens at integer ``coords [T, D]`` (see module docstring)."""
    axes, pairs = coords.shape[1], head_dim // 2
    per_axis = pairs // axes
    inv_freq = theta ** (-torch.arange(per_axis, dtype=torch.float64, device=coords.device) / max(per_axis, 1))
    angles = [coords[:, a, None].double() * inv_freq for a in range(axes)]  # D x [T, per_axis]
    angles.append(coords.new_zeros(coords.shape[0], pairs - axes * per_axis, dtype=torch.float64))
    angles = torch.cat(angles, dim=-1)  # T, head_dim/2
    angles = torch.cat([angles, angles], dim=-1)  # pairs (i, i + head_dim/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[..., i], x[..., i + d/2])``; ``x: [B, h, T, d]``, tables ``[T, d]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def grid_coords(local_shape: tuple[int, ...], offset: int, device: torch.device) -> torch.Tensor:
    """``[T_local, D]`` global integer coordinates of a block of a grid, row-major, whose first axis
    starts at ``offset``."""
    axes = [torch.arange(n, device=device) for n in local_shape]
    axes[0] = axes[0] + offset
    return torch.stack([t.flatten() for t in torch.meshgrid(*axes, indexing="ij")], dim=1)


class GridAttention(nn.Module):
    """Multi-head self-attention over all tokens of an N-D grid.

    Args:
        dim: channels C.
        num_heads: heads (``dim % num_heads == 0``, ``head_dim >= 2 * spatial_dims`` so every axis
            gets at least one rotation pair).
        spatial_dims: 1, 2 or 3.
        rope_theta: RoPE base (100 suits grids of tens of positions per axis).
        norm_eps: eps of the per-head RMS QK-norm.
    """

    def __init__(self, *, dim: int, num_heads: int, spatial_dims: int, rope_theta: float = 100.0,
                 norm_eps: float = 1e-6):
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims={spatial_dims} must be 1, 2 or 3")
        if num_heads < 1 or dim % num_heads or dim // num_heads < 2 * spatial_dims or (dim // num_heads) % 2:
            raise ValueError(f"attention num_heads={num_heads} must divide dim={dim} into even heads of at least "
                             f"2 * spatial_dims = {2 * spatial_dims} channels (axial RoPE); pick another num_heads")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.spatial_dims, self.rope_theta = spatial_dims, rope_theta
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=norm_eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, *, cp_group=None) -> torch.Tensor:
        """``x: [B, *S_local, C]``, this rank's block of the first axis (the whole grid when
        ``cp_group`` is None) -> the same shape."""
        local = tuple(x.shape[1:-1])
        if len(local) != self.spatial_dims:
            raise ValueError(f"x must be [B, *S, C] with {self.spatial_dims} spatial axes, got {tuple(x.shape)}")
        coords = grid_coords(local, group_rank(cp_group) * local[0], x.device)
        cos, sin = axial_rope(coords, head_dim=self.head_dim, theta=self.rope_theta, dtype=x.dtype)
        tokens = x.flatten(1, -2)  # B, T_local, C
        q, k, v = rearrange(self.qkv(tokens), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        q, k = _rotate(self.q_norm(q), cos, sin), _rotate(self.k_norm(k), cos, sin)
        k, v = all_gather_seq(torch.stack([k, v]), 3, cp_group).unbind(0)  # B, h, T, d (all tokens)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(y, "b h t d -> b t (h d)")).view_as(x)

    def flop_count(self, num_tokens: int, inference: bool = False) -> int:
        """FLOPs of one sample of ``num_tokens`` global tokens (training: 3x forward)."""
        parts = {"qkv": flops.linear(num_tokens, self.dim, 3 * self.dim),
                 "core": flops.attention(num_tokens, num_tokens, self.dim),
                 "proj": flops.linear(num_tokens, self.dim, self.dim)}
        return flops.total(parts, inference)
