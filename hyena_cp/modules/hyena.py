"""Hyena operator (order 2): ``y = q * (h * z + D z)`` with ``z = k * v`` and ``h`` an
implicit long filter, in 1-D (causal) and 2-D (centred, global).

Under context parallelism (``cp_group`` of size P) the operator receives sequence shards
and only ``z`` crosses ranks: one AllToAll turns the shard ``[B, C, L/P]`` into the full
sequence of this rank's channel block ``[B, C/P, L]``, the FFT conv runs locally with
only this rank's filters, and one AllToAll brings the result back (backward: the two
reverse AllToAlls). Layouts: 1-D zigzag, 2-D row blocks (see ``hyena_cp.parallel.layouts``).

Tensor parallelism (``tp_group`` of size T, fixed at construction): a TP rank owns the
C/T channels ``[t*C/T, (t+1)*C/T)`` of q, k, v and their skip ``D`` (a TP-sharded parameter),
and under CP moves only those channels, so a rank convolves C/(T*P) channels. The implicit
filter is tiny and REPLICATED on every TP rank; each TP rank builds only the filters of its
own groups, and the filter's parameters pass through `copy_to_group` (one all-reduce of
their gradients in backward) so every TP replica holds the whole filter gradient — the
same gradient the single-process operator computes.

Packed sequences (1-D, ``cu_seqlens``: GLOBAL document boundaries over the B rows laid end to
end, `hyena_cp.ops.packing`): the long conv restarts at every document. Under CP it runs
after the AllToAll on the full sequence, in natural order, of a channel block, so the
per-document conv is local there and needs no extra communication: the same two AllToAlls
move the same bytes whatever the boundaries.
"""
from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from torch import nn
from torch.distributed import ProcessGroup
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from hyena_cp import flops
from hyena_cp.ops.fftconv import fft_causal_conv1d, fft_conv2d, fft_size
from hyena_cp.ops.filters import ImplicitFilter1d, ImplicitFilter2d
from hyena_cp.ops.packing import check_cu_seqlens
from hyena_cp.parallel import (agreed, all_gather_seq, channel_to_seq, check_agreement_policy, check_group,
                               check_ranks_agree, copy_to_group, from_rank_major, group_rank, group_size,
                               seq_to_channel, shape_of, shard)

__all__ = ["Hyena"]

Sharding = Literal["sequence", "channel"]


