"""Norms of the mixer: per token over the channels (``q * y`` before out_proj, the QK-norm, the norm
before the long conv), also when those channels are split over tensor parallelism; and a group
norm over channels AND positions, also when the positions are split over context parallelism.

`build_norm(kind, dim)` is torch's ``nn.LayerNorm`` / ``nn.RMSNorm``, an `L2Norm` (``x / ||x||``,
no weight), or Identity. With a TP group of size T, each rank holds C/T of the C channels, so the
statistics are sums over the TP group: `TensorParallelNorm` computes them with `all_reduce_sum`
(forward: sum; backward: sum, the exact adjoint, since each rank uses the statistics for different
channels) and holds this rank's C/T slice of the weight (and bias). Numerics follow torch's norms
(biased variance; LayerNorm eps 1e-5, RMSNorm eps = ``finfo(dtype).eps`` unless ``eps`` is given;
L2 ``max(||x||, 1e-12)``), so a TP norm equals the single-process one.

`PositionGroupNorm` is ``nn.GroupNorm``'s math on channels-first ``[B, C, *S]``: statistics per
sample and group over the group's channels and every (real) position. Under CP a rank holds a
shard of the positions, so its partial sums go through one `all_reduce_sum` over the cp_group
(3 values per sample and group; the exact adjoint in backward) and every rank normalises with
the global statistics: the CP result equals the single-process one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from hyena_cp.parallel import all_reduce_sum, group_rank, group_size

__all__ = ["NORMS", "TensorParallelNorm", "L2Norm", "PositionGroupNorm", "build_norm"]

NORMS = ("layernorm", "rmsnorm", "l2")
L2_EPS = 1e-12  # F.normalize's


class TensorParallelNorm(nn.Module):
    """LayerNorm or RMSNorm over ``dim`` channels of which this TP rank holds ``dim / T``.

    Args:
        kind: "layernorm" or "rmsnorm".
        dim: channels of the whole layer (all TP ranks together).
        tp_group: the tensor-parallel group; this rank's channels are the contiguous block
            ``[t*dim/T, (t+1)*dim/T)``. Weights start at 1, biases at 0 (torch's init).
    """

    def __init__(self, kind: str, dim: int, tp_group: ProcessGroup | None, eps: float | None = None):
        super().__init__()
        if kind not in NORMS:
            raise ValueError(f"norm={kind!r} is not one of {list(NORMS)} or None")
        tp = group_size(tp_group)
        if dim % tp:
            raise ValueError(f"norm dim={dim} must be divisible by the TP size {tp}")
        self.kind, self.dim, self.tp_group = kind, dim, tp_group
        self.eps = eps if eps is not None else (1e-5 if kind == "layernorm" else None)
        self.weight = nn.Parameter(torch.ones(dim // tp)) if kind != "l2" else None
        self.bias = nn.Parameter(torch.zeros(dim // tp)) if kind == "layernorm" else None

    def _mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over ALL channels of a per-rank channel slice ``[..., C/T]`` -> ``[..., 1]``."""
        return all_reduce_sum(values.sum(-1, keepdim=True), self.tp_group) / self.dim

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """``y``: ``[..., dim / T]``, this rank's channels of every token."""
        if self.kind == "l2":
            return y / (self._mean(y * y) * self.dim).sqrt().clamp_min(L2_EPS)
        eps = torch.finfo(y.dtype).eps if self.eps is None else self.eps
        if self.kind == "layernorm":
            y = y - self._mean(y)
        y = y * torch.rsqrt(self._mean(y * y) + eps)
        y = y * self.weight
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.kind}, dim={self.dim}, tp_rank={group_rank(self.tp_group)} of {group_size(self.tp_group)}"


class L2Norm(nn.Module):
    """``x / max(||x||_2, 1e-12)`` over the last dim (``F.normalize``): no weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=-1, eps=L2_EPS)


def build_norm(kind: str | None, dim: int, tp_group: ProcessGroup | None = None,
               eps: float | None = None) -> nn.Module:
    """A per-token norm over the last dim: Identity for None, torch's norm (or `L2Norm`) in one
    process, else `TensorParallelNorm`. ``eps``: None for torch's default."""
    if kind is None:
        return nn.Identity()
    if kind not in NORMS:
        raise ValueError(f"norm={kind!r} is not one of {list(NORMS)} or None")
    if group_size(tp_group) > 1:
        return TensorParallelNorm(kind, dim, tp_group, eps)
    if kind == "l2":
        return L2Norm()
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=1e-5 if eps is None else eps)
    return nn.RMSNorm(dim, eps=eps)


class PositionGroupNorm(nn.Module):
    """GroupNorm over ``[B, C, *S]`` with statistics over each group's channels and all positions, exact
    under CP (module docstring). ``mask`` (1 = real token) keeps padded positions out of the statistics."""

    def __init__(self, num_groups: int, dim: int, eps: float = 1e-5):
        super().__init__()
        if num_groups < 1 or dim % num_groups:
            raise ValueError(f"conv_norm_groups={num_groups} must divide the channels {dim}")
        self.num_groups, self.dim, self.eps = num_groups, dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, z: torch.Tensor, cp_group: ProcessGroup | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``z``: ``[B, C, *S_local]``, this rank's positions of every channel."""
        b, c = z.shape[:2]
        zg = z.reshape(b, self.num_groups, -1)  # B, G, (C/G)*S_local
        m = None if mask is None else mask.expand_as(z).reshape(b, self.num_groups, -1)
        count = torch.full_like(zg[..., 0], zg.shape[-1]) if m is None else m.sum(-1)
        masked = zg if m is None else zg * m
        sums = torch.stack([masked.sum(-1), (masked * zg).sum(-1), count], dim=-1)  # B, G, 3
        sums = all_reduce_sum(sums, cp_group) if group_size(cp_group) > 1 else sums
        mean = sums[..., 0] / sums[..., 2]
        var = (sums[..., 1] / sums[..., 2] - mean * mean).clamp_min(0)
        y = (zg - mean[..., None]) * torch.rsqrt(var[..., None] + self.eps)
        shape = (1, c) + (1,) * (z.dim() - 2)
        return y.reshape(z.shape) * self.weight.reshape(shape) + self.bias.reshape(shape)
