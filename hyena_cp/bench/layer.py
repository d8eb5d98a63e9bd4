"""The benchmarked layers, their inputs under CP, and the communication floor.

One `LayerSpec` describes a Hyena mixer layer and its GLOBAL input; `build_layer`,
`local_input` and `comm_floor_bytes` are shared by every section (and the floor by
tests/test_cp_mixer.py), so what is measured and what is predicted cannot drift apart.
`AttentionMixer` is the attention baseline with the same projections.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from hyena_cp import flops
from hyena_cp.modules.geometry import Geometry
from hyena_cp.modules.hyena import Hyena
from hyena_cp.modules.mixer import QKVSequenceMixer
from hyena_cp.parallel import group_rank, group_size, shard

__all__ = ["CAUSAL_TIME", "LayerSpec", "build_layer", "local_input", "comm_floor_bytes", "fir_halo_bytes", "ring_attention_bytes",
           "AttentionMixer", "fwd_bwd"]


# a video's boundaries: causal time (zigzag frame chunks under CP) x periodic space
CAUSAL_TIME = ("causal", "circular", "circular")


@dataclass(frozen=True)
class LayerSpec:
    """One QKVSequenceMixer and its global input ``[batch, *spatial, channels]``.

    ``spatial`` is ``(L,)``, ``(H, W)`` or ``(T, H, W)``, ``boundary`` the Hyena's (None: causal
    1-D with zigzag shards, linear 2-D/3-D with blocks of the first axis).
    ``short_conv_cp`` / ``cp_comm`` select the comparison modes of the mixer and Hyena;
    ``checkpoint_filter=False`` stores the filter MLP's activations (the memory comparison).
    """

    spatial: tuple[int, ...]
    channels: int = 256
    heads: int = 8
    batch: int = 1
    kernel: int = 3
    short_conv_cp: str = "halo"
    cp_comm: str = "alltoall"
    checkpoint_filter: bool = True
    boundary: str | tuple[str, ...] | None = None

    @property
    def dims(self) -> int:
        return len(self.spatial)

    @property
    def geometry(self) -> Geometry:
        return Geometry.of(self.dims, self.boundary)

    @property
    def layout(self) -> str:
        return self.geometry.layout

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, *self.spatial, self.channels)

    def label(self) -> str:
        size = f"L={self.spatial[0]}" if self.dims == 1 else "x".join(map(str, self.spatial)) + " grid"
        if self.boundary is not None:
            size += ", " + " x ".join(self.geometry.boundaries)
        return size if self.checkpoint_filter else f"{size}, filter MLP stored"

    def kind(self) -> str:
        """``"1-D"``, ``"2-D"`` or ``"3-D"``, with the boundaries when they are not the default."""
        short = {"causal": "causal", "linear": "lin", "circular": "circ"}
        return f"{self.dims}-D" + ("" if self.boundary is None else " " + "x".join(short[b] for b in self.geometry.boundaries))


def build_layer(spec: LayerSpec, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0, max_len: int | None = None) -> QKVSequenceMixer:
    """The same seeded mixer on every rank (parameters are replicated under CP). ``max_len``
    (1-D): absolute filter positions, which packed documents need; None: length-relative."""
    torch.manual_seed(seed)
    hyena = Hyena(hidden_dim=spec.channels, num_heads=spec.heads, spatial_dims=spec.dims, boundary=spec.boundary,
                  cp_comm=spec.cp_comm, checkpoint_filter=spec.checkpoint_filter, max_len=max_len)
    mixer = QKVSequenceMixer(hidden_dim=spec.channels, hyena=hyena, short_kernel_size=spec.kernel,
                             short_conv_cp=spec.short_conv_cp)
    return mixer.to(device=device, dtype=dtype)


def local_input(spec: LayerSpec, cp_group, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 1) -> torch.Tensor:
    """This rank's shard of the seeded global input ``[B, *spatial, C]`` (all of it when
    ``cp_group`` is None), as a leaf that requires grad."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.shape, generator=gen)
    x = shard(x, 1, spec.layout, group_size(cp_group), group_rank(cp_group))
    return x.to(device=device, dtype=dtype).requires_grad_(True)


