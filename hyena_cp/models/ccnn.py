"""CCNN: a dense N-D network (the residual continuous-kernel CNN of Knigge, Romero et al. 2023) with
Hyena or attention token mixing, for per-position outputs on a grid (regression, segmentation).

``x [B, *S, C_in] -> pointwise in_proj -> depth x block -> norm -> pointwise out_proj -> [B, *S, C_out]``,
channels last, S = ``(L,)``, ``(H, W)`` or ``(T, H, W)``; no convolution or patching outside the
mixers, so every output position sees the whole input only through the token mixers. A block
is pre-norm residual: ``x = x + mixer(norm1(x))``, ``x = x + mlp(norm2(x))`` (GELU MLP). The mixer of
each block (``mixers``: one name for every block or one per block, as for the ViT-5 networks):

- ``"hyena"``: ``QKVSequenceMixer(Hyena(spatial_dims=D))`` — the N-D operator with whatever
  filter, mask, gates and norms ``hyena=`` / ``mixer=`` give it (the network sets ``hidden_dim``,
  ``spatial_dims`` and, for the default filter, ``max_grid``; ``filter`` / ``mask`` are factories —
  a class, ``functools.partial`` or a ``_partial_`` config — so that every block builds its own).
- ``"attention"``: `GridAttention` — global attention over all tokens, axial RoPE, QK-norm.

Context parallelism (``cp_group`` of P ranks): every rank receives the FULL input batch (as
the ViT-5 networks do) and keeps its own block of the first spatial axis (`layout`: contiguous
blocks, rows of a canvas or frames of a volume; zigzag if the Hyena's first axis is causal, which
attention blocks do not support), so ``S0 % P == 0`` (``2P`` for zigzag). Everything but the
mixers is position-local; the output is this rank's block ``[B, S0/P, *S_rest, C_out]``:
`local_part` cuts the matching block of a full target, and a loss that is a sum over positions
divided by the GLOBAL count, computed on each rank's block, adds up over the ranks to the
single-process loss (the training loop's invariant). The input's gradient on each rank is nonzero on its own block only; summed over
the ranks it is the single-process gradient.

Cross-rank agreement (``check_agreement="always"``): the input shapes are compared once per
forward, before the first collective; the blocks then run inside `hyena_cp.parallel.agreed`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hyena_cp.models.blocks import MIXERS, Mlp
from hyena_cp.models.grid_attention import GridAttention
from hyena_cp.modules.hyena import Hyena
from hyena_cp.modules.mixer import QKVSequenceMixer
from hyena_cp.parallel import agreement, check_agreement_policy, check_divisible, group_rank, group_size, shape_of, shard

__all__ = ["CCNN", "CCNNBlock"]

NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}
_NETWORK_KEYS = ("hidden_dim", "spatial_dims", "max_grid", "max_len")


class CCNNBlock(nn.Module):
    """``x = x + mixer(norm1(x))``, ``x = x + mlp(norm2(x))`` on ``[B, *S_local, C]``."""

    def __init__(self, *, dim: int, mixer: nn.Module, mlp_ratio: float, norm: str, norm_eps: float):
        super().__init__()
        self.norm1, self.mixer = NORMS[norm](dim, eps=norm_eps), mixer
        self.norm2, self.mlp = NORMS[norm](dim, eps=norm_eps), Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, *, cp_group=None) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x), cp_group=cp_group)
        return x + self.mlp(self.norm2(x))


def _build_mixer(kind: str, *, dim: int, grid: tuple[int, ...], hyena: dict[str, Any], mixer: dict[str, Any],
                 attention: dict[str, Any]) -> nn.Module:
    if kind == "attention":
        return GridAttention(dim=dim, spatial_dims=len(grid), **attention)
    clash = sorted(set(hyena) & set(_NETWORK_KEYS)) + sorted(set(mixer) & {"hidden_dim", "hyena"})
    if clash:
        raise ValueError(f"{clash} are set by the network (width and grid); remove them from the hyena=/mixer= config")
    # the default filter needs the grid as its positional reference; a given filter brings its own
    reference = {} if hyena.get("filter") is not None else \
        {"max_len": grid[0]} if len(grid) == 1 else {"max_grid": grid}
    operator = Hyena(hidden_dim=dim, spatial_dims=len(grid), **reference, **hyena)
    return QKVSequenceMixer(hidden_dim=dim, hyena=operator, **mixer)


class CCNN(nn.Module):
    """Dense N-D network; ``forward(x, *, cp_group=None) -> this rank's block of the output``.

    Args:
        in_channels, out_channels: C_in, C_out per position.
        grid: the global spatial size ``(L,)``, ``(H, W)`` or ``(T, H, W)`` it is built for (the input
            must have it; the default Hyena filter takes it as its positional reference).
        dim: width C of the blocks.
        depth: blocks.
        mixers: "hyena" or "attention" for every block, or a list of one name per block.
        mlp_ratio: hidden width of the MLPs, times C.
        norm, norm_eps: "layernorm" or "rmsnorm" (the blocks' two norms and the final one).
        hyena: `Hyena` kwargs (``num_heads``, ``filter``, ``mask``, ``boundary``, gates, norms).
        mixer: `QKVSequenceMixer` kwargs (``short_kernel_size``, ``norm``, ``bias``, inits).
        attention: `GridAttention` kwargs (``num_heads``, ``rope_theta``) of attention blocks.
        check_agreement: "always" (compare the CP ranks' input shapes once per forward) or "off".
    """

    def __init__(self, *, in_channels: int, out_channels: int, grid: Sequence[int], dim: int = 64, depth: int = 4,
                 mixers: str | Sequence[str] = "hyena", mlp_ratio: float = 2.0, norm: str = "layernorm",
                 norm_eps: float = 1e-5, hyena: Mapping[str, Any] | None = None, mixer: Mapping[str, Any] | None = None,
                 attention: Mapping[str, Any] | None = None, check_agreement: str = "always"):
        super().__init__()
        self.check_agreement = check_agreement_policy(check_agreement)
        self.grid = tuple(int(n) for n in grid)
        if not 1 <= len(self.grid) <= 3 or min(self.grid) < 1:
            raise ValueError(f"grid={tuple(grid)} must give 1, 2 or 3 positive sizes (L,), (H, W) or (T, H, W)")
        if norm not in NORMS or depth < 1:
            raise ValueError(f"norm={norm!r} must be one of {sorted(NORMS)} and depth={depth} >= 1")
        names = [mixers] * depth if isinstance(mixers, str) else list(mixers)
        if len(names) != depth or any(n not in MIXERS for n in names):
            raise ValueError(f"mixers={mixers!r} must be one of {MIXERS} or a list of {depth} of them (one per block)")
        self.in_channels, self.out_channels = in_channels, out_channels
        kwargs = dict(hyena=dict(hyena or {}), mixer=dict(mixer or {}), attention=dict(attention or {}))
        self.in_proj = nn.Linear(in_channels, dim)
        self.blocks = nn.ModuleList(
            CCNNBlock(dim=dim, mixer=_build_mixer(kind, dim=dim, grid=self.grid, **kwargs), mlp_ratio=mlp_ratio,
                      norm=norm, norm_eps=norm_eps)
            for kind in names)
        self.norm = NORMS[norm](dim, eps=norm_eps)
        self.out_proj = nn.Linear(dim, out_channels)
        self.layout = self._layout()

    def _layout(self) -> str:
        """The CP layout of the first axis: the Hyena geometry's (zigzag for a causal first axis), else rows."""
        hyenas = [b.mixer for b in self.blocks if isinstance(b.mixer, QKVSequenceMixer)]
        layout = hyenas[0].geometry.layout if hyenas else "rows"
        if layout != "rows" and len(hyenas) < len(self.blocks):
            raise ValueError("attention blocks need the rows layout: a causal first Hyena axis (zigzag) cannot be "
                             "mixed with attention blocks; use boundary='linear' or 'circular' on the first axis")
        return layout

    def local_part(self, t: torch.Tensor, cp_group=None) -> torch.Tensor:
        """This rank's block of a FULL ``[B, *S, ...]`` tensor (e.g. the target), as the output holds it."""
        return shard(t, 1, self.layout, group_size(cp_group), group_rank(cp_group))

    def check_input(self, x: torch.Tensor, world: int) -> None:
        """Raise ``ValueError`` for bad input, on every rank before any collective."""
        want = (*self.grid, self.in_channels)
        if not isinstance(x, torch.Tensor) or x.dim() != 2 + len(self.grid) or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must be the full batch [B, *S, C_in] = [B, {', '.join(map(str, want))}] (the same on "
                             f"every CP rank), got {shape_of(x)}")
        weight = self.in_proj.weight
        if not x.is_floating_point() or x.device != weight.device:
            raise ValueError(f"x must be a floating-point tensor on the network's device {weight.device}, got "
                             f"{x.dtype} on {x.device}")
        check_divisible(self.grid[0], self.layout, world, "first grid axis S0")
        for mixer in {type(b.mixer): b.mixer for b in self.blocks}.values():  # one of each kind: blocks are alike
            if isinstance(mixer, QKVSequenceMixer):
                mixer.hyena.check_input(self.grid, world)
                mixer.geometry.check_shard(self.grid, world, mixer.short_kernel_size or 1,
                                           halo=mixer.short_conv_cp == "halo" and mixer.short_conv is not None)

    def forward(self, x: torch.Tensor, *, cp_group=None) -> torch.Tensor:
        """``x: [B, *S, C_in]``, the FULL batch on every CP rank -> ``[B, S0/P, *S_rest, C_out]``
        (this rank's block of the first axis; all of it without ``cp_group``)."""
        # every block's shapes follow from x: no per-mixer check
        with agreement(cp_group, f"{type(self).__name__}.forward", {"x.shape": shape_of(x)},
                       policy=self.check_agreement, before=x,
                       hint="Give every rank of the cp_group the same FULL batch (each keeps its own block)") as x:
            self.check_input(x, group_size(cp_group))
            h = self.in_proj(self.local_part(x, cp_group).to(self.in_proj.weight.dtype))
            for block in self.blocks:
                h = block(h, cp_group=cp_group)
        # linear on [B, *S, C] returns a view of its 2-D result; FSDP2 hooks the root's output for
        # backward and warns on views (an in-place op would bypass the hook): return a tensor of its own
        return self.out_proj(self.norm(h)).clone()
