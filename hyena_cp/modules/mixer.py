"""QKVSequenceMixer: in_proj (C->3C) -> short depthwise conv -> Hyena -> norm/conditioning ->
out_proj (C->C), for sequences ``[B, L, C]``, grids ``[B, H, W, C]`` or volumes
``[B, T, H, W, C]``, each axis causal, linear or circular (the Hyena's `Geometry`).

Context parallelism (``cp_group`` of size P): ``x`` is this rank's shard of the first axis — the
zigzag layout for a causal sequence, else a block of S0/P rows (frames). Projections, norm and
gating are token-local; the short conv gets its neighbours by a halo exchange (default,
``short_conv_cp="halo"``), or — for comparison — q, k, v are swapped to channel shards
before it (``short_conv_cp="a2a"``, twice the AllToAll bytes of the default).

Tensor parallelism comes with the Hyena operator (``hyena.tp_group`` of size T): this rank
mixes its ``hyena.local_dim = C/T`` channels of q, k and v. The projections are then the
caller's tensor-parallel layers (`hyena_cp.megatron` passes megatron-core's column- and
row-parallel linears): ``in_proj`` maps C -> ``[q_t; k_t; v_t]`` (3C/T, this rank's block of
each) and ``out_proj`` maps C/T -> C, summing over the TP group. The short conv holds the
depthwise weights of the same channels, ``[q_t; k_t; v_t]`` of the full ``[q; k; v]`` weight
(`hyena_cp.parallel.shard_tp` with stride 3).

Packed sequences (1-D): ``forward(x, cu_seqlens=...)`` with GLOBAL document boundaries ``[N+1]``
over the B rows laid end to end (`hyena_cp.ops.packing`; with B = 1 the flash-attention /
megatron THD convention), identical on every rank. No output depends on another document:
the short conv's taps, halo taps included, stop at a document start (found from each
token's offset in its document: the halo exchange itself is unchanged), and the long conv
restarts at each document (`hyena_cp.modules.hyena`). Under CP the zigzag layout is the
WHOLE sequence's, whatever the boundaries: documents straddle chunks and ranks freely.
Neither the halos nor the AllToAlls depend on the boundaries, so packing adds no
communication. A document sees the filter from tap 0 exactly as if run alone because the filter
has absolute positions (``Hyena(max_len=...)``); with length-relative filters (``max_len=None``)
it would see a prefix of the filter of the packed length, so packing is refused there
(`Hyena.check_packed_filter`, a ``ValueError`` on every rank before any data moves).

Cross-rank agreement (``check_agreement="always"``, the default): before its first collective
the mixer all-gathers a small signature of the call over ``cp_group`` — x's local shape and
dtype, ``num_valid_tokens``, the conditioning shape, ``cu_seqlens`` — and every rank raises the
same ``ValueError`` if the ranks disagree, instead of gloo aborting or NCCL hanging on shards
that are each valid alone (`hyena_cp.parallel.agreement`: cost, and why there is no cache).
Inside a network that checked its own input (`hyena_cp.parallel.agreed`) the mixer skips it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from hyena_cp import flops
from hyena_cp.modules.conditioning import broadcast_tokens, build_conditioning
from hyena_cp.modules.hyena import Hyena
from hyena_cp.modules.norm import build_norm
from hyena_cp.ops.boundary import short_conv_reach
from hyena_cp.ops.channels_last import channels_last
from hyena_cp.ops.packing import document_positions, is_one_document_per_row
from hyena_cp.parallel import (agreement, channel_to_seq, check_agreement_policy, group_rank, group_size,
                               seq_to_channel, shape_of, shard_tp)

__all__ = ["QKVSequenceMixer", "init_projection"]

_AGREE_HINT = ("Give every rank of the cp_group its shard of the SAME global batch (hyena_cp.parallel.shard), the "
               "same num_valid_tokens, conditioning and cu_seqlens")


def _autocast(t: torch.Tensor) -> bool:
    """True when autocast is on for ``t``'s device (then its dtype may differ from the weights')."""
    kind = t.device.type
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def _project(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a projection; megatron's parallel linears return ``(output, None)`` (bias added inside)."""
    out = proj(x)
    if isinstance(out, tuple):
        out, bias = out
        if bias is not None:
            raise ValueError("a projection returned a separate bias (skip_bias_add=True); build it with "
                             "skip_bias_add=False so the mixer output includes it")
    return out


