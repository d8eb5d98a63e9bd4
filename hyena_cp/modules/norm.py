"""Norms over the channels of ``q * y``, also when those channels are split over tensor parallelism.

`build_norm(kind, dim)` is torch's ``nn.LayerNorm`` / ``nn.RMSNorm`` (or Identity). With a TP
group of size T, each rank holds C/T of the C channels, so the statistics are sums over the
TP group: `TensorParallelNorm` computes them with `all_reduce_sum` (forward: sum; backward:
sum, the exact adjoint, since each rank uses the statistics for different channels) and
holds this rank's C/T slice of the weight (and bias). Numerics follow torch's norms (biased
variance; LayerNorm eps 1e-5, RMSNorm eps = ``finfo(dtype).eps``), so a TP norm equals the
single-process one.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup

from hyena_cp.parallel import all_reduce_sum, group_rank, group_size

__all__ = ["NORMS", "TensorParallelNorm", "build_norm"]

NORMS = ("layernorm", "rmsnorm")


class TensorParallelNorm(nn.Module):
    """LayerNorm or RMSNorm over ``dim`` channels of which this TP rank holds ``dim / T``.

    Args:
        kind: "layernorm" or "rmsnorm".
        dim: channels of the whole layer (all TP ranks together).
        tp_group: the tensor-parallel group; this rank's channels are the contiguous block
            ``[t*dim/T, (t+1)*dim/T)``. Weights start at 1, biases at 0 (torch's init).
    """

    def __init__(self, kind: str, dim: int, tp_group: ProcessGroup | None):
        super().__init__()
        if kind not in NORMS:
            raise ValueError(f"norm={kind!r} is not one of {list(NORMS)} or None")
        tp = group_size(tp_group)
        if dim % tp:
            raise ValueError(f"norm dim={dim} must be divisible by the TP size {tp}")
        self.kind, self.dim, self.tp_group = kind, dim, tp_group
        self.eps = 1e-5 if kind == "layernorm" else None
        self.weight = nn.Parameter(torch.ones(dim // tp))
        self.bias = nn.Parameter(torch.zeros(dim // tp)) if kind == "layernorm" else None

    def _mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over ALL channels of a per-rank channel slice ``[..., C/T]`` -> ``[..., 1]``."""
        return all_reduce_sum(values.sum(-1, keepdim=True), self.tp_group) / self.dim

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """``y``: ``[..., dim / T]``, this rank's channels of every token."""
        eps = torch.finfo(y.dtype).eps if self.eps is None else self.eps
        if self.kind == "layernorm":
            y = y - self._mean(y)
        y = y * torch.rsqrt(self._mean(y * y) + eps)
        y = y * self.weight
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.kind}, dim={self.dim}, tp_rank={group_rank(self.tp_group)} of {group_size(self.tp_group)}"


def build_norm(kind: str | None, dim: int, tp_group: ProcessGroup | None = None) -> nn.Module:
    """The norm of ``q * y``: Identity for None, torch's norm in one process, else `TensorParallelNorm`."""
    if kind is None:
        return nn.Identity()
    if kind not in NORMS:
        raise ValueError(f"norm={kind!r} is not one of {list(NORMS)} or None")
    if group_size(tp_group) > 1:
        return TensorParallelNorm(kind, dim, tp_group)
    return nn.LayerNorm(dim) if kind == "layernorm" else nn.RMSNorm(dim)
