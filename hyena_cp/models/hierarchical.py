"""ViT-5 classification networks with Hyena (and/or attention) token mixing, single-process
and context-parallel.

`ViT5HierarchicalClassificationNet`: patch embedding + learned absolute position embedding
on patches, then stages of `ViT5Block`s joined by 2x2 patch merging (Swin: concat 4C ->
RMSNorm -> Linear 4C->2C), grid width halving per stage; CLS and register tokens are carried
across stages (RMSNorm -> Linear C->2C, so they change width with the patches); a head on
the CLS token or on the mean of the patch tokens. `ViT5ClassificationNet` is the isotropic
special case: one stage, no merging.

Layout (`hyena_cp.models.token_grid`): each stage is ``[patches | CLS | registers | padding]`` on
a grid of the stage's patch-grid width; the network computes every stage's layout and
passes it to its blocks (``grid_w``) — it is the single source of truth. An odd patch grid is
zero-padded on the bottom/right to even before merging (Swin's rule), so a 7x7 grid merges
to 4x4 and the last row/column of merged tokens sees zeros for the missing patches.

Context parallelism (``cp_group`` of size P): every rank receives the FULL image batch,
embeds only the pixel rows of its own block of grid rows and keeps a block of whole grid
rows at every stage. Between stages one `hyena_cp.parallel.redistribute` call (an
AllToAll with an exact-adjoint backward) brings each rank the old patch-row pairs and the
CLS/register tokens that its new block needs. Pooling: CLS by an autograd broadcast from
the rank that holds it; mean by an autograd all-reduce of per-rank patch sums. Logits are
identical on every rank; with ``loss / P`` on each rank, parameter gradients summed over
the group equal single-process gradients. Seed all ranks of a CP group identically so that
stochastic depth draws the same masks everywhere.

Cross-rank agreement (``check_agreement="always"``): the network compares the ranks' image
batch shapes ONCE per forward, before its first collective (one all-gather of a few int64,
`hyena_cp.parallel.agreement`); every stage's shapes follow from it, so the blocks run inside
`hyena_cp.parallel.agreed` and their mixers skip their own checks.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from hyena_cp import flops
from hyena_cp.models.adapter import ViT5HyenaAdapter
from hyena_cp.models.blocks import MIXERS, NORM_EPS, ViT5Block, build_mixer, init_weights_vit5
from hyena_cp.models.token_grid import StageGrid, StageLayout, merge_source
from hyena_cp.parallel import (agreement, all_reduce_sum, broadcast_from, check_agreement_policy, group_rank,
                               group_size, redistribute, shape_of)

__all__ = ["ViT5HierarchicalClassificationNet", "ViT5ClassificationNet", "PatchMerge"]

POOLS = ("cls", "mean")


class PatchMerge(nn.Module):
    """2x2 patch merging between stage layouts, rows sharded over the CP group.

    Patches: concat of the 4 tokens (Swin order) -> RMSNorm(4C) -> Linear(4C, C_out, no bias).
    CLS/registers: RMSNorm(C) -> Linear(C, C_out) (``bias``). Padding of the new layout: zeros.
    """

    def __init__(self, dim: int, out_dim: int, num_extra: int, bias: bool = True):
        super().__init__()
        self.out_dim = out_dim
        self.norm, self.reduction = nn.RMSNorm(4 * dim, eps=NORM_EPS), nn.Linear(4 * dim, out_dim, bias=False)
        self.extra_norm = nn.RMSNorm(dim, eps=NORM_EPS) if num_extra else None
        self.extra_proj = nn.Linear(dim, out_dim, bias=bias) if num_extra else None

    def forward(self, x: torch.Tensor, old: StageLayout, new: StageLayout, cp_group) -> torch.Tensor:
        """``x: [B, old.local_tokens, C]`` -> ``[B, new.local_tokens, C_out]`` (this rank's blocks)."""
        slots = redistribute(x, merge_source(old, new), cp_group)  # B, 4 * new.local_tokens, C
        slots = rearrange(slots, "b (n four) c -> b n four c", four=4)
        parts = new.local_parts(group_rank(cp_group))
        pieces = [self.reduction(self.norm(slots[:, :parts.patches].flatten(2)))]  # B, n_patch, C_out
        if self.extra_proj is not None:
            extras = slots[:, parts.patches:parts.patches + parts.extras, 0]  # slot 0 holds the old extra token
            pieces.append(self.extra_proj(self.extra_norm(extras)))
        pieces.append(x.new_zeros(x.shape[0], parts.padding, self.out_dim))
        return torch.cat(pieces, dim=1)


def _expand_mixers(mixers: str | Sequence[str | Sequence[str]], depths: Sequence[int]) -> list[list[str]]:
    """One mixer name per block per stage, from a name for all blocks or one entry per stage
    (a name for the whole stage or a list with one name per block)."""
    per_stage = [mixers] * len(depths) if isinstance(mixers, str) else list(mixers)
    if len(per_stage) != len(depths):
        raise ValueError(f"mixers has {len(per_stage)} entries for {len(depths)} stages; give one entry per stage "
                         f"(a mixer name or a list of one name per block), or one name for every block")
    out = []
    for stage, (entry, depth) in enumerate(zip(per_stage, depths)):
        names = [entry] * depth if isinstance(entry, str) else list(entry)
        if len(names) != depth or any(n not in MIXERS for n in names):
            raise ValueError(f"mixers for stage {stage} must be one of {MIXERS} or a list of {depth} of them, "
                             f"got {entry!r}")
        out.append(names)
    return out


def _per_stage(value: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None, stages: int,
               name: str) -> list[dict[str, Any]]:
    """One kwargs dict per stage, from None, one mapping for every stage, or one per stage."""
    if value is None or isinstance(value, Mapping):
        return [dict(value or {}) for _ in range(stages)]
    hint = {"mixer": "; the kind of token mixer of each block is `mixers` (e.g. mixers='hyena')",
            "hyena": "; the kind of token mixer of each block is `mixers` (e.g. mixers='hyena')"}.get(name, "")
    if isinstance(value, str):
        raise ValueError(f"{name} must be a dict of keyword arguments (or one per stage), got the string {value!r}{hint}")
    values = list(value)
    if len(values) != stages or not all(isinstance(v, Mapping) for v in values):
        raise ValueError(f"{name} must be one dict of kwargs for every stage or a list of {stages} dicts (one per "
                         f"stage), got {value!r}")
    return [dict(v) for v in values]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class ViT5HierarchicalClassificationNet(nn.Module):
    """Hierarchical ViT-5 classifier; ``forward(images, *, cp_group=None) -> logits``.

    Args:
        img_size: input ``H x W`` (int or pair), divisible by ``patch_size``.
        patch_size: patch side of the embedding (4 for Swin-like models).
        in_chans, num_classes: input channels, classes.
        embed_dim: width of stage 0; stage s has ``embed_dim * 2**s``.
        depths: blocks per stage.
        num_heads: attention heads per stage (used by attention blocks only).
        mixers: "hyena" / "attention" for every block, or one entry per stage (a name, or a
            list of one name per block), e.g. ``("hyena", "hyena", "hyena", "attention")``.
        mlp_ratio, layer_scale_init, drop_path_rate: ViT-5 block settings (same drop-path
            rate in every block).
        class_token, num_registers: extra tokens in the register row of every stage.
        pool: "cls" (needs ``class_token``) or "mean" of the patch tokens (CLS/registers excluded,
            as timm's avg pooling), then RMSNorm and the linear head.
        hyena: extra `Hyena` kwargs (``num_heads`` = filter groups, must be divisible by the CP
            size; ``filter_*``); the network sets ``hidden_dim``, ``spatial_dims``, ``max_grid``.
            One dict for every stage, or a list of one dict per stage.
        mixer: extra `QKVSequenceMixer` kwargs (``short_kernel_size``, ``norm``, ``bias``, ...), one
            dict or one per stage.
        bias: biases of the patch embedding, the MLPs, the merges' CLS/register projection and the
            head (the Hyena mixers take theirs from ``mixer``).
        rope_theta: RoPE base of attention blocks.
        max_cp_size: largest CP size the model will run with; fixes the Hyena filters'
            positional reference (``max_grid`` height = real rows + max_cp_size - 1), so the
            model is the same function for every P <= max_cp_size. Changing it changes the
            filters: keep it fixed for a checkpoint.
        check_agreement: "always" (default): compare the CP ranks' image shapes once per
            forward, before any collective; "off": trust them (see module docstring).
    """

    def __init__(self, *, img_size: int | Sequence[int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), mixers: str | Sequence[str | Sequence[str]] = "hyena",
                 mlp_ratio: float = 4.0, class_token: bool = True, num_registers: int = 4, pool: str = "cls",
                 drop_path_rate: float = 0.0, layer_scale_init: float = 1e-4,
                 hyena: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
                 mixer: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None, rope_theta: float = 100.0,
                 max_cp_size: int = 8, bias: bool = True, check_agreement: str = "always"):
        super().__init__()
        self.check_agreement = check_agreement_policy(check_agreement)
        self.img_size, self.patch_size, self.in_chans = _pair(img_size), int(patch_size), in_chans
        if patch_size < 1 or any(s % patch_size for s in self.img_size):
            raise ValueError(f"img_size={self.img_size} must be divisible by patch_size={patch_size}; resize the "
                             f"images or pick a patch size that divides them")
        self._check_config(depths, num_heads, pool, class_token, num_registers, max_cp_size)
        self.pool, self.max_cp_size = pool, max_cp_size
        names = _expand_mixers(mixers, depths)
        num_extra = int(class_token) + num_registers
        self.grids = [StageGrid(self.img_size[0] // patch_size, self.img_size[1] // patch_size, num_extra)]
        for _ in depths[1:]:
            self.grids.append(self.grids[-1].merged())
        dims = [embed_dim * 2**s for s in range(len(depths))]
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=bias)
        self.pos_embed = nn.Parameter(torch.zeros(self.grids[0].num_patches, embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, embed_dim)) if class_token else None
        self.reg_tokens = nn.Parameter(torch.zeros(num_registers, embed_dim)) if num_registers else None
        hyenas, mixer_kws = _per_stage(hyena, len(depths), "hyena"), _per_stage(mixer, len(depths), "mixer")
        block_kw = dict(mlp_ratio=mlp_ratio, drop_path=drop_path_rate, layer_scale_init=layer_scale_init, mlp_bias=bias)
        self.stages = nn.ModuleList(
            nn.ModuleList(ViT5Block(dim=dims[s], mixer=build_mixer(kind, dim=dims[s], grid=self.grids[s],
                                                                   attention_heads=num_heads[s], hyena=hyenas[s],
                                                                   mixer=mixer_kws[s], max_cp_size=max_cp_size,
                                                                   rope_theta=rope_theta), **block_kw)
                          for kind in names[s])
            for s in range(len(depths)))
        self.merges = nn.ModuleList(PatchMerge(dims[s], dims[s + 1], num_extra, bias) for s in range(len(depths) - 1))
        self.norm = nn.RMSNorm(dims[-1], eps=NORM_EPS)
        self.head = nn.Linear(dims[-1], num_classes, bias=bias)
        self.init_weights()

    @staticmethod
    def _check_config(depths, num_heads, pool, class_token, num_registers, max_cp_size) -> None:
        if len(depths) < 1 or len(num_heads) != len(depths) or any(d < 1 for d in depths):
            raise ValueError(f"depths={tuple(depths)} needs >= 1 block per stage and num_heads={tuple(num_heads)} one "
                             f"entry per stage")
        if pool not in POOLS or (pool == "cls" and not class_token):
            raise ValueError(f"pool={pool!r} must be one of {POOLS}; 'cls' needs class_token=True")
        if num_registers < 0 or max_cp_size < 1:
            raise ValueError(f"num_registers={num_registers} must be >= 0 and max_cp_size={max_cp_size} >= 1")

    def init_weights(self) -> None:
        """timm's ViT init: trunc-normal(0.02) position embedding and linears, CLS/registers
        ~N(0, 1e-6); Hyena mixers keep their own init."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_tokens):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        init_weights_vit5(self)

    # ----------------------------------------------------------------- layout
    def layouts(self, world: int) -> list[StageLayout]:
        """Every stage's token layout for a CP group of ``world`` ranks."""
        return [grid.layout(world) for grid in self.grids]

    def check_input(self, images: torch.Tensor, world: int) -> None:
        """Raise ``ValueError`` for bad input on every rank before any collective."""
        want = (self.in_chans, *self.img_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"images must be the full batch [B, C_in, H, W] = [B, {', '.join(map(str, want))}] "
                             f"(same on every CP rank), got {shape_of(images)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor (normalised pixels), got {images.dtype}; "
                             f"convert and normalise them first (e.g. images.float() / 255)")
        if images.device != self.pos_embed.device:
            raise ValueError(f"images are on {images.device} but the network's parameters are on "
                             f"{self.pos_embed.device}; move the images or the network (.to(device))")
        if world > self.max_cp_size:
            raise ValueError(f"cp_group size {world} exceeds max_cp_size={self.max_cp_size}; raise max_cp_size in "
                             f"the model config (it changes the Hyena filters' positional reference)")
        for layout, blocks in zip(self.layouts(world), self.stages):
            for block in blocks:
                if isinstance(block.mixer, ViT5HyenaAdapter):
                    _check_hyena(block.mixer.inner_mixer, layout)

    # ---------------------------------------------------------------- forward
    def embed(self, images: torch.Tensor, layout: StageLayout, rank: int) -> torch.Tensor:
        """This rank's stage-0 tokens ``[B, layout.local_tokens, C]`` from the pixel rows of
        its own patch rows only (the conv is applied as a linear on patches so that a rank
        without patch rows still gives every parameter a (zero) gradient)."""
        parts, p, grid_w = layout.local_parts(rank), self.patch_size, layout.grid.grid_w
        pixels = images[:, :, parts.patch_start // grid_w * p:(parts.patch_start + parts.patches) // grid_w * p]
        pixels = pixels.to(self.pos_embed.dtype)
        patches = rearrange(pixels, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)
        tokens = F.linear(patches, self.patch_embed.weight.flatten(1), self.patch_embed.bias)
        tokens = tokens + self.pos_embed[parts.patch_slice]
        extras = self.extra_tokens()[parts.extra_slice].expand(images.shape[0], -1, -1)
        padding = tokens.new_zeros(images.shape[0], parts.padding, tokens.shape[-1])
        return torch.cat([tokens, extras, padding], dim=1)

    def extra_tokens(self) -> torch.Tensor:
        """``[num_extra, C]``: CLS (if any) then the registers."""
        tokens = [t for t in (self.cls_token, self.reg_tokens) if t is not None]
        return torch.cat(tokens) if tokens else self.pos_embed.new_zeros(0, self.pos_embed.shape[1])

    def forward_pooled(self, images: torch.Tensor, *, cp_group=None) -> torch.Tensor:
        """Pooled features ``[B, C_last]`` (before the final norm), identical on every CP rank."""
        # every block's shapes follow from the images: no per-mixer check
        with agreement(cp_group, f"{type(self).__name__}.forward", {"images.shape": shape_of(images)},
                       policy=self.check_agreement, before=images,
                       hint="Give every rank of the cp_group the same FULL image batch (each embeds its own "
                            "rows)") as images:
            self.check_input(images, group_size(cp_group))
            return self._forward_pooled(images, cp_group)

    def _forward_pooled(self, images: torch.Tensor, cp_group) -> torch.Tensor:
        world, rank = group_size(cp_group), group_rank(cp_group)
        layouts = self.layouts(world)
        x = self.embed(images, layouts[0], rank)
        for s, (layout, blocks) in enumerate(zip(layouts, self.stages)):
            if s > 0:
                x = self.merges[s - 1](x, layouts[s - 1], layout, cp_group)
            for block in blocks:
                x = block(x, cp_group=cp_group, num_valid_tokens=layout.grid.num_valid)
        return self._pool(x, layouts[-1], cp_group)

    def forward(self, images: torch.Tensor, *, cp_group=None) -> torch.Tensor:
        """``images: [B, C_in, H, W]``, the FULL batch on every CP rank -> logits ``[B, classes]``
        (identical on every rank)."""
        return self.head(self.norm(self.forward_pooled(images, cp_group=cp_group)))

    def _pool(self, x: torch.Tensor, layout: StageLayout, cp_group) -> torch.Tensor:
        rank, parts = group_rank(cp_group), layout.local_parts(group_rank(cp_group))
        if self.pool == "mean":
            return all_reduce_sum(x[:, :parts.patches].sum(dim=1), cp_group) / layout.grid.num_patches
        cls_position = layout.grid.num_patches
        owner = layout.owner(cls_position)
        # Every rank passes a token of its own block (so all take part in backward); only
        # the owner's (the CLS token) is used and receives gradient.
        local = cls_position - rank * layout.local_tokens if rank == owner else 0
        return broadcast_from(x[:, local], owner, cp_group)

    # ------------------------------------------------------------------ flops
    def flop_breakdown(self) -> dict[str, float]:
        """Forward FLOPs for one sample, single-process layout (2 per MAC; see `hyena_cp.flops`),
        summed over blocks by kind: embed, ``hyena.*`` / ``attention.*``, ``mlp``, merges, head."""
        parts: dict[str, float] = defaultdict(float)
        first = self.grids[0]
        parts["patch_embed"] = flops.linear(first.num_patches, self.patch_embed.weight[0].numel(),
                                            self.patch_embed.out_channels)
        for s, (layout, blocks) in enumerate(zip(self.layouts(1), self.stages)):
            if s > 0:
                merge = self.merges[s - 1]
                parts["merge"] += flops.linear(layout.grid.num_patches, merge.reduction.in_features, merge.out_dim)
                if merge.extra_proj is not None:
                    parts["merge"] += flops.linear(layout.grid.num_extra, merge.extra_proj.in_features, merge.out_dim)
            for block in blocks:
                for key, value in block.flop_breakdown(layout.num_tokens).items():
                    parts[key] += value
        parts["head"] = flops.linear(1, self.head.in_features, self.head.out_features)
        return dict(parts)

    def flop_count(self, inference: bool = False) -> int:
        """FLOPs per sample for the whole network (training = 3x forward unless ``inference``)."""
        return flops.total(self.flop_breakdown(), inference)


def _check_hyena(mixer, layout: StageLayout) -> None:
    """The constraints `QKVSequenceMixer` checks at call time, checked up front for a stage."""
    world, grid_w = layout.world, layout.grid.grid_w
    mixer.hyena.check_input((layout.padded_rows, grid_w), world)
    halo = (mixer.short_kernel_size or 1) // 2  # None: no short conv, no halo
    if world > 1 and mixer.short_conv_cp == "halo" and layout.local_rows < halo:
        raise ValueError(f"a stage with grid width {grid_w} has {layout.local_rows} rows per rank, fewer than the "
                         f"short-conv halo K//2={halo}; use a smaller cp_group, larger images or a smaller "
                         f"short_kernel_size")


class ViT5ClassificationNet(ViT5HierarchicalClassificationNet):
    """Isotropic ViT-5 classifier (one stage, no merging): ViT-5-S is ``embed_dim=384,
    depth=12, num_heads=6``, patch 16. ``mixers``: one name for every block or one per block.
    The other arguments are those of `ViT5HierarchicalClassificationNet`."""

    def __init__(self, *, img_size: int | Sequence[int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mixers: str | Sequence[str] = "hyena", mlp_ratio: float = 4.0, class_token: bool = True,
                 num_registers: int = 4, pool: str = "cls", drop_path_rate: float = 0.0,
                 layer_scale_init: float = 1e-4, hyena: Mapping[str, Any] | None = None,
                 mixer: Mapping[str, Any] | None = None, rope_theta: float = 100.0, max_cp_size: int = 8,
                 bias: bool = True, check_agreement: str = "always"):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         embed_dim=embed_dim, depths=(depth,), num_heads=(num_heads,), mixers=[mixers],
                         mlp_ratio=mlp_ratio, class_token=class_token, num_registers=num_registers, pool=pool,
                         drop_path_rate=drop_path_rate, layer_scale_init=layer_scale_init, hyena=hyena, mixer=mixer,
                         rope_theta=rope_theta, max_cp_size=max_cp_size, bias=bias, check_agreement=check_agreement)