def _check_num_valid(num_valid: int | None, tokens: int) -> None:
    """``num_valid_tokens`` is None or an int in ``[0, tokens]`` (``tokens``: global tokens per sample)."""
    if num_valid is None:
        return
    if isinstance(num_valid, bool) or not isinstance(num_valid, int) or not 0 <= num_valid <= tokens:
        raise ValueError(f"num_valid_tokens={num_valid!r} must be None (no padding) or an int in [0, {tokens}] (the "
                         f"global tokens per sample: real tokens first, padding after); pass the count of real tokens")


def init_projection(layer: nn.Module, kind: str | None, dim: int, num_layers: int | None, name: str) -> None:
    """Named initialisations of a projection's weight (bias to 0): ``"small"`` ``N(0, 2/(5 dim))``
    (Nguyen & Salazar 2019) and ``"wang"`` ``N(0, (2/(num_layers sqrt(dim)))^2)`` (GPT-J/NeoX's output
    scaling); None keeps torch's default."""
    if kind is None:
        return
    if kind not in ("small", "wang"):
        raise ValueError(f"{name}={kind!r} must be None, 'small' or 'wang'")
    if kind == "wang" and not num_layers:
        raise ValueError(f"{name}='wang' needs init_num_layers (the network's depth)")
    std = math.sqrt(2 / (5 * dim)) if kind == "small" else 2 / (num_layers * math.sqrt(dim))
    with torch.no_grad():
        layer.weight.normal_(0.0, std)
        if getattr(layer, "bias", None) is not None:
            layer.bias.zero_()


