"""Hyena operator (order 2): ``y = q * (h * z + D z)`` with ``z = k * v`` and ``h`` an
implicit long filter, over 1, 2 or 3 spatial axes, each causal, linear (centred, global) or
circular (`hyena_cp.modules.geometry`). Optional gates and norms around it (`hyena_cp.modules.gating`)
give ``y = σ_o(q) * (h * z + D z)``, ``z = N_c(N_k(k) * σ_i(N_v(v)))``. The filter is a generator
evaluated on the kernel's grid times a mask (`hyena_cp.ops.filters`, `.siren`, `.masks`); a
FiLM-conditioned generator makes one filter bank per sample from ``conditioning``.

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

Explicit filters (a generator with ``fir_length = K``, `hyena_cp.ops.explicit`: StripedHyena 2's
SE and MR operators) are finite: the conv is a DIRECT causal convolution of K taps, not an FFT.
Under CP it runs on the zigzag shard itself, with the K-1 tokens before each chunk fetched by the
geometry's point-to-point halo (`hyena_cp.parallel.causal_halo_1d`) and no AllToAll; a zigzag
chunk shorter than K-1 is refused (``ValueError`` on every rank, before any collective). Filter
groups are then never split by CP, only by TP.

Packed sequences (1-D, ``cu_seqlens``: GLOBAL document boundaries over the B rows laid end to
end, `hyena_cp.ops.packing`): the long conv restarts at every document. Under CP it runs
after the AllToAll on the full sequence, in natural order, of a channel block, so the
per-document conv is local there and needs no extra communication: the same two AllToAlls
move the same bytes whatever the boundaries.

Spectral kernels: a generator whose kernel is a linear output layer over W hidden features (it has
``features``) lets the N-D FFT conv take the kernel's SPECTRUM as that layer over the features'
spectra (`hyena_cp.ops.fftconv.kernel_spectrum`): W + 1 transforms instead of one per filter group,
forward and backward. ``Hyena(spectral_kernel=)`` chooses (`use_spectral`); the result is the same.

The argument checks (every rule a call must meet, raised on every rank before any collective) are
the `hyena_cp.modules.hyena_checks.HyenaChecks` mixin.
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
from hyena_cp.modules.gating import Gating
from hyena_cp.modules.geometry import Geometry
from hyena_cp.modules.hyena_checks import HyenaChecks, Sharding
from hyena_cp.ops.fftconv import kernel_spectrum
from hyena_cp.ops.filters import FourierFilter, kernel_grid
from hyena_cp.ops.masks import ExponentialMask
from hyena_cp.ops.packing import document_positions
from hyena_cp.parallel import (agreement, check_agreement_policy, copy_to_group, group_rank, group_size, shape_of,
                               shard)

__all__ = ["Hyena"]

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


class Hyena(HyenaChecks, nn.Module):
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
            those two attributes. None: the original Hyena's `FourierFilter` from ``filter_*`` and
            ``max_len`` / ``max_grid``. A generator with ``fir_length`` (`hyena_cp.ops.explicit`)
            runs as a direct causal conv (see the module docstring).
        filter_bands, filter_width, filter_depth, filter_sin_freq: that default filter's MLP.
        mask: the window multiplied into the kernel, a factory or module like ``filter``, or None
            for no window. Default: `ExponentialMask` (Hyena's decay, radial over the axes).
        max_len: default filter, 1-D; longest sequence it accepts (coordinates are offsets / max_len),
            or None for length-relative filters.
        max_grid: default filter, 2-D/3-D; the maximum grid ``(H, W)`` / ``(T, H, W)``, or None.
        skip: the per-channel skip ``D z`` (True) or none.
        inner_gate, outer_gate, qk_norm, conv_norm, conv_norm_groups, norm_eps, conv_norm_eps: gates and
            norms (`hyena_cp.modules.gating.Gating`; ``conv_norm_eps`` None: ``norm_eps``).
        cp_comm: how the long conv crosses ranks under CP: "alltoall" (default, the
            communication floor) or "allgather" — a comparison baseline that all-gathers
            the full ``z`` (forward all-gather + backward reduce-scatter: P/2 times the
            default's bytes) and convolves every channel on every rank (P times the work).
            An explicit filter (``fir_length``) has no long-conv collective: "alltoall" only.
        checkpoint_filter: recompute the filter in backward instead of storing its
            activations (see ``build_filter``).
        tp_group: tensor-parallel group (None: one process). This rank then takes q, k, v
            of its ``local_dim = C/T`` channels, starting at global channel ``channel_offset``.
        check_agreement: "always" (default): when called directly, compare the CP ranks'
            shapes before the first collective (`hyena_cp.parallel.agreement`); inside a
            `QKVSequenceMixer` the mixer has checked already. "off": trust them.
        spectral_kernel: how the FFT conv gets a generator's kernel (`use_spectral`; it changes the cost,
            never the result): False (default) builds the kernel, True takes the spectrum of the
            generator's features whenever that applies, None when that needs fewer transforms than
            the filter groups. False by default: on CPU the spectral path measured 0.85-0.97x the
            kernel path's speed at 64x64 and 0.98-1.10x at larger grids (docs/benchmarks.md).
            Also an attribute, to switch an operator.
    """

    def __init__(self, *, hidden_dim: int, num_heads: int = 1, spatial_dims: int = 1,
                 boundary: str | Sequence[str] | None = None, filter: nn.Module | Factory | None = None,
                 filter_bands: int = 8, filter_width: int = 64, filter_depth: int = 2, filter_sin_freq: float = 1.0,
                 mask: nn.Module | Factory | None = ExponentialMask,
                 max_len: int | None = None, max_grid: Sequence[int] | None = None, skip: bool = True,
                 inner_gate: str | None = None, outer_gate: str | None = None, qk_norm: str | None = None,
                 conv_norm: str | None = None, conv_norm_groups: int = 1, norm_eps: float | None = None,
                 conv_norm_eps: float | None = None,
                 cp_comm: Literal["alltoall", "allgather"] = "alltoall", checkpoint_filter: bool = True,
                 tp_group: ProcessGroup | None = None, check_agreement: Literal["always", "off"] = "always",
                 spectral_kernel: bool | None = False):
        super().__init__()
        if spectral_kernel not in (None, True, False):
            raise ValueError(f"spectral_kernel={spectral_kernel!r} must be None (when it needs fewer transforms), True or False")
        self.spectral_kernel = spectral_kernel
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
        max_size = self._max_size(spatial_dims, max_len, max_grid)
        if filter is None:
            filter = FourierFilter(num_heads, spatial_dims, num_bands=filter_bands, width=filter_width,
                                   depth=filter_depth, sin_freq=filter_sin_freq, max_size=max_size)
        elif max_size is not None:
            raise ValueError("max_len / max_grid configure the default filter; with filter= given, set its own "
                             "size settings (e.g. SirenFilter's L_cache)")
        self.hidden_dim, self.num_heads, self.spatial_dims = hidden_dim, num_heads, spatial_dims
        self.cp_comm, self.checkpoint_filter = cp_comm, checkpoint_filter
        self.tp_group, self.local_dim = tp_group, hidden_dim // tp_size
        self.channel_offset = group_rank(tp_group) * self.local_dim
        self.filter = _build_part(filter, "filter", num_heads, spatial_dims)
        self.mask = _build_part(mask, "mask", num_heads, spatial_dims)
        if getattr(self.filter, "causal_only", False) and self.geometry.boundaries != ("causal",):
            raise ValueError(f"{type(self.filter).__name__} is a causal filter (taps at offsets 0, 1, 2, ...): it needs "
                             f"spatial_dims=1 and boundary='causal', got {self.geometry.boundaries}")
        self.fir_length = getattr(self.filter, "fir_length", None)  # explicit taps: a direct conv
        if self.fir_length is not None and (self.geometry.boundaries != ("causal",) or cp_comm != "alltoall"):
            raise ValueError(f"an explicit filter (fir_length={self.fir_length}) runs as a direct causal conv with a "
                             f"halo under CP: it needs spatial_dims=1, boundary='causal' and cp_comm='alltoall' (got "
                             f"{self.geometry.boundaries}, {cp_comm!r})")
        self.cond_dim = getattr(self.filter, "cond_dim", None)
        if self.cond_dim is not None and tp_size > 1:
            raise ValueError("a conditioned filter (cond_dim set) is not supported with tensor parallelism")
        self.gating = Gating(hidden_dim, inner_gate=inner_gate, outer_gate=outer_gate, qk_norm=qk_norm,
                             conv_norm=conv_norm, conv_norm_groups=conv_norm_groups, norm_eps=norm_eps,
                             conv_norm_eps=conv_norm_eps,
                             tp_group=tp_group)
        # D, per channel; drawn for all C channels so a seed gives the same full operator at any TP size
        d = torch.randn(hidden_dim)[self.channel_offset:self.channel_offset + self.local_dim].clone()
        self.skip = nn.Parameter(d) if skip else None

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
        """1-D: the longest sequence the filter accepts (None: any)."""
        size = getattr(self.filter, "max_size", None)
        return None if size is None or self.spatial_dims != 1 else size[0]

    @property
    def dtype_like(self) -> torch.Tensor:
        """A parameter whose dtype and device are the operator's (the filter's output layer)."""
        return next(self.filter.parameters())

    def long_conv(self, z: torch.Tensor, channels: slice, cu_seqlens: torch.Tensor | None = None,
                  conditioning: torch.Tensor | None = None) -> torch.Tensor:
        """FFT long conv of the FULL grid of a channel block.

        Args:
            z: ``[B, C_blk, *S]`` (the global grid, this block's channels).
            channels: which of this TP rank's ``local_dim`` channels ``z`` holds (a contiguous
                block aligned to filter groups); only their filters are built.
            cu_seqlens: 1-D packed documents (GLOBAL, validated), each convolved alone.
            conditioning: ``[B, cond_dim]`` for a conditioned filter (one bank per sample).
        """
        if self.fir_length is not None:
            return self.fir_conv(z, channels, None, cu_seqlens)
        size, groups = tuple(z.shape[2:]), self.filter_groups(channels)
        skip = None if self.skip is None else self.skip[channels]
        if self.use_spectral(groups):
            return self.geometry.long_conv_spectral(z, self.build_spectrum(size, groups, conditioning), skip)
        k = self.build_filter(size, groups, conditioning)  # [B,] G_blk, *K
        return self.geometry.long_conv(z, k, skip, cu_seqlens)

    def use_spectral(self, groups: slice) -> bool:
        """Whether the long conv of ``groups`` takes its kernel as a spectrum (`build_spectrum`). It
        applies to the N-D FFT conv (not the 1-D causal one: packing, the CUDA kernel), a generator
        with ``features`` (a linear output layer ``out``), no mask (a window multiplies the kernel tap
        by tap, which the features' spectra cannot) and one TP rank (the TP path binds the parameters
        through `copy_to_group`). With ``spectral_kernel=None`` only when it needs fewer transforms:
        W + 1 features (with the bias) against one per selected group (G_sel; under CP, num_heads / P)."""
        if self.spectral_kernel is False or self.mask is not None or group_size(self.tp_group) > 1 \
                or not self.geometry.uses_fft_conv_nd or not hasattr(self.filter, "features"):
            return False
        transforms = self.filter.out.in_features + (self.filter.out.bias is not None)
        return bool(self.spectral_kernel) or transforms < len(range(self.num_heads)[groups])

    def build_spectrum(self, spatial: tuple[int, ...], groups: slice,
                       conditioning: torch.Tensor | None = None) -> torch.Tensor:
        """The spectrum of `build_filter`'s kernel, ``[G_sel, *F]`` (``[B, G_sel, *F]`` conditioned), as the
        generator's output layer applied to the spectrum of its features (`hyena_cp.ops.fftconv.kernel_spectrum`).
        Built in the parameters' dtype with autocast off and recomputed in backward under
        ``checkpoint_filter``, for the reasons `build_filter` gives."""
        return self._run_filter_net(self._spectrum, spatial, groups, conditioning)

    def _spectrum(self, spatial: tuple[int, ...], groups: slice, conditioning: torch.Tensor | None) -> torch.Tensor:
        grid = self._kernel_grid(spatial)
        h = self.filter.features(grid, conditioning) if conditioning is not None else self.filter.features(grid)
        out = self.filter.out
        return kernel_spectrum(h, out.weight[groups], None if out.bias is None else out.bias[groups], grid.shape,
                               spatial, self.geometry.boundaries)

    def fir_conv(self, z: torch.Tensor, channels: slice, cp_group, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Direct causal conv of an explicit filter (``fir_length`` K): ``z [B, C_sel, L_local]`` is this
        rank's zigzag shard of the channels ``channels`` (of this TP rank's) when ``cp_group`` has P > 1
        ranks — the K-1 tokens before each chunk come by the geometry's halo exchange — else the full
        sequence. ``cu_seqlens``: GLOBAL packed documents; taps stop at a document start."""
        taps = self.build_filter((self.fir_length,), self.filter_groups(channels))  # G_sel, K (k[:, 0]: current)
        weight = taps.flip(-1).repeat_interleave(z.shape[1] // taps.shape[0], dim=0)  # C_sel, K (weight[:, -1]: current)
        world = group_size(cp_group)
        positions = None
        if cu_seqlens is not None:
            batch, length = z.shape[0], z.shape[-1] * world
            positions = document_positions(cu_seqlens.to(z.device), batch * length).view(batch, length)  # B, L
            positions = shard(positions, 1, "zigzag", world, group_rank(cp_group)) if world > 1 else positions
        y = self.geometry.short_conv(z, weight, None, cp_group, positions)
        return y if self.skip is None else y + z * self.skip[channels, None].to(z.dtype)

    def filter_groups(self, channels: slice) -> slice:
        """The filter groups of a block of this TP rank's local channels (aligned to groups)."""
        per_group = self.hidden_dim // self.num_heads
        first, last = self.channel_offset + channels.start, self.channel_offset + channels.stop  # global channels
        return slice(first // per_group, last // per_group)

    def build_filter(self, spatial: tuple[int, ...], groups: slice,
                     conditioning: torch.Tensor | None = None) -> torch.Tensor:
        """The long filters ``[G_sel, *K]`` (``[B, G_sel, *K]`` when conditioned) of ``groups`` for a
        global grid ``spatial``, in the geometry's offset layout (`hyena_cp.ops.boundary.kernel_offsets`).

        The filter runs at every tap on every rank, so storing its hidden activations for
        backward would cost the same memory at any CP size; with ``checkpoint_filter`` they are
        recomputed in backward instead (a small MLP, cheap next to the FFTs) and activation
        memory keeps scaling as 1/P.

        Under autocast the filter is still built in the parameters' dtype (fp32): in bf16 the
        normalised positions ``t / L`` keep 8 significant bits, so beyond a few hundred
        positions neighbouring taps would read the same input and the long filter would turn
        into a staircase; the FFT conv it feeds runs in fp32 anyway, and the MLP is small.
        """
        return self._run_filter_net(self._build, spatial, groups, self._filter_params(), conditioning)

    def _run_filter_net(self, fn, *args):
        """``fn(*args)`` in the parameters' dtype (autocast off) and, under ``checkpoint_filter``,
        recomputed in backward: `build_filter` says why."""
        with torch.autocast(device_type=self.dtype_like.device.type, enabled=False):
            if self.checkpoint_filter and torch.is_grad_enabled():
                return checkpoint(fn, *args, use_reentrant=False)
            return fn(*args)

    def _kernel_grid(self, spatial: tuple[int, ...]):
        """The generator's coordinates of every tap of a global grid ``spatial``, in the geometry's offset layout."""
        like = self.dtype_like
        return kernel_grid(self.geometry.kernel_offsets(spatial), spatial, self.filter.reference(spatial),
                           device=like.device, dtype=like.dtype)

    def _build(self, spatial: tuple[int, ...], groups: slice, params: dict[str, torch.Tensor] | None,
               conditioning: torch.Tensor | None) -> torch.Tensor:
        grid = self._kernel_grid(spatial)
        parts = {"filter": self.filter, "mask": self.mask}
        if params is not None:  # under TP: the parameters after their copy_to_group
            parts = {role: module if module is None else _Bound(module, params, role) for role, module in parts.items()}
        k = parts["filter"](grid, groups, conditioning) if conditioning is not None else parts["filter"](grid, groups)
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
                cu_seqlens: torch.Tensor | None = None, conditioning: torch.Tensor | None = None) -> torch.Tensor:
        """``q, k, v``: ``[B, C, *S_local]``, this rank's shard of the first axis (causal: the zigzag
        shard) when ``sharded="sequence"``; with ``sharded="channel"`` they already hold the full grid
        of this rank's channel block ``[B, C/P, *S]``. Under TP, C is this rank's ``local_dim`` channels.
        ``mask`` (1 = real token, 0 = padding), broadcastable to ``z`` in the same layout,
        zeroes padded positions of ``z`` so the long conv never carries them to real tokens.
        ``cu_seqlens`` (1-D): packed documents ``[N+1]``, GLOBAL boundaries over the B rows laid
        end to end, the same on every rank; the long conv restarts at each document.
        ``conditioning``: ``[B, cond_dim]``, the same on every rank, for a conditioned filter.
        Returns ``σ_o(q) * (h * z + D z)`` in the same layout as ``q``."""
        signature = {"q.shape": shape_of(q), "k.shape": shape_of(k), "v.shape": shape_of(v),
                     "q.dtype": getattr(q, "dtype", None), "mask.shape": shape_of(mask), "cu_seqlens": cu_seqlens,
                     "conditioning.shape": shape_of(conditioning)}
        with agreement(cp_group, "Hyena.forward", signature, policy=self.check_agreement, before=k,
                       hint="Give every rank of the cp_group its shard of the same global q, k, v") as k:
            self._check_call(q, k, v, cp_group, sharded, mask, cu_seqlens, conditioning)
            return self._forward(q, k, v, cp_group, sharded, mask, cu_seqlens, conditioning)

    def _forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group, sharded: Sharding,
                 mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                 conditioning: torch.Tensor | None) -> torch.Tensor:
        world, rank = group_size(cp_group), group_rank(cp_group)
        block = self.local_dim // world
        channels = slice(rank * block, (rank + 1) * block)  # of this TP rank's local channels
        z = self.gating.inner(k, v, cp_group if sharded == "sequence" else None, mask)
        if self.fir_length is not None and sharded == "sequence" and world > 1:  # halo, no AllToAll
            return self.gating.outer(q, self.fir_conv(z, slice(0, self.local_dim), cp_group, cu_seqlens))
        if sharded == "channel" or world == 1:
            return self.gating.outer(q, self.long_conv(z, channels, cu_seqlens, conditioning))
        if self.cp_comm == "allgather":
            full = self.geometry.gather_full(z, cp_group)  # B, C, *S
            y = self.long_conv(full, slice(0, self.local_dim), cu_seqlens, conditioning)
            return self.gating.outer(q, self.geometry.local_part(y, cp_group))
        y = self.geometry.to_channel_block(z, cp_group)  # B, C/P, *S
        y = self.geometry.to_shard(self.long_conv(y, channels, cu_seqlens, conditioning), cp_group)  # B, C, *S_local
        return self.gating.outer(q, y)

    def flop_count(self, spatial: tuple[int, ...]) -> dict[str, float]:
        """Forward FLOP breakdown for one sample of global size ``spatial``."""
        tokens = math.prod(spatial)
        gating = self.gating.flop_count(tokens, self.hidden_dim) + 2 * tokens * self.hidden_dim
        if self.fir_length is not None:
            return {"filter_mlp": self.filter.flop_count(self.fir_length),
                    "fir_conv": flops.depthwise_conv(tokens, self.hidden_dim, self.fir_length), "gating": gating}
        taps, fft_numel = math.prod(self.geometry.kernel_shape(spatial)), self.geometry.fft_numel(spatial)
        if self.use_spectral(slice(None)):  # W + 1 feature transforms, then the output layer on their spectra
            out = self.filter.out
            transforms = out.in_features + (out.bias is not None)
            fft = flops.fft_conv(self.hidden_dim, transforms, fft_numel) + \
                4 * self.num_heads * transforms * (fft_numel // 2 + 1)  # real weight x complex bin: 2 mul + 2 add
        else:
            fft = flops.fft_conv(self.hidden_dim, self.num_heads, fft_numel)
        return {
            "filter_mlp": self.filter.flop_count(taps),
            "fft_conv": fft,
            # z = k*v, q*y (+ gates and norms), and D*z + conv: elementwise FLOPs per token-channel
            "gating": gating,
        }


class _Bound:
    """A filter or mask called with substitute parameters (``params`` keys ``"<role>.<name>"``)."""

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor], role: str):
        prefix = role + "."
        self.module = module
        self.params = {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}

    def __call__(self, *args):
        return functional_call(self.module, self.params, args)
