"""The geometry of a Hyena operator: how many spatial axes, what each axis's boundary is, and
everything that follows from that — how a rank's shard is laid out, how the short conv gets its
neighbours, how the long conv runs and crosses ranks, the filter's grid of offsets, the FLOPs.

One `Geometry` per operator, built from ``spatial_dims`` and a boundary per axis
(`hyena_cp.ops.boundary`: causal, linear, circular; mixed axes work, e.g. causal time x
circular space). The mixer and the operator ask it; they hold no per-dimension branches.

Context parallelism (a ``cp_group`` of P ranks) always splits the FIRST spatial axis:

- a causal first axis (a sequence, or causal time of a video): Megatron's zigzag
  (`hyena_cp.parallel.layouts`): rank r holds chunks r and 2P-1-r of 2P, so Hyena and causal
  attention layers share one sharding and causal work is balanced. The short conv's halo is
  `causal_halo_1d`: the K-1 positions before each chunk; every rank both sends and receives.
- otherwise contiguous blocks (``"rows"``): rows of a 2-D grid, frames of a 3-D volume, a
  block of a non-causal sequence. The short conv's halo is `block_halo` along that axis: K//2
  positions on each side, and a circular axis wraps around the ranks (rank 0's positions
  before are rank P-1's last ones).

The long conv needs whole axes: one AllToAll turns the shard ``[B, C, S0/P, S1, ...]`` into this
rank's channel block of the full grid ``[B, C/P, S0, S1, ...]``, the FFT conv runs there, one
AllToAll brings it back (`hyena_cp.parallel.swap`; backward: the two reverse AllToAlls).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from hyena_cp.ops.boundary import check_boundaries, fft_extent, kernel_extent, kernel_offsets, short_conv_reach
from hyena_cp.ops.fftconv import fft_causal_conv1d, fft_conv_nd, fft_conv_nd_spectral
from hyena_cp.ops.short_conv import causal_depthwise_conv1d, depthwise_conv_nd
from hyena_cp.parallel import (all_gather_seq, block_halo, causal_halo_1d, channel_to_seq, check_divisible,
                               from_rank_major, group_rank, group_size, num_chunks, seq_to_channel, shard)

__all__ = ["Geometry"]

_AXES = ("L", "H W", "T H W")


@dataclass(frozen=True)
class Geometry:
    """``boundaries``: one of "causal", "linear", "circular" per spatial axis (1 to 3 axes), those of
    the long conv. ``short``: the short conv's, when they differ (a circular axis whose short conv
    pads with zeros, as nvSubquadratic's circular recipes do); None: the same."""

    boundaries: tuple[str, ...]
    short: tuple[str, ...] | None = None

    def __post_init__(self):
        if not 1 <= len(self.boundaries) <= 3:
            raise ValueError(f"spatial_dims={len(self.boundaries)} must be 1, 2 or 3")
        object.__setattr__(self, "boundaries", check_boundaries(self.boundaries, len(self.boundaries)))
        if self.short is not None:
            short = check_boundaries(self.short, len(self.boundaries))
            if any(s != b and (b, s) != ("circular", "linear") for b, s in zip(self.boundaries, short)):
                raise ValueError(f"short_conv_boundary={short} may differ from the long conv's {self.boundaries} only "
                                 f"by zero padding ('linear') on a circular axis")
            object.__setattr__(self, "short", None if short == self.boundaries else short)

    @property
    def short_boundaries(self) -> tuple[str, ...]:
        return self.boundaries if self.short is None else self.short

    def with_short_conv(self, boundary: str | Sequence[str] | None) -> "Geometry":
        """This geometry with the short conv's own boundary (one for every axis, or one per axis)."""
        if boundary is None:
            return self
        return Geometry(self.boundaries, (boundary,) * self.spatial_dims if isinstance(boundary, str) else tuple(boundary))

    @classmethod
    def of(cls, spatial_dims: int, boundary: str | Sequence[str] | None = None) -> "Geometry":
        """From ``spatial_dims`` and ``boundary``: one kind for every axis, one per axis, or None for
        the default (causal in 1-D: a sequence model; linear in 2-D and 3-D: images, volumes)."""
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        if boundary is None:
            boundary = "causal" if spatial_dims == 1 else "linear"
        if isinstance(boundary, str):
            boundary = (boundary,) * spatial_dims
        return cls(check_boundaries(boundary, spatial_dims))

    # ------------------------------------------------------------------ layout
    @property
    def spatial_dims(self) -> int:
        return len(self.boundaries)

    @property
    def layout(self) -> str:
        """The CP layout of the first axis: ``"zigzag"`` when it is causal, else ``"rows"``."""
        return "zigzag" if self.boundaries[0] == "causal" else "rows"

    @property
    def channels_last(self) -> str:
        """The input layout at the mixer's boundary, e.g. ``"[B, H, W, C]"``."""
        return f"[B, {_AXES[self.spatial_dims - 1].replace(' ', ', ')}, C]"

    def to_channels_first(self, x: Tensor) -> Tensor:
        """``[B, *S, C] -> [B, C, *S]``."""
        return rearrange(x, "b ... c -> b c ...")

    def global_size(self, local: Sequence[int], world: int) -> tuple[int, ...]:
        """The global grid of a rank's shard ``local`` (the first axis is split over ``world`` ranks)."""
        return (local[0] * world, *local[1:])

    def check_shard(self, global_size: Sequence[int], world: int, short_kernel: int, halo: bool) -> None:
        """Raise ``ValueError`` (before any collective) unless a grid of ``global_size`` splits over
        ``world`` ranks and, with a ``halo``, each shard holds the short conv's reach."""
        if world == 1:
            return
        first = global_size[0]
        what = "sequence length L" if self.spatial_dims == 1 else ("grid rows H" if self.spatial_dims == 2 else "frames T")
        check_divisible(first, self.layout, world, what)
        if not halo:
            return
        chunk = first // num_chunks(self.layout, world)
        reach = max(short_conv_reach(short_kernel, self.short_boundaries[0]))
        if chunk < reach:
            piece = (f"zigzag chunk length {what.split()[-1]}/(2*cp_size)={chunk} is shorter than"
                     if self.layout == "zigzag" else f"the {what} per rank ({chunk}) are fewer than")
            raise ValueError(f"{piece} the short-conv halo {reach} (short_kernel_size={short_kernel}); use a larger "
                             f"{what.split()[-1]}, a smaller cp_group or a smaller short_kernel_size")

    def shard_first_axis(self, t: Tensor, dim: int, world: int, rank: int) -> Tensor:
        """This rank's piece of a GLOBAL tensor along ``dim``, the first spatial axis."""
        return shard(t, dim, self.layout, world, rank)

    def valid_mask(self, size: Sequence[int], num_valid: int, world: int, rank: int, like: Tensor) -> Tensor:
        """``[*size_local]`` 1/0 mask of real tokens (global row-major position < ``num_valid``) on a
        rank's shard of the grid ``size`` (global)."""
        positions = torch.arange(math.prod(size), device=like.device).view(size)
        if world > 1:
            positions = self.shard_first_axis(positions, 0, world, rank)
        return (positions < num_valid).to(like.dtype)

    # ------------------------------------------------------------- short conv
    def short_conv(self, u: Tensor, weight: Tensor, bias: Tensor | None, cp_group,
                   positions: Tensor | None = None) -> Tensor:
        """Depthwise short conv of a rank's shard ``u [B, C, *S_local]`` (``weight [C, *K]``), its
        neighbours fetched by a halo exchange. ``positions`` (1-D packed documents): ``[B, L_local]``
        offset of each token in its document, so taps stop at a document start."""
        world, kernel = group_size(cp_group), weight.shape[-1]
        if self.boundaries == ("causal",):
            if world == 1 or kernel == 1:
                return causal_depthwise_conv1d(u, weight, bias, positions=positions)
            halos = causal_halo_1d(u, kernel - 1, cp_group)  # B, C, 2, K-1
            chunks = rearrange(u, "b c (n l) -> (b n) c l", n=2)  # the two zigzag chunks
            if positions is not None:
                positions = rearrange(positions, "b (n l) -> (b n) l", n=2)
            y = causal_depthwise_conv1d(chunks, weight, bias, rearrange(halos, "b c n k -> (b n) c k"), positions)
            return rearrange(y, "(b n) c l -> b c (n l)", n=2)
        short = self.short_boundaries
        if world == 1:
            return depthwise_conv_nd(u, weight, bias, short)
        if self.layout == "zigzag":  # a causal first axis of a grid: each chunk with the K-1 positions before it
            halos = causal_halo_1d(u.movedim(2, -1), kernel - 1, cp_group).movedim(-1, 2)  # B, C, K-1, *rest, 2
            chunks = rearrange(u, "b c (n t) ... -> (b n) c t ...", n=2)
            before = rearrange(halos, "b c k ... n -> (b n) c k ...")
            y = depthwise_conv_nd(chunks, weight, bias, short, before, None)
            return rearrange(y, "(b n) c t ... -> b c (n t) ...", n=2)
        before, after = short_conv_reach(kernel, short[0])
        halo = block_halo(u, 2, before, after, cp_group, wrap=short[0] == "circular")
        return depthwise_conv_nd(u, weight, bias, short, *halo)

    def short_conv_full(self, u: Tensor, weight: Tensor, bias: Tensor | None,
                        positions: Tensor | None = None) -> Tensor:
        """The same conv on the FULL grid ``u [B, C, *S]`` (no neighbours to fetch)."""
        if self.boundaries == ("causal",):
            return causal_depthwise_conv1d(u, weight, bias, positions=positions)
        return depthwise_conv_nd(u, weight, bias, self.short_boundaries)

    def halo_traffic(self, kernel: int, world: int, rank: int) -> tuple[int, int, int]:
        """The short conv's halo exchange on one rank: ``(peers, sent, received)`` — how many
        neighbours it exchanges messages with, and how many positions of the first axis it sends
        them and receives from them in forward (backward sends the gradients of what it received,
        to the same peers). The one description of the halo plan, for the byte floor."""
        if world == 1:
            return 0, 0, 0
        if self.layout == "zigzag":
            if kernel == 1:
                return 0, 0, 0
            peers = (rank < world - 1) + (rank > 0)  # see causal_halo_1d: the last rank's second chunk is local
            return peers, peers * (kernel - 1), peers * (kernel - 1)
        before, after = short_conv_reach(kernel, self.short_boundaries[0])
        if before + after == 0:
            return 0, 0, 0
        wrap = self.short_boundaries[0] == "circular"
        has_prev, has_succ = rank > 0 or wrap, rank + 1 < world or wrap
        peers = len({p for p, there in (((rank - 1) % world, has_prev), ((rank + 1) % world, has_succ)) if there})
        return peers, before * has_succ + after * has_prev, before * has_prev + after * has_succ

    # -------------------------------------------------------------- long conv
    def kernel_offsets(self, size: Sequence[int]) -> tuple[range, ...]:
        """Per axis, the offsets ``i - m`` of the long kernel's taps for a global grid ``size``."""
        return tuple(kernel_offsets(n, b) for n, b in zip(size, self.boundaries))

    def kernel_shape(self, size: Sequence[int]) -> tuple[int, ...]:
        return tuple(kernel_extent(n, b) for n, b in zip(size, self.boundaries))

    def long_conv(self, z: Tensor, k: Tensor, d: Tensor | None, cu_seqlens: Tensor | None = None) -> Tensor:
        """FFT long conv of the FULL grid of a channel block: ``z [B, C_blk, *S]``, ``k [G_blk, *K]`` (or
        ``[B, G_blk, *K]`` per sample), ``d [C_blk]``; ``cu_seqlens``: 1-D packed documents."""
        if self.boundaries == ("causal",) and k.dim() == 2:
            return fft_causal_conv1d(z, k, d, cu_seqlens=cu_seqlens)
        return fft_conv_nd(z, k, d, self.boundaries)

    @property
    def uses_fft_conv_nd(self) -> bool:
        """True when the long conv runs `fft_conv_nd` (every geometry but a 1-D causal sequence, which
        has its own conv with packing and the CUDA kernel)."""
        return self.boundaries != ("causal",)

    def long_conv_spectral(self, z: Tensor, k_f: Tensor, d: Tensor | None) -> Tensor:
        """`long_conv` with the kernel given as its spectrum (`hyena_cp.ops.fftconv.kernel_spectrum`)."""
        return fft_conv_nd_spectral(z, k_f, d, self.boundaries)

    def to_channel_block(self, z: Tensor, cp_group) -> Tensor:
        """``[B, C, S0/P, *S_rest]`` (a shard, every channel) -> ``[B, C/P, S0, *S_rest]`` (this rank's
        channel block of the full grid): one AllToAll."""
        rest = z.shape[3:]
        y = seq_to_channel(z.flatten(2), cp_group, self.layout)  # B, C/P, S0*prod(rest)
        return y.unflatten(2, (-1, *rest))

    def to_shard(self, y: Tensor, cp_group) -> Tensor:
        """Inverse of `to_channel_block`: ``[B, C/P, *S] -> [B, C, S0/P, *S_rest]``."""
        rest = y.shape[3:]
        y = channel_to_seq(y.flatten(2), cp_group, self.layout)  # B, C, S0/P*prod(rest)
        return y.unflatten(2, (-1, *rest))

    def gather_full(self, z: Tensor, cp_group) -> Tensor:
        """Comparison baseline: every rank's shard ``[B, C, S0/P, ...]`` all-gathered into the full grid."""
        return from_rank_major(all_gather_seq(z, 2, cp_group), 2, self.layout, group_size(cp_group))

    def local_part(self, full: Tensor, cp_group) -> Tensor:
        """This rank's shard of a full grid ``[B, C, S0, ...]``."""
        return self.shard_first_axis(full, 2, group_size(cp_group), group_rank(cp_group))

    # ------------------------------------------------------------------ FLOPs
    def fft_numel(self, size: Sequence[int]) -> int:
        """Points of the padded FFT grid of a global ``size``."""
        return math.prod(fft_extent(n, b) for n, b in zip(size, self.boundaries))

    def short_conv_taps(self, kernel: int) -> int:
        return kernel ** self.spatial_dims