class QKVSequenceMixer(nn.Module):
    """Hyena token mixer with projections.

    Args:
        hidden_dim: channels C (input and output).
        hyena: the Hyena operator (``hyena.hidden_dim == hidden_dim``); its geometry decides
            whether this mixer takes ``[B, L, C]``, ``[B, H, W, C]`` or ``[B, T, H, W, C]``.
        short_kernel_size: K taps per axis of the short depthwise conv: K back along a causal
            axis, K centred ("same", K odd) along a linear or circular one; None: no short conv.
        short_conv_boundary: the short conv's boundary when it differs from the long conv's: "linear"
            zero-pads a circular axis (per axis, or one for all); None: the long conv's.
        norm: "layernorm", "rmsnorm", "l2" or None, applied to ``σ_o(q) * y`` before out_proj (over
            all C channels, also under TP: see `hyena_cp.modules.norm`).
        norm_eps: eps of this mixer's norms (None: torch's defaults); the Hyena's own norms take
            ``Hyena(norm_eps=)``.
        conditioning: None, "film" or "adaln" (adaLN-Zero) of ``y`` before out_proj; needs ``cond_dim``.
            A conditioned Hyena filter (``Hyena(filter=SirenFilter(cond_dim=...))``) receives the same
            ``conditioning`` tensor.
        bias: bias of in_proj, short conv and out_proj; ``in_proj_bias``, ``short_conv_bias``,
            ``out_proj_bias`` override it one by one.
        in_proj_init, out_proj_init: None (torch's default), "small" (``N(0, 2/(5C))``, Nguyen-Salazar)
            or "wang" (``N(0, (2/(num_layers sqrt C))^2)``, needs ``init_num_layers``); biases then 0.
        short_conv_cp: "halo" (default) or "a2a", see module docstring.
        in_proj, out_proj: projection modules (C -> 3 * local, local -> C, ``local =
            hyena.local_dim``); default ``nn.Linear``; required under TP (see module docstring).
        check_agreement: "always" (default) compares the CP ranks' call signatures before
            the first collective of every call; "off" trusts them (see module docstring).
    """

    def __init__(self, *, hidden_dim: int, hyena: Hyena, short_kernel_size: int | None = 3,
                 short_conv_boundary: str | Sequence[str] | None = None, norm: str | None = "layernorm",
                 norm_eps: float | None = None, conditioning: str | None = None, cond_dim: int | None = None,
                 bias: bool = True, in_proj_bias: bool | None = None, short_conv_bias: bool | None = None,
                 out_proj_bias: bool | None = None, in_proj_init: str | None = None, out_proj_init: str | None = None,
                 init_num_layers: int | None = None, short_conv_cp: Literal["halo", "a2a"] = "halo",
                 in_proj: nn.Module | None = None, out_proj: nn.Module | None = None,
                 check_agreement: Literal["always", "off"] = "always"):
        super().__init__()
        self.check_agreement = check_agreement_policy(check_agreement)
        if hyena.hidden_dim != hidden_dim:
            raise ValueError(f"hyena.hidden_dim={hyena.hidden_dim} must equal the mixer's hidden_dim={hidden_dim}")
        if short_conv_cp not in ("halo", "a2a"):
            raise ValueError(f"short_conv_cp={short_conv_cp!r} must be 'halo' or 'a2a'")
        self.geometry = hyena.geometry.with_short_conv(short_conv_boundary)
        if short_kernel_size is not None:
            if short_kernel_size < 1:
                raise ValueError(f"short_kernel_size={short_kernel_size} must be >= 1 (or None: no short conv)")
            for boundary in self.geometry.short_boundaries:
                short_conv_reach(short_kernel_size, boundary)  # odd along non-causal axes
        tp = group_size(hyena.tp_group)
        if tp > 1 and (in_proj is None or out_proj is None):
            raise ValueError("a tensor-parallel Hyena (tp_group of size > 1) needs tensor-parallel in_proj/out_proj "
                             "modules; build the mixer through hyena_cp.megatron.MegatronHyenaMixer")
        if tp > 1 and conditioning is not None:
            raise ValueError(f"conditioning={conditioning!r} is not supported with tensor parallelism (TP size {tp}); "
                             f"use conditioning=None")
        if conditioning is not None and hyena.cond_dim is not None and cond_dim != hyena.cond_dim:
            raise ValueError(f"cond_dim={cond_dim} must equal the Hyena filter's cond_dim={hyena.cond_dim}: both read the "
                             f"one conditioning tensor")
        self.hidden_dim, self.spatial_dims, self.local_dim = hidden_dim, hyena.spatial_dims, hyena.local_dim
        self.short_kernel_size, self.short_conv_cp = short_kernel_size, short_conv_cp
        pick = lambda own: bias if own is None else own  # noqa: E731
        self.in_proj = nn.Linear(hidden_dim, 3 * hidden_dim, bias=pick(in_proj_bias)) if in_proj is None else in_proj
        self.short_conv = None if short_kernel_size is None else \
            self._build_short_conv(short_kernel_size, pick(short_conv_bias), hyena)
        self.hyena = hyena
        self.norm = build_norm(norm, hidden_dim, hyena.tp_group, norm_eps)  # statistics over all C channels
        self.cond = build_conditioning(conditioning, cond_dim, hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim, bias=pick(out_proj_bias)) if out_proj is None else out_proj
        init_projection(self.in_proj, in_proj_init, hidden_dim, init_num_layers, "in_proj_init")
        init_projection(self.out_proj, out_proj_init, hidden_dim, init_num_layers, "out_proj_init")

    @property
    def cond_dim(self) -> int | None:
        """Width of the ``conditioning`` tensor this mixer takes (its own FiLM/adaLN or its filter's)."""
        return self.cond.proj.in_features if self.cond is not None else self.hyena.cond_dim

    def _build_short_conv(self, kernel_size: int, bias: bool, hyena: Hyena) -> nn.Module:
        """Depthwise conv over ``[q; k; v]`` of this rank's channels. Only owns and initialises the
        weights (the ops apply them). Initialised for all 3C channels, then cut to this TP rank's
        ``[q_t; k_t; v_t]``, so a seed gives the same full mixer at any TP size."""
        conv_type = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self.spatial_dims - 1]
        channels = 3 * self.hidden_dim
        conv = conv_type(channels, channels, kernel_size, groups=channels, bias=bias)
        tp = group_size(hyena.tp_group)
        if tp > 1:
            rank, local = group_rank(hyena.tp_group), 3 * self.local_dim
            conv.weight = nn.Parameter(shard_tp(conv.weight.detach(), 0, 3, tp, rank))
            if bias:
                conv.bias = nn.Parameter(shard_tp(conv.bias.detach(), 0, 3, tp, rank))
            conv.in_channels = conv.out_channels = conv.groups = local
        return conv

    # ------------------------------------------------------------------ checks
    def _check(self, x: torch.Tensor, conditioning: torch.Tensor | None, world: int,
               cu_seqlens: torch.Tensor | None, num_valid_tokens: int | None = None,
               long_conv: str | None = None) -> None:
        """Every rank runs this before any collective, so bad input raises everywhere.
        ``long_conv``: how the operator will get ``z`` ("sequence" shards or "channel" blocks; None:
        as this mixer's forward does, by ``short_conv_cp``)."""
        self._check_tensors(x, conditioning)
        size = self.geometry.global_size(x.shape[1:-1], world)
        if long_conv is None:
            long_conv = "channel" if self.short_conv_cp == "a2a" and world > 1 else "sequence"
        self.hyena.check_input(size, world, long_conv)
        self.hyena.check_packing(cu_seqlens, x.shape[0], size[0])
        _check_num_valid(num_valid_tokens, math.prod(size))
        self.geometry.check_shard(size, world, self.short_kernel_size or 1,
                                  halo=self.short_conv_cp == "halo" and self.short_conv is not None)

    def _check_tensors(self, x: torch.Tensor, conditioning: torch.Tensor | None) -> None:
        """Layout, dtype and device of ``x`` and ``conditioning`` against the mixer's weights."""
        shape = self.geometry.channels_last
        if not isinstance(x, torch.Tensor) or x.dim() != 2 + self.spatial_dims or x.shape[-1] != self.hidden_dim:
            raise ValueError(f"x must be {shape} with C=hidden_dim={self.hidden_dim} (channels last); "
                             f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        weight = self.hyena.dtype_like
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}; convert it (x.to({weight.dtype}))")
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the mixer's parameters are on {weight.device}; move x or the "
                             f"mixer (.to(device)) so they match")
        if x.dtype != weight.dtype and not _autocast(x):
            raise ValueError(f"x is {x.dtype} but the mixer's parameters are {weight.dtype}; cast x or the mixer "
                             f"(.to(dtype)), or run under torch.autocast")
        if (conditioning is None) != (self.cond_dim is None):
            need = "needs" if self.cond_dim is not None else "was built without conditioning and takes no"
            raise ValueError(f"this mixer {need} `conditioning=` tensor [B, cond_dim]")
        if conditioning is None:
            return
        want = (x.shape[0], self.cond_dim)
        if not isinstance(conditioning, torch.Tensor) or tuple(conditioning.shape) != want:
            raise ValueError(f"conditioning must be [B, cond_dim] = {list(want)} (B from x, cond_dim from the mixer's "
                             f"constructor), got {shape_of(conditioning)}")
        if conditioning.device != x.device or not conditioning.is_floating_point() or (
                conditioning.dtype != weight.dtype and not _autocast(x)):
            raise ValueError(f"conditioning is a {conditioning.dtype} tensor on {conditioning.device}; it must be a "
                             f"floating-point tensor on x's device {x.device} with the parameters' dtype "
                             f"{weight.dtype} (or run under torch.autocast)")

    # ------------------------------------------------------------ short conv
    def _short_conv_weights(self, channels: slice | None):
        """Depthwise weights ``[3C, K(, K)]`` and bias (C = this TP rank's ``local_dim``), restricted to
        a channel block of each of q, k, v."""
        w = self.short_conv.weight[:, 0]
        b = self.short_conv.bias
        if channels is None:
            return w, b
        w = w.reshape(3, self.local_dim, *w.shape[1:])[:, channels].flatten(0, 1)
        b = None if b is None else b.reshape(3, self.local_dim)[:, channels].flatten()
        return w, b

    def _short_conv_local(self, u: torch.Tensor, cp_group, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``u``: this rank's shard ``[B, 3C, *S_loc]``; halo exchange (`Geometry.short_conv`).
        ``positions`` (1-D, packed): ``[B, L_loc]`` offset of each local token in its document."""
        if self.short_conv is None:
            return u
        w, b = self._short_conv_weights(None)
        return self.geometry.short_conv(u, w, b, cp_group, positions)

    def _short_conv_full(self, u: torch.Tensor, channels: slice, positions: torch.Tensor | None) -> torch.Tensor:
        """``u``: full grid of a channel block of q, k, v ``[B, 3*C_blk, *S]``;
        ``positions`` (1-D, packed): ``[B, L]`` offset of each token in its document."""
        if self.short_conv is None:
            return u
        w, b = self._short_conv_weights(channels)
        return self.geometry.short_conv_full(u, w, b, positions)

    # ---------------------------------------------------------------- forward
    def _valid_mask(self, spatial: tuple[int, ...], num_valid: int | None, cp_group, full: bool,
                    like: torch.Tensor) -> torch.Tensor | None:
        """``[*spatial]`` 1/0 mask of real tokens: global flat position < num_valid (row-major)."""
        if num_valid is None:
            return None
        world = 1 if full else group_size(cp_group)
        size = self.geometry.global_size(spatial, world)
        return self.geometry.valid_mask(size, num_valid, world, group_rank(cp_group) if world > 1 else 0, like)

    def _document_positions(self, cu_seqlens: torch.Tensor | None, batch: int, length: int, cp_group,
                            full: bool) -> torch.Tensor | None:
        """``[B, L_local]`` (``[B, L]`` when ``full``) offset of each token in its document, for
        a GLOBAL length ``length``; None without packing."""
        if cu_seqlens is None:
            return None
        world = 1 if full else group_size(cp_group)
        positions = document_positions(cu_seqlens, batch * length).view(batch, length)  # B, L (natural order)
        return positions if world == 1 else self.geometry.shard_first_axis(positions, 1, world, group_rank(cp_group))

    def forward(self, x: torch.Tensor, *, conditioning: torch.Tensor | None = None, cp_group=None,
                num_valid_tokens: int | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Mix tokens.

        Args:
            x: ``[B, L_local, C]`` (1-D: this rank's zigzag shard) or ``[B, H_local, W, C]`` (2-D:
                this rank's block of grid rows); the full tensor when ``cp_group`` is None.
            conditioning: ``[B, cond_dim]`` when built with ``conditioning=``.
            cp_group: context-parallel process group, or None for one process.
            num_valid_tokens: tokens at global row-major position >= this are padding; they
                are zeroed before the short and the long conv so they never reach real tokens.
            cu_seqlens: 1-D packed documents: integer ``[N+1]``, cumulative GLOBAL document
                lengths over the B rows laid end to end (0 first, B*L last, every row end
                b*L among them), the same on every rank; see the module docstring.

        Returns:
            Same shape as ``x``.
        """
        signature = {"x.shape": shape_of(x), "x.dtype": getattr(x, "dtype", None), "num_valid_tokens": num_valid_tokens,
                     "conditioning.shape": shape_of(conditioning), "cu_seqlens": cu_seqlens}
        # inside, the Hyena operator need not check again
        with agreement(cp_group, "QKVSequenceMixer.forward", signature, policy=self.check_agreement,
                       hint=_AGREE_HINT, before=x) as x:
            self._check(x, conditioning, group_size(cp_group), cu_seqlens, num_valid_tokens)
            return self._forward(x, conditioning, cp_group, num_valid_tokens, cu_seqlens)

    def _forward(self, x: torch.Tensor, conditioning: torch.Tensor | None, cp_group, num_valid_tokens: int | None,
                 cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        world = group_size(cp_group)
        spatial = tuple(x.shape[1:-1])
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(x.device)
            if is_one_document_per_row(cu_seqlens, x.shape[0] * spatial[0] * world, spatial[0] * world):
                cu_seqlens = None  # the documents are the rows: the plain path is exact and cheaper
        u = _project(self.in_proj, x)
        u = self.geometry.to_channels_first(u)  # B, 3C, *S_local
        if self.short_conv_cp == "a2a" and world > 1:
            y = self._forward_a2a(u, cp_group, num_valid_tokens, cu_seqlens, conditioning)
        else:
            mask = self._valid_mask(spatial, num_valid_tokens, cp_group, False, u)
            u = u if mask is None else u * mask
            positions = self._document_positions(cu_seqlens, x.shape[0], spatial[0] * world, cp_group, False)
            q, k, v = self._short_conv_local(u, cp_group, positions).chunk(3, dim=1)
            y = self.hyena(q, k, v, cp_group=cp_group, mask=mask, cu_seqlens=cu_seqlens,
                           conditioning=conditioning if self.hyena.cond_dim is not None else None)
        y = self.norm(channels_last(y))  # B, *S_local, C
        if self.cond is None:
            return _project(self.out_proj, y)
        scale, shift, gate = self.cond(conditioning)
        out = _project(self.out_proj, y * broadcast_tokens(scale, y) + broadcast_tokens(shift, y))
        return out if gate is None else out * broadcast_tokens(gate, out)

    def _forward_a2a(self, u: torch.Tensor, cp_group, num_valid: int | None,
                     cu_seqlens: torch.Tensor | None, conditioning: torch.Tensor | None) -> torch.Tensor:
        """Comparison mode: swap q, k, v to channel shards, run everything on the full sequence."""
        world, rank = group_size(cp_group), group_rank(cp_group)
        block = self.local_dim // world
        channels = slice(rank * block, (rank + 1) * block)
        spatial_local = u.shape[2:]
        u = rearrange(u, "b (three c) ... -> b three c (...)", three=3)  # B, 3, C, S_loc
        u = seq_to_channel(u, cp_group, self.hyena.layout, channel_dim=2)  # B, 3, C/P, S
        full = (spatial_local[0] * world, *spatial_local[1:])
        u = u.reshape(u.shape[0], 3 * block, *full)
        mask = self._valid_mask(full, num_valid, cp_group, True, u)
        u = u if mask is None else u * mask
        positions = self._document_positions(cu_seqlens, u.shape[0], full[0], cp_group, True)
        q, k, v = self._short_conv_full(u, channels, positions).chunk(3, dim=1)
        y = self.hyena(q, k, v, cp_group=cp_group, sharded="channel", mask=mask, cu_seqlens=cu_seqlens,
                       conditioning=conditioning if self.hyena.cond_dim is not None else None)  # B, C/P, *full
        y = channel_to_seq(y.flatten(2), cp_group, self.hyena.layout)  # B, C, S_loc
        return y.reshape(y.shape[0], self.local_dim, *spatial_local)

    # ------------------------------------------------------------------ flops
    def flop_breakdown(self, num_tokens: int, grid_w: int | None = None,
                       grid: tuple[int, ...] | None = None) -> dict[str, float]:
        """Forward FLOPs of one sample of ``num_tokens`` global tokens (see ``hyena_cp.flops``).
        Grids need their shape: ``grid`` (the global size per axis), or in 2-D ``grid_w``
        (H = num_tokens // grid_w), else a square (2-D) or cubic (3-D) grid."""
        spatial = self._flop_grid(num_tokens, grid_w, grid)
        c = self.hidden_dim
        parts = {
            "in_proj": flops.linear(num_tokens, c, 3 * c),
            "short_conv": 0 if self.short_conv is None else
            flops.depthwise_conv(num_tokens, 3 * c, self.geometry.short_conv_taps(self.short_kernel_size)),
            **self.hyena.flop_count(spatial),
            "out_proj": flops.linear(num_tokens, c, c),
        }
        if self.cond is not None:
            parts["conditioning"] = flops.linear(1, self.cond.proj.in_features, self.cond.proj.out_features)
        return parts

    def _flop_grid(self, num_tokens: int, grid_w: int | None, grid: tuple[int, ...] | None) -> tuple[int, ...]:
        dims = self.spatial_dims
        if grid is not None:
            if len(grid) != dims or math.prod(grid) != num_tokens:
                raise ValueError(f"grid={tuple(grid)} must have {dims} axes holding num_tokens={num_tokens} tokens")
            return tuple(grid)
        if dims == 1:
            return (num_tokens,)
        if dims == 2:
            grid_w = math.isqrt(num_tokens) if grid_w is None else grid_w
            if grid_w < 1 or num_tokens % grid_w:
                raise ValueError(f"num_tokens={num_tokens} is not a grid of width grid_w={grid_w}; pass grid_w")
            return (num_tokens // grid_w, grid_w)
        side = round(num_tokens ** (1 / 3))
        if side ** 3 != num_tokens:
            raise ValueError(f"num_tokens={num_tokens} is not a cube; pass grid=(T, H, W)")
        return (side, side, side)

    def flop_count(self, num_tokens: int, inference: bool = False, grid_w: int | None = None,
                   grid: tuple[int, ...] | None = None) -> int:
        """Total FLOPs for one sample (training = 3x forward unless ``inference``)."""
        return flops.total(self.flop_breakdown(num_tokens, grid_w, grid), inference)
