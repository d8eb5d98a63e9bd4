"""Hyena operator (order 2): ``y = q * (h * z + D z)`` with ``z = k * v`` and ``h`` an
implicit long filter, over 1, 2 or 3 spatial axes, each causal, linear (centred, global) or
circular (`hyena_cp.modules.geometry`).

Under context parallelism (``cp_group`` of size P) the operator receives shards of the first
axis and only ``z`` crosses ranks: one AllToAll turns the shard ``[B, C, S0/P, ...]`` into the
full grid of this rank's channel block ``[B, C/P, S0, ...]``, the FFT conv runs locally with
only this rank's filters, and one AllToAll brings the result back (backward: the two
reverse AllToAlls). Layouts: 1-D causal zigzag, otherwise blocks of the first axis.

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

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from hyena_cp import flops
from hyena_cp.modules.geometry import Geometry
from hyena_cp.ops.filters import ExponentialMask, FourierFilter, check_size, kernel_grid
from hyena_cp.ops.packing import check_cu_seqlens
from hyena_cp.parallel import (agreed, check_agreement_policy, check_group, check_ranks_agree, copy_to_group,
                               group_rank, group_size, shape_of)

__all__ = ["Hyena"]

Sharding = Literal["sequence", "channel"]


Factory = Callable[..., nn.Module]


def _build_part(part: nn.Module | Factory | None, role: str, num_groups: int, spatial_dims: int) -> nn.Module | None:
    """A kernel generator or mask: built by calling a factory (a class, ``functools.partial`` or a
    ``_partial_`` config) with ``num_groups`` and ``spatial_dims``, or a built module checked to match."""
    if part is None:
        return None
    if not isinstance(part, nn.Module):
        if not callable(part):
            raise ValueError(f"{role} must be a module, a factory called as {role}(num_groups=, spatial_dims=) or None; "
                             f"got {part!r}")
        part = part(num_groups=num_groups, spatial_dims=spatial_dims)
    got = (getattr(part, "num_groups", None), getattr(part, "spatial_dims", None))
    if got != (num_groups, spatial_dims):
        raise ValueError(f"{role} {type(part).__name__} has (num_groups, spatial_dims)={got}; this Hyena needs "
                         f"({num_groups}, {spatial_dims}) (num_heads, spatial_dims); build it with those")
    return part


class Hyena(nn.Module):
    """Order-2 Hyena long-convolution core.

    Args:
        hidden_dim: channels C of q, k, v (the whole layer's, also under TP).
        num_heads: filter groups; the C/num_heads channels of a group share one long
            filter. Under CP (and TP), ``num_heads % (T*P) == 0`` so a group is never split.
        spatial_dims: 1 (sequence), 2 (image grid) or 3 (video, volume).
        boundary: per spatial axis "causal", "linear" or "circular" (one string for every axis,
            or a tuple); None: causal in 1-D, linear (centred, global) in 2-D and 3-D.
        filter: the kernel generator (`hyena_cp.ops.filters`): a factory called as
            ``filter(num_groups=num_heads, spatial_dims=spatial_dims)`` (a class, a
            ``functools.partial``, or a config with ``_partial_: true``), or a built module with
            those two attributes. None: the original Hyena's `FourierFilter` from ``filter_*``.
        filter_bands, filter_width, filter_depth, filter_sin_freq: that default filter's MLP.
        mask: the window multiplied into the kernel, a factory or module like ``filter``, or None
            for no window. Default: `ExponentialMask` (Hyena's decay, radial over the axes).
        max_len: 1-D only; longest sequence the filter accepts (coordinates are normalised
            by it), or None for length-relative filters.
        max_grid: 2-D/3-D; the maximum grid ``(H, W)`` / ``(T, H, W)``, or None for size-relative filters.
        cp_comm: how the long conv crosses ranks under CP: "alltoall" (default, the
            communication floor) or "allgather" — a comparison baseline that all-gathers
            the full ``z`` (forward all-gather + backward reduce-scatter: P/2 times the
            default's bytes) and convolves every channel on every rank (P times the work).
        checkpoint_filter: recompute the filter in backward instead of storing its
            activations (see ``build_filter``).
        tp_group: tensor-parallel group (None: one process). This rank then takes q, k, v
            of its ``local_dim = C/T`` channels, starting at global channel ``channel_offset``.
        check_agreement: "always" (default): when called directly, compare the CP ranks'
            shapes before the first collective (`hyena_cp.parallel.agreement`); inside a
            `QKVSequenceMixer` the mixer has checked already. "off": trust them.
    """

    def __init__(self, *, hidden_dim: int, num_heads: int = 1, spatial_dims: int = 1,
                 boundary: str | Sequence[str] | None = None, filter: nn.Module | Factory | None = None,
                 filter_bands: int = 8, filter_width: int = 64, filter_depth: int = 2, filter_sin_freq: float = 1.0,
                 mask: nn.Module | Factory | None = ExponentialMask,
                 max_len: int | None = None, max_grid: Sequence[int] | None = None,
                 cp_comm: Literal["alltoall", "allgather"] = "alltoall", checkpoint_filter: bool = True,
                 tp_group: ProcessGroup | None = None, check_agreement: Literal["always", "off"] = "always"):
        super().__init__()
        self.check_agreement = check_agreement_policy(check_agreement)
        tp_size = group_size(tp_group)
        if cp_comm not in ("alltoall", "allgather"):
            raise ValueError(f"cp_comm={cp_comm!r} must be 'alltoall' or 'allgather'")
        self.geometry = Geometry.of(spatial_dims, boundary)
        if num_heads < 1 or hidden_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_dim={hidden_dim}; "
                             f"pick num_heads among the divisors of hidden_dim")
        if hidden_dim % tp_size or num_heads % tp_size:
            raise ValueError(f"hidden_dim={hidden_dim} and num_heads={num_heads} must be divisible by the tensor-parallel "
                             f"size {tp_size} (a TP rank owns whole filter groups); change them or the TP size")
        self.max_size = self._max_size(spatial_dims, max_len, max_grid)
        self.hidden_dim, self.num_heads, self.spatial_dims = hidden_dim, num_heads, spatial_dims
        self.cp_comm, self.checkpoint_filter = cp_comm, checkpoint_filter
        self.tp_group, self.local_dim = tp_group, hidden_dim // tp_size
        self.channel_offset = group_rank(tp_group) * self.local_dim
        if filter is None:
            filter = FourierFilter(num_heads, spatial_dims, num_bands=filter_bands, width=filter_width,
                                   depth=filter_depth, sin_freq=filter_sin_freq)
        self.filter = _build_part(filter, "filter", num_heads, spatial_dims)
        self.mask = _build_part(mask, "mask", num_heads, spatial_dims)
        # D, per channel; drawn for all C channels so a seed gives the same full operator at any TP size
        self.skip = nn.Parameter(torch.randn(hidden_dim)[self.channel_offset:self.channel_offset + self.local_dim].clone())

    @staticmethod
    def _max_size(spatial_dims: int, max_len: int | None, max_grid: Sequence[int] | None) -> tuple[int, ...] | None:
        if spatial_dims == 1 and max_grid is not None:
            raise ValueError("max_grid is for spatial_dims=2 or 3; use max_len for a 1-D Hyena")
        if spatial_dims > 1 and max_len is not None:
            raise ValueError(f"max_len is for spatial_dims=1; use max_grid (one size per axis, {spatial_dims} axes) "
                             f"for a {spatial_dims}-D Hyena")
        if max_len is not None:
            return (int(max_len),)
        if max_grid is None:
            return None
        if len(max_grid) != spatial_dims:
            raise ValueError(f"max_grid={tuple(max_grid)} must give one size per spatial axis ({spatial_dims})")
        return tuple(int(n) for n in max_grid)

    @property
    def layout(self) -> str:
        return self.geometry.layout

    @property
    def max_len(self) -> int | None:
        """1-D: the filter's fixed length (None: length-relative)."""
        return None if self.max_size is None or self.spatial_dims != 1 else self.max_size[0]

    def check_input(self, global_spatial: tuple[int, ...], world: int) -> None:
        """Raise the constraints of this operator for a global size ``(L,)``/``(H, W)`` on a
        cp_group of ``world`` ranks (called on every rank before any collective)."""
        self._references(global_spatial)
        tp = group_size(self.tp_group)
        if self.hidden_dim % (tp * world):
            raise ValueError(f"hidden_dim={self.hidden_dim} must be divisible by tp_size*cp_size={tp}*{world}; "
                             f"change hidden_dim or the context-parallel size")
        if self.num_heads % (tp * world):
            raise ValueError(f"num_heads={self.num_heads} must be divisible by tp_size*cp_size={tp}*{world} (filter "
                             f"groups are never split across ranks); set num_heads to a multiple of {tp * world}")

    def _references(self, size: tuple[int, ...]) -> tuple[float, ...]:
        names = ("max_len",) if self.spatial_dims == 1 else tuple(f"max_grid[{a}]" for a in range(self.spatial_dims))
        return check_size(size, self.max_size, names)

    def check_packing(self, cu_seqlens: torch.Tensor | None, batch: int, global_len: int) -> None:
        """Raise ``ValueError`` (before any collective) unless ``cu_seqlens`` is None or valid
        boundaries of ``batch`` rows of ``global_len`` tokens (1-D causal only)."""
        if cu_seqlens is None:
            return
        if self.geometry.layout != "zigzag":
            raise ValueError("cu_seqlens (packed sequences) is for a causal 1-D Hyena; a grid or a non-causal "
                             "sequence has no documents: pass cu_seqlens=None")
        check_cu_seqlens(cu_seqlens, batch * global_len, global_len)

    def check_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sharded: str,
                  mask: torch.Tensor | None, world: int) -> None:
        """Raise ``ValueError`` unless q, k, v (and ``mask``) fit `forward`'s contract."""
        if sharded not in ("sequence", "channel"):
            raise ValueError(f"sharded={sharded!r} must be 'sequence' (q, k, v are sequence shards) or 'channel' (they "
                             f"hold the full sequence of this rank's channel block)")
        shapes = [shape_of(t) for t in (q, k, v)]
        layout = "[B, C, " + ", ".join("L" if self.spatial_dims == 1 else "HW"[:2] if self.spatial_dims == 2 else "THW") + "]"
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
        """FFT long conv of the FULL grid of a channel block.

        Args:
            z: ``[B, C_blk, *S]`` (the global grid, this block's channels).
            channels: which of this TP rank's ``local_dim`` channels ``z`` holds (a contiguous
                block aligned to filter groups); only their filters are built.
            cu_seqlens: 1-D packed documents (GLOBAL, validated), each convolved alone.
        """
        k = self.build_filter(tuple(z.shape[2:]), self.filter_groups(channels))  # G_blk, *K
        return self.geometry.long_conv(z, k, self.skip[channels], cu_seqlens)

    def filter_groups(self, channels: slice) -> slice:
        """The filter groups of a block of this TP rank's local channels (aligned to groups)."""
        per_group = self.hidden_dim // self.num_heads
        first, last = self.channel_offset + channels.start, self.channel_offset + channels.stop  # global channels
        return slice(first // per_group, last // per_group)

    def build_filter(self, spatial: tuple[int, ...], groups: slice) -> torch.Tensor:
        """The long filters ``[G_sel, *K]`` of ``groups`` for a global grid ``spatial``, in the
        geometry's offset layout (`hyena_cp.ops.boundary.kernel_offsets`).

        The filter runs at every tap on every rank, so storing its hidden activations for
        backward would cost the same memory at any CP size; with ``checkpoint_filter`` they are
        recomputed in backward instead (a small MLP, cheap next to the FFTs) and activation
        memory keeps scaling as 1/P.

        Under autocast the filter is still built in the parameters' dtype (fp32): in bf16 the
        normalised positions ``t / L`` keep 8 significant bits, so beyond a few hundred
        positions neighbouring taps would read the same input and the long filter would turn
        into a staircase; the FFT conv it feeds runs in fp32 anyway, and the MLP is small.
        """
        params = self._filter_params()
        with torch.autocast(device_type=self.skip.device.type, enabled=False):
            if self.checkpoint_filter and torch.is_grad_enabled():
                return checkpoint(self._build, spatial, groups, params, use_reentrant=False)
            return self._build(spatial, groups, params)

    def _build(self, spatial: tuple[int, ...], groups: slice, params: dict[str, torch.Tensor] | None) -> torch.Tensor:
        weight = self.skip
        grid = kernel_grid(self.geometry.kernel_offsets(spatial), spatial, self._references(spatial),
                           device=weight.device, dtype=weight.dtype)
        parts = {"filter": self.filter, "mask": self.mask}
        if params is not None:  # under TP: the parameters after their copy_to_group
            parts = {role: module if module is None else _Bound(module, params, role) for role, module in parts.items()}
        k = parts["filter"](grid, groups)
        return k if parts["mask"] is None else k * parts["mask"](grid, groups)

    def _filter_params(self) -> dict[str, torch.Tensor] | None:
        """Under TP: the filter's and mask's parameters through ONE `copy_to_group` (flattened), so
        the TP ranks' gradients — each from its own groups — are summed in backward. None otherwise."""
        if group_size(self.tp_group) == 1:
            return None
        named = [(f"{role}.{n}", p) for role in ("filter", "mask") if getattr(self, role) is not None
                 for n, p in getattr(self, role).named_parameters()]
        if not named:
            return {}
        names, params = zip(*named)
        flat = copy_to_group(torch.cat([p.reshape(-1) for p in params]), self.tp_group)
        pieces = flat.split([p.numel() for p in params])
        return {name: piece.view_as(p) for name, piece, p in zip(names, pieces, params)}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cp_group=None,
                sharded: Sharding = "sequence", mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """``q, k, v``: ``[B, C, *S_local]``, this rank's shard of the first axis (1-D causal: the
        zigzag shard) when ``sharded="sequence"``; with ``sharded="channel"`` they already hold the
        full grid of this rank's channel block ``[B, C/P, *S]``.
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
        global_spatial = tuple(q.shape[2:]) if sharded == "channel" else self.geometry.global_size(q.shape[2:], world)
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
            full = self.geometry.gather_full(z, cp_group)  # B, C, *S
            y = self.long_conv(full, slice(0, self.local_dim), cu_seqlens)
            return q * self.geometry.local_part(y, cp_group)
        y = self.geometry.to_channel_block(z, cp_group)  # B, C/P, *S
        y = self.geometry.to_shard(self.long_conv(y, channels, cu_seqlens), cp_group)  # B, C, *S_local
        return q * y

    def flop_count(self, spatial: tuple[int, ...]) -> dict[str, float]:
        """Forward FLOP breakdown for one sample of global size ``spatial``."""
        tokens = math.prod(spatial)
        taps = math.prod(self.geometry.kernel_shape(spatial))
        return {
            "filter_mlp": self.filter.flop_count(taps),
            "fft_conv": flops.fft_conv(self.hidden_dim, self.num_heads, self.geometry.fft_numel(spatial)),
            # z = k*v, D*z + conv, q*y: 4 elementwise FLOPs per token-channel
            "gating": 4 * tokens * self.hidden_dim,
        }


class _Bound:
    """A filter or mask called with substitute parameters (``params`` keys ``"<role>.<name>"``)."""

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor], role: str):
        prefix = role + "."
        self.module = module
        self.params = {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}

    def __call__(self, *args):
        return functional_call(self.module, self.params, args)