class Hyena(nn.Module):
    """Order-2 Hyena long-convolution core.

    Args:
        hidden_dim: channels C of q, k, v (the whole layer's, also under TP).
        num_heads: filter groups; the C/num_heads channels of a group share one long
            filter. Under CP (and TP), ``num_heads % (T*P) == 0`` so a group is never split.
        spatial_dims: 1 (causal sequence) or 2 (image grid, centred global filter).
        filter_bands, filter_width, filter_depth, filter_sin_freq: implicit filter MLP.
        max_len: 1-D only; longest sequence the filter accepts (positions are normalised
            by it), or None for length-relative filters.
        max_grid: 2-D only; ``(H, W)`` maximum, or None for size-relative filters.
        cp_comm: how the long conv crosses ranks under CP: "alltoall" (default, the
            communication floor) or "allgather" — a comparison baseline that all-gathers
            the full ``z`` (forward all-gather + backward reduce-scatter: P/2 times the
            default's bytes) and convolves every channel on every rank (P times the work).
        checkpoint_filter: recompute the filter MLP in backward instead of storing its
            activations (see ``build_filter``).
        tp_group: tensor-parallel group (None: one process). This rank then takes q, k, v
            of its ``local_dim = C/T`` channels, starting at global channel ``channel_offset``.
        check_agreement: "always" (default): when called directly, compare the CP ranks'
            shapes before the first collective (`hyena_cp.parallel.agreement`); inside a
            `QKVSequenceMixer` the mixer has checked already. "off": trust them.
    """

    def __init__(self, *, hidden_dim: int, num_heads: int = 1, spatial_dims: int = 1, filter_bands: int = 8,
                 filter_width: int = 64, filter_depth: int = 2, filter_sin_freq: float = 1.0,
                 max_len: int | None = None, max_grid: tuple[int, int] | None = None,
                 cp_comm: Literal["alltoall", "allgather"] = "alltoall", checkpoint_filter: bool = True,
                 tp_group: ProcessGroup | None = None, check_agreement: Literal["always", "off"] = "always"):
        super().__init__()
        self.check_agreement = check_agreement_policy(check_agreement)
        tp_size = group_size(tp_group)
        if cp_comm not in ("alltoall", "allgather"):
            raise ValueError(f"cp_comm={cp_comm!r} must be 'alltoall' or 'allgather'")
        if spatial_dims not in (1, 2):
            raise ValueError(f"spatial_dims must be 1 or 2, got {spatial_dims}")
        if num_heads < 1 or hidden_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_dim={hidden_dim}; "
                             f"pick num_heads among the divisors of hidden_dim")
        if hidden_dim % tp_size or num_heads % tp_size:
            raise ValueError(f"hidden_dim={hidden_dim} and num_heads={num_heads} must be divisible by the tensor-parallel "
                             f"size {tp_size} (a TP rank owns whole filter groups); change them or the TP size")
        if spatial_dims == 1 and max_grid is not None:
            raise ValueError("max_grid is for spatial_dims=2; use max_len for a 1-D Hyena")
        if spatial_dims == 2 and max_len is not None:
            raise ValueError("max_len is for spatial_dims=1; use max_grid=(H, W) for a 2-D Hyena")
        self.hidden_dim, self.num_heads, self.spatial_dims = hidden_dim, num_heads, spatial_dims
        self.cp_comm, self.checkpoint_filter = cp_comm, checkpoint_filter
        self.tp_group, self.local_dim = tp_group, hidden_dim // tp_size
        self.channel_offset = group_rank(tp_group) * self.local_dim
        common = dict(num_bands=filter_bands, width=filter_width, depth=filter_depth, sin_freq=filter_sin_freq)
        if spatial_dims == 1:
            self.filter = ImplicitFilter1d(num_heads, max_len=max_len, **common)
        else:
            self.filter = ImplicitFilter2d(num_heads, max_grid=max_grid, **common)
        # D, per channel; drawn for all C channels so a seed gives the same full operator at any TP size
        self.skip = nn.Parameter(torch.randn(hidden_dim)[self.channel_offset:self.channel_offset + self.local_dim].clone())

    @property
    def layout(self) -> str:
        return "zigzag" if self.spatial_dims == 1 else "rows"

    def check_input(self, global_spatial: tuple[int, ...], world: int) -> None:
        """Raise the constraints of this operator for a global size ``(L,)``/``(H, W)`` on a
        cp_group of ``world`` ranks (called on every rank before any collective)."""
        self.filter.check_size(*global_spatial)
        tp = group_size(self.tp_group)
        if self.hidden_dim % (tp * world):
            raise ValueError(f"hidden_dim={self.hidden_dim} must be divisible by tp_size*cp_size={tp}*{world}; "
                             f"change hidden_dim or the context-parallel size")
        if self.num_heads % (tp * world):
            raise ValueError(f"num_heads={self.num_heads} must be divisible by tp_size*cp_size={tp}*{world} (filter "
                             f"groups are never split across ranks); set num_heads to a multiple of {tp * world}")

    def check_packing(self, cu_seqlens: torch.Tensor | None, batch: int, global_len: int) -> None:
        """Raise ``ValueError`` (before any collective) unless ``cu_seqlens`` is None or valid
        boundaries of ``batch`` rows of ``global_len`` tokens (1-D only)."""
        if cu_seqlens is None:
            return
        if self.spatial_dims != 1:
            raise ValueError("cu_seqlens (packed sequences) is for 1-D Hyena; a 2-D grid has no documents: "
                             "pass cu_seqlens=None")
        check_cu_seqlens(cu_seqlens, batch * global_len, global_len)

    def check_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sharded: str,
                  mask: torch.Tensor | None, world: int) -> None:
        """Raise ``ValueError`` unless q, k, v (and ``mask``) fit `forward`'s contract."""
        if sharded not in ("sequence", "channel"):
            raise ValueError(f"sharded={sharded!r} must be 'sequence' (q, k, v are sequence shards) or 'channel' (they "
                             f"hold the full sequence of this rank's channel block)")
        shapes = [shape_of(t) for t in (q, k, v)]
        layout = "[B, C, L]" if self.spatial_dims == 1 else "[B, C, H, W]"
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or len(set(shapes)) != 1 \
                or q.dim() != 2 + self.spatial_dims:
            raise ValueError(f"q, k, v must be tensors of one shape {layout} (channels first), got {shapes}")
        channels = self.local_dim if sharded == "sequence" else self.local_dim // world
        if q.shape[1] != channels:
            raise ValueError(f"q, k, v have {q.shape[1]} channels; with sharded={sharded!r} they must have {channels} "
                             f"(local_dim={self.local_dim}" + (f" / cp_size={world})" if sharded == "channel" else ")"))
        if mask is not None:
            try:
                fits = isinstance(mask, torch.Tensor) and torch.broadcast_shapes(mask.shape, q.shape) == q.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(f"mask must be a tensor broadcastable to q's shape {tuple(q.shape)} (1 = real token, "
                                 f"0 = padding), got {shape_of(mask)}")

    def long_conv(self, z: torch.Tensor, channels: slice, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """FFT long conv of the FULL sequence/grid of a channel block.

        Args:
            z: ``[B, C_blk, L]`` or ``[B, C_blk, H, W]`` (global sequence, this block's channels).
            channels: which of this TP rank's ``local_dim`` channels ``z`` holds (a contiguous
                block aligned to filter groups); only their filters are built.
            cu_seqlens: 1-D packed documents (GLOBAL, validated), each convolved alone.
        """
        k = self.build_filter(tuple(z.shape[2:]), self.filter_groups(channels))  # G_blk, L  or  G_blk, 2H-1, 2W-1
        if self.spatial_dims == 2:
            return fft_conv2d(z, k, self.skip[channels])
        return fft_causal_conv1d(z, k, self.skip[channels], cu_seqlens=cu_seqlens)

    def filter_groups(self, channels: slice) -> slice:
        """The filter groups of a block of this TP rank's local channels (aligned to groups)."""
        per_group = self.hidden_dim // self.num_heads
        first, last = self.channel_offset + channels.start, self.channel_offset + channels.stop  # global channels
        return slice(first // per_group, last // per_group)

    def build_filter(self, spatial: tuple[int, ...], groups: slice) -> torch.Tensor:
        """The long filters of ``groups`` for a global size ``(L,)`` or ``(H, W)``.

        The filter MLP runs at every global position on every rank, so storing its hidden
        activations for backward would cost the same memory at any CP size; with
        ``checkpoint_filter`` they are recomputed in backward instead (a small MLP, cheap
        next to the FFTs) and activation memory keeps scaling as 1/P.

        Under autocast the filter is still built in the parameters' dtype (fp32): in bf16 the
        normalised positions ``t / L`` keep 8 significant bits, so beyond a few hundred
        positions neighbouring taps would read the same input and the long filter would turn
        into a staircase; the FFT conv it feeds runs in fp32 anyway, and the MLP is small.
        """
        params = self._filter_params()
        build = self.filter if params is None else lambda *args: functional_call(self.filter, params, args)
        with torch.autocast(device_type=self.skip.device.type, enabled=False):
            if self.checkpoint_filter and torch.is_grad_enabled():
                return checkpoint(build, *spatial, groups, use_reentrant=False)
            return build(*spatial, groups)

    def _filter_params(self) -> dict[str, torch.Tensor] | None:
        """Under TP: the filter's parameters through ONE `copy_to_group` (flattened), so the
        TP ranks' gradients — each from its own groups — are summed in backward. None otherwise."""
        if group_size(self.tp_group) == 1:
            return None
        names, params = zip(*self.filter.named_parameters())
        flat = copy_to_group(torch.cat([p.reshape(-1) for p in params]), self.tp_group)
        pieces = flat.split([p.numel() for p in params])
        return {name: piece.view_as(p) for name, piece, p in zip(names, pieces, params)}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cp_group=None,
                sharded: Sharding = "sequence", mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """``q, k, v``: ``[B, C, L_local]`` (1-D, zigzag shard) or ``[B, C, H_local, W]`` (2-D, row
        block) when ``sharded="sequence"``; with ``sharded="channel"`` they already hold the
        full sequence of this rank's channel block ``[B, C/P, L]`` / ``[B, C/P, H, W]``.
        Under TP, C is this rank's ``local_dim`` channels.
        ``mask`` (1 = real token, 0 = padding), broadcastable to ``z`` in the same layout,
        zeroes padded positions of ``z`` so the long conv never carries them to real tokens.
        ``cu_seqlens`` (1-D): packed documents ``[N+1]``, GLOBAL boundaries over the B rows laid
        end to end, the same on every rank; the long conv restarts at each document.
        Returns ``q * (h * z + D z)`` in the same layout as ``q``."""
        check_group(cp_group)
        signature = {"q.shape": shape_of(q), "k.shape": shape_of(k), "v.shape": shape_of(v),
                     "q.dtype": getattr(q, "dtype", None), "mask.shape": shape_of(mask), "cu_seqlens": cu_seqlens}
        k = check_ranks_agree(cp_group, "Hyena.forward", signature, policy=self.check_agreement,
                              hint="Give every rank of the cp_group its shard of the same global q, k, v", before=k)
        world = group_size(cp_group)
        self.check_qkv(q, k, v, sharded, mask, world)
        global_spatial = tuple(q.shape[2:]) if sharded == "channel" else (q.shape[2] * world, *q.shape[3:])
        self.check_input(global_spatial, world)
        self.check_packing(cu_seqlens, q.shape[0], global_spatial[0])
        with agreed(cp_group):
            return self._forward(q, k, v, cp_group, sharded, mask, cu_seqlens)

    def _forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group, sharded: Sharding,
                 mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        world, rank = group_size(cp_group), group_rank(cp_group)
        block = self.local_dim // world
        channels = slice(rank * block, (rank + 1) * block)  # of this TP rank's local channels
        z = k * v if mask is None else k * v * mask
        if sharded == "channel" or world == 1:
            return q * self.long_conv(z, channels, cu_seqlens)
        if self.cp_comm == "allgather":
            return q * self._long_conv_allgather(z, cp_group, cu_seqlens)
        if self.spatial_dims == 1:
            y = seq_to_channel(z, cp_group, "zigzag")  # B, C/P, L
            y = channel_to_seq(self.long_conv(y, channels, cu_seqlens), cp_group, "zigzag")  # B, C, L/P
            return q * y
        width = z.shape[-1]
        y = seq_to_channel(rearrange(z, "b c h w -> b c (h w)"), cp_group, "rows")  # B, C/P, H*W
        y = self.long_conv(rearrange(y, "b c (h w) -> b c h w", w=width), channels)
        y = channel_to_seq(rearrange(y, "b c h w -> b c (h w)"), cp_group, "rows")  # B, C, H/P*W
        return q * rearrange(y, "b c (h w) -> b c h w", w=width)

    def _long_conv_allgather(self, z: torch.Tensor, cp_group, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """Baseline: gather the full ``z`` on every rank, convolve all C channels, keep the
        local positions. ``z``: this rank's shard ``[B, C, L_loc]`` / ``[B, C, H_loc, W]``."""
        world, rank = group_size(cp_group), group_rank(cp_group)
        full = from_rank_major(all_gather_seq(z, 2, cp_group), 2, self.layout, world)  # B, C, L / B, C, H, W
        y = self.long_conv(full, slice(0, self.local_dim), cu_seqlens)
        return shard(y, 2, self.layout, world, rank)

    def flop_count(self, spatial: tuple[int, ...]) -> dict[str, float]:
        """Forward FLOP breakdown for one sample of global size ``spatial`` ((L,) or (H, W))."""
        tokens = 1
        for s in spatial:
            tokens *= s
        fft_numel = 1
        for s in spatial:
            fft_numel *= fft_size(s)
        filt = self.filter.flop_count(*spatial)
        return {
            "filter_mlp": filt,
            "fft_conv": flops.fft_conv(self.hidden_dim, self.num_heads, fft_numel),
            # z = k*v, D*z + conv, q*y: 4 elementwise FLOPs per token-channel
            "gating": 4 * tokens * self.hidden_dim,
        }