def fwd_bwd(layer: nn.Module, x: torch.Tensor, cp_group=None, cu_seqlens: torch.Tensor | None = None) -> None:
    """One training step's worth of layer work: forward, backward of ``sum(y)``, grads dropped.
    ``cu_seqlens``: packed documents (GLOBAL boundaries), passed to the layer when given."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    kwargs = {} if cp_group is None else {"cp_group": cp_group}
    if cu_seqlens is not None:
        kwargs["cu_seqlens"] = cu_seqlens
    y = layer(x, **kwargs)
    y.sum().backward()


def comm_floor_bytes(shape: tuple[int, ...], kernel: int | None, world: int, rank: int, itemsize: int,
                     geometry: Geometry | None = None, fir_length: int | None = None) -> int:
    """Bytes one rank sends for one mixer layer forward + backward at the floor.

    ``shape``: global input ``[B, *S, C]``; ``kernel``: the short conv's taps (None: no short
    conv); ``geometry``: the operator's (default: the default geometry of ``len(S)`` axes). The
    floor is 4 AllToAlls of ``z`` (2 forward, 2 backward), each sending
    ``B * (tokens/P) * C * (P-1)/P`` elements, plus the short-conv halos of the 3C channels of
    q, k, v: forward the positions its neighbours read of it, backward the gradients of the
    positions it read of theirs (`Geometry.halo_traffic`; one position of the first axis is
    ``prod(S[1:])`` tokens). An explicit filter of ``fir_length`` K taps replaces the AllToAlls
    by the same kind of halo of ``z`` (C channels, K-1 positions per chunk): `fir_halo_bytes`.
    """
    if world == 1:
        return 0
    geometry = Geometry.of(len(shape) - 2) if geometry is None else geometry
    batch, channels = shape[0], shape[-1]
    if fir_length is None:
        tokens_local = math.prod(shape[1:-1]) // world
        long_conv = 4 * batch * tokens_local * channels * (world - 1) // world * itemsize
    else:
        long_conv = fir_halo_bytes(shape, fir_length, world, rank, itemsize, geometry)
    _, sent, received = geometry.halo_traffic(kernel or 1, world, rank)
    halo = (sent + received) * batch * 3 * channels * math.prod(shape[2:-1])
    return long_conv + halo * itemsize


def fir_halo_bytes(shape: tuple[int, ...], fir_length: int, world: int, rank: int, itemsize: int,
                   geometry: Geometry | None = None) -> int:
    """Bytes one rank sends for the direct conv of an explicit filter of ``fir_length`` K taps,
    forward + backward: the halo of ``z`` (C channels), K-1 positions before each zigzag chunk
    (`Geometry.halo_traffic`), values forward and their gradients backward; no AllToAll."""
    if world == 1:
        return 0
    geometry = Geometry.of(len(shape) - 2) if geometry is None else geometry
    _, sent, received = geometry.halo_traffic(fir_length, world, rank)
    return (sent + received) * shape[0] * shape[-1] * math.prod(shape[2:-1]) * itemsize


def ring_attention_bytes(shape: tuple[int, ...], world: int, itemsize: int) -> int:
    """Analytic bytes per rank of ring attention (not implemented here, for context): forward
    passes the K and V shards P-1 hops; backward passes K, V and their gradient
    accumulators P-1 hops each: 6 (P-1) B (L/P) C elements."""
    tokens_local = math.prod(shape[1:-1]) // world
    return 6 * (world - 1) * shape[0] * tokens_local * shape[-1] * itemsize


class AttentionMixer(nn.Module):
    """Attention baseline with Hyena's projections: qkv Linear(C, 3C) ->
    ``F.scaled_dot_product_attention(is_causal=causal)`` -> Linear(C, C). ``x: [B, L, C]``, the
    full sequence (single process): causal for 1-D, non-causal over a volume's flattened tokens
    for 3-D. The 2-D baseline is the ViT-5 mixer `hyena_cp.models.attention.Attention2d` itself."""

    def __init__(self, *, hidden_dim: int, num_heads: int, causal: bool = True):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_dim={hidden_dim}")
        self.num_heads, self.causal = num_heads, causal
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.proj = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(rearrange(y, "b h l d -> b l (h d)"))

    def flop_count(self, num_tokens: int, inference: bool = False) -> int:
        c = self.proj.in_features
        # a causal (flash) kernel computes only the (query, key) pairs the mask keeps: half
        core = flops.attention(num_tokens, num_tokens, c) / (2 if self.causal else 1)
        parts = {"qkv": flops.linear(num_tokens, c, 3 * c), "core": core,
                 "proj": flops.linear(num_tokens, c, c)}
        return flops.total(parts, inference)
