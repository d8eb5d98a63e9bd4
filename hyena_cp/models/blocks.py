"""ViT-5 block (Wang et al. 2026, arXiv 2602.08071) and its parts.

``x = x + drop_path(ls1 * mixer(norm1(x)))``, ``x = x + drop_path(ls2 * mlp(norm2(x)))``:
pre-norm RMSNorm (eps 1e-6), LayerScale (init 1e-4), GELU MLP (ratio 4), stochastic
depth at the same rate in every block. The token mixer is chosen per block: Hyena
(`ViT5HyenaAdapter` around `QKVSequenceMixer(Hyena)`) or attention (`Attention2d`); both are
called as ``mixer(x, cp_group=..., num_valid_tokens=...)`` on ``[B, T_local, C]``.

Everything here except the mixer is token-local, so it runs unchanged on a CP shard.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hyena_cp import flops
from hyena_cp.lazy import LazyCall
from hyena_cp.models.adapter import ViT5HyenaAdapter
from hyena_cp.models.attention import Attention2d
from hyena_cp.models.token_grid import StageGrid
from hyena_cp.modules.hyena import Hyena
from hyena_cp.modules.mixer import QKVSequenceMixer

__all__ = ["MIXERS", "DropPath", "LayerScale", "Mlp", "ViT5Block", "build_mixer", "init_weights_vit5"]

MIXERS = ("hyena", "attention")
NORM_EPS = 1e-6
# Keys of the Hyena config that the network sets from each stage's layout.
_NETWORK_HYENA_KEYS = ("hidden_dim", "spatial_dims", "max_grid", "max_len")


class LayerScale(nn.Module):
    """Per-channel residual-branch scale ``gamma * x``, ``gamma`` initialised to ``init``."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's residual branch with probability ``rate`` (training).

    The per-sample mask is drawn from the default torch generator, one ``[B]`` draw per call,
    on every CP rank alike: ranks of one CP group seeded identically draw identical masks
    (the network makes the same draws in the same order on every rank).
    """

    def __init__(self, rate: float):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path_rate={rate} must be in [0, 1)")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty(x.shape[0], *[1] * (x.dim() - 1)).bernoulli_(keep)  # B, 1, 1
        return x * mask / keep


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``, hidden width ``ratio * dim``; ``bias``: of both linears."""

    def __init__(self, dim: int, ratio: float, bias: bool = True):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def build_mixer(kind: str, *, dim: int, grid: StageGrid, attention_heads: int, hyena: dict[str, Any],
                mixer: dict[str, Any], max_cp_size: int, rope_theta: float) -> nn.Module:
    """The token mixer of one block of a stage with grid ``grid``.

    ``"hyena"``: ``ViT5HyenaAdapter(QKVSequenceMixer(Hyena(spatial_dims=2)), grid_w)`` where the
    network fixes ``hidden_dim``, ``grid_w`` and, for the default filter, ``max_grid =
    (grid.filter_rows(max_cp_size), grid_w)`` — an absolute positional reference, so the filter
    does not depend on the CP padding — and ``hyena`` / ``mixer`` hold the remaining `Hyena` /
    `QKVSequenceMixer` keyword arguments. A ``hyena["filter"]`` brings its own reference and must
    be absolute (e.g. `SirenFilter`: taps at ``offset / (L_cache - 1)`` whatever the grid).
    ``"attention"``: `Attention2d` with ``attention_heads`` heads.
    """
    if kind == "attention":
        return Attention2d(dim=dim, num_heads=attention_heads, grid_w=grid.grid_w, num_patches=grid.num_patches,
                           rope_theta=rope_theta, norm_eps=NORM_EPS)
    if kind != "hyena":
        raise ValueError(f"mixer {kind!r} is not one of {MIXERS}")
    clash = sorted(set(hyena) & set(_NETWORK_HYENA_KEYS)) + sorted(set(mixer) & {"hidden_dim", "hyena"})
    if clash:
        raise ValueError(f"{clash} are set by the network from each stage's layout; remove them from the "
                         f"hyena=/mixer= config")
    own_filter = hyena.get("filter") is not None
    reference = {} if own_filter else {"max_grid": (grid.filter_rows(max_cp_size), grid.grid_w)}
    hyena_cfg = LazyCall(Hyena)(hidden_dim=dim, spatial_dims=2, **reference, **hyena)
    adapter = ViT5HyenaAdapter(LazyCall(QKVSequenceMixer)(hidden_dim=dim, hyena=hyena_cfg, **mixer), grid_w=grid.grid_w)
    if own_filter and not adapter.inner_mixer.hyena.filter.absolute:
        raise ValueError("hyena['filter'] must be absolute (the same function of the tap offset at every grid size, "
                         "e.g. SirenFilter): the network pads the grid under context parallelism")
    return adapter


class ViT5Block(nn.Module):
    """Pre-norm residual block with a given token ``mixer`` (see module docstring)."""

    def __init__(self, *, dim: int, mixer: nn.Module, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale_init: float = 1e-4, mlp_bias: bool = True):
        super().__init__()
        self.norm1, self.mixer, self.ls1 = nn.RMSNorm(dim, eps=NORM_EPS), mixer, LayerScale(dim, layer_scale_init)
        self.norm2, self.ls2 = nn.RMSNorm(dim, eps=NORM_EPS), LayerScale(dim, layer_scale_init)
        self.mlp = Mlp(dim, mlp_ratio, mlp_bias)
        self.drop_path1, self.drop_path2 = DropPath(drop_path), DropPath(drop_path)

    def forward(self, x: torch.Tensor, *, cp_group=None, num_valid_tokens: int | None = None) -> torch.Tensor:
        """``x: [B, T_local, C]`` (this rank's block of the stage layout) -> same shape."""
        mixed = self.mixer(self.norm1(x), cp_group=cp_group, num_valid_tokens=num_valid_tokens)
        x = x + self.drop_path1(self.ls1(mixed))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def flop_breakdown(self, num_tokens: int) -> dict[str, float]:
        """Forward FLOPs of one sample of ``num_tokens`` global tokens, keyed ``"hyena.*"`` or
        ``"attention.*"`` for the mixer, ``"mlp"``; norms, LayerScale and residual adds (elementwise)
        are not counted."""
        if isinstance(self.mixer, ViT5HyenaAdapter):
            inner = self.mixer.inner_mixer.flop_breakdown(num_tokens, grid_w=self.mixer.grid_w)
            parts = {f"hyena.{k}": v for k, v in inner.items()}
        else:
            parts = {f"attention.{k}": v for k, v in self.mixer.flop_breakdown(num_tokens).items()}
        dim, hidden = self.mlp.fc1.in_features, self.mlp.fc1.out_features
        parts["mlp"] = flops.linear(num_tokens, dim, hidden) + flops.linear(num_tokens, hidden, dim)
        return parts


def init_weights_vit5(module: nn.Module) -> None:
    """timm's ViT init (truncated normal, std 0.02, zero bias) for every ``nn.Linear`` under
    ``module`` except inside Hyena mixers, which keep their own init (the implicit filter's
    sin-MLP depends on it)."""
    if isinstance(module, ViT5HyenaAdapter):
        return
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    for child in module.children():
        init_weights_vit5(child)
