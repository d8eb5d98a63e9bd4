"""Inference cache of one causal (1-D) `QKVSequenceMixer`: prefill of a prompt under context
parallelism, then exact one-token decoding steps that never re-run the sequence.

State per CP rank r of P (and TP rank of T; ``C_l = C/T`` are this TP rank's channels and
``blk = C_l/P`` this CP rank's block of them, ``[r*blk, (r+1)*blk)`` — the block the
prefill's AllToAll already leaves on this rank, so the cache costs no extra movement):

- ``z``: ``[b, blk, capacity]``, ``z = k * v`` at every position so far, this rank's channels;
- ``short``: ``[b, 3*blk, K-1]``, the last K-1 INPUTS of the short conv (the in_proj output)
  of this rank's q, k and v channels; zeros before position 0, the conv's own padding;
- ``filter_rev``: ``[G_blk, capacity]``, the long filters of this rank's groups, built once
  and reversed (filters with a fixed ``max_len`` normalise positions by it, so these taps
  are the prefix of the filter at every length: the training forward's filter).

Both grow along the sequence, so a rank holds 1/P of the layer's cache.

Prefill: the training forward's math on the zigzag shard (in_proj, halo short conv,
AllToAll of ``z``, FFT long conv, AllToAll back), keeping ``z`` after the first AllToAll and
the short-conv inputs of the last K-1 positions (held by CP rank 0, whose second zigzag
chunk ends the sequence: one small broadcast). It always communicates the default way
(AllToAll + halo); the comparison modes ``cp_comm="allgather"`` / ``short_conv_cp="a2a"``
compute the same function.

Step (the token ``x`` is the same on every CP rank): in_proj -> this rank's q, k, v block ->
short conv against ``short`` -> append ``z_t`` -> ``y_t = sum_{s<=t} h[t-s] z_s + D z_t``
(`causal_conv_step`, O(t*blk)) -> ``q_t * y_t`` -> ONE all-gather of the channel blocks over
CP (``[b, C_l]``) -> norm and out_proj on every CP rank (TP reduces inside, as in training).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.distributed import ProcessGroup

from hyena_cp.modules.mixer import QKVSequenceMixer, _project
from hyena_cp.ops.decode import causal_conv_step
from hyena_cp.ops.short_conv import causal_depthwise_conv1d
from hyena_cp.parallel import (broadcast_from, channel_to_seq, check_ranks_agree, gather_from_group, group_rank,
                               group_size, seq_to_channel, shape_of)

__all__ = ["HyenaCache", "check_decodable"]


def check_decodable(mixer: QKVSequenceMixer) -> int | None:
    """Raise ``ValueError`` unless ``mixer`` can be decoded step by step; returns the longest
    sequence its filter accepts (None: any)."""
    hyena = mixer.hyena
    if hyena.geometry.boundaries != ("causal",):
        raise ValueError("only causal 1-D Hyena mixers (spatial_dims=1, boundary='causal') can be decoded token by token")
    if mixer.cond_dim is not None:
        raise ValueError("decoding a mixer with conditioning is not supported; build it with conditioning=None")
    if mixer.short_conv is None:
        raise ValueError("decoding needs a short conv (short_kernel_size >= 1)")
    if not hyena.gating.token_local:
        raise ValueError("decoding a Hyena with qk_norm or conv_norm is not supported: under CP a decoding rank "
                         "holds a block of the channels those norms read together")
    if not hyena.filter.absolute:
        raise ValueError("decoding needs Hyena filters with a fixed max_len: length-relative filters "
                         "(max_len=None) change with the sequence length, so no prefix of them is the filter "
                         "of the growing sequence; set HyenaMixerConfig.max_len (and train with it)")
    return hyena.max_len


class HyenaCache:
    """Decode state of one Hyena mixer on this rank (see the module docstring).

    Args:
        mixer: the mixer (its parameters are read at each call, the filter once here).
        batch_size: sequences decoded together (equal lengths).
        capacity: positions the cache can hold, at most the filters' ``max_len``.
        cp_group: the mixer's context-parallel group (None: one process).

    ``decoding`` selects what a call does: False (prefill of a zigzag shard, once, on an
    empty cache), True (one token). The model-level cache sets it.
    """

    def __init__(self, mixer: QKVSequenceMixer, *, batch_size: int, capacity: int,
                 cp_group: ProcessGroup | None = None):
        self.max_len = check_decodable(mixer)
        if capacity < 1 or (self.max_len is not None and capacity > self.max_len):
            raise ValueError(f"cache capacity={capacity} must be between 1 and the Hyena filters' max_len="
                             f"{self.max_len}: the filters end there")
        world = group_size(cp_group)
        mixer.hyena.check_input((capacity,), world)  # channels and groups split over tp * cp
        self.mixer, self.cp_group, self.capacity = mixer, cp_group, capacity
        self.block = mixer.local_dim // world
        self.channels = slice(group_rank(cp_group) * self.block, (group_rank(cp_group) + 1) * self.block)
        like = mixer.hyena.dtype_like
        with torch.no_grad():
            taps = mixer.hyena.build_filter((capacity,), mixer.hyena.filter_groups(self.channels))  # G_blk, cap
        self.filter_rev = taps.flip(-1).contiguous()
        self.z = like.new_zeros(batch_size, self.block, capacity)
        self.short = like.new_zeros(batch_size, 3 * self.block, mixer.short_kernel_size - 1)
        self.length, self.decoding = 0, False

    def nbytes(self) -> int:
        """Bytes this rank holds for the layer (history, short-conv state, filter taps)."""
        return sum(t.numel() * t.element_size() for t in (self.z, self.short, self.filter_rev))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [b, s, C]`` (the mixer's input) -> the mixer's output, prefill or one step."""
        return self.step(x) if self.decoding else self.prefill(x)

    # ----------------------------------------------------------------- helpers
    def _reserve(self, n: int) -> None:
        """Raise (on every rank alike: all hold the same length) before the cache overflows."""
        if self.length + n <= self.capacity:
            return
        fix = (f"the filters end at max_len={self.max_len}: a longer context needs a model built (and trained) "
               f"with a larger max_len" if self.capacity == self.max_len else
               f"build the cache with a larger capacity (at most max_len={self.max_len})")
        raise ValueError(f"the Hyena inference cache holds {self.length} of its {self.capacity} positions and "
                         f"cannot take {n} more; {fix}")

    def _block(self, u: torch.Tensor) -> torch.Tensor:
        """``[b, 3*C_l, s]`` (q; k; v of this TP rank) -> ``[b, 3*blk, s]``, this CP rank's block of each."""
        u = rearrange(u, "b (three c) s -> b three c s", three=3)[:, :, self.channels]
        return rearrange(u, "b three c s -> b (three c) s")

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        """``q * y`` ``[b, s, C_l]`` -> norm -> out_proj ``[b, s, C]`` (as `QKVSequenceMixer.forward`)."""
        return _project(self.mixer.out_proj, self.mixer.norm(y))

    def _keep_short_state(self, u: torch.Tensor) -> None:
        """The short conv's inputs at the last K-1 global positions, from the prefill's ``u``
        (``[b, 3*C_l, s_local]``, zigzag shard: under CP rank 0's shard ends the sequence)."""
        halo = self.short.shape[-1]
        if halo == 0:
            return
        tail = broadcast_from(u[..., -halo:].contiguous(), 0, self.cp_group)
        self.short = self._block(F.pad(tail, (halo - tail.shape[-1], 0)))  # zeros before position 0

    # --------------------------------------------------------------- prefill
    @torch.no_grad()
    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """The mixer's forward on this rank's zigzag shard ``x [b, s_local, C]`` of the prompt,
        filling the cache; returns the mixer output ``[b, s_local, C]``."""
        if self.length:
            raise ValueError(f"prefill needs an empty cache; this one holds {self.length} positions")
        mixer, world = self.mixer, group_size(self.cp_group)
        signature = {"x.shape": shape_of(x), "x.dtype": getattr(x, "dtype", None)}  # free inside the LM's check
        x = check_ranks_agree(self.cp_group, "HyenaCache.prefill", signature, policy=mixer.check_agreement,
                              hint="Give every CP rank its zigzag shard of the same prompt", before=x)
        mixer._check(x, None, world, None)
        if x.shape[0] != self.z.shape[0]:
            raise ValueError(f"x has batch {x.shape[0]}, the cache was built for batch_size={self.z.shape[0]}")
        length = x.shape[1] * world
        self._reserve(length)
        u = rearrange(_project(mixer.in_proj, x), "b l c -> b c l")  # b, 3C_l, s_local
        q, k, v = mixer._short_conv_local(u, self.cp_group).chunk(3, dim=1)  # b, C_l, s_local each
        self._keep_short_state(u)
        z = seq_to_channel(mixer.hyena.gating.inner(k, v), self.cp_group, "zigzag")  # b, blk, L
        self.z[..., :length] = z
        y = channel_to_seq(mixer.hyena.long_conv(z, self.channels), self.cp_group, "zigzag")  # b, C_l, s_local
        self.length = length
        return self._output(rearrange(mixer.hyena.gating.outer(q, y), "b c l -> b l c"))

    # ------------------------------------------------------------------ step
    def _filter_tail(self, n: int) -> torch.Tensor:
        """``k_rev`` of `causal_conv_step` for a history of ``n`` positions: ``[G_blk, n]``."""
        return self.filter_rev[:, self.capacity - n:]

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One token ``x [b, 1, C]`` (the same on every CP rank) -> the mixer output ``[b, 1, C]``."""
        if x.dim() != 3 or x.shape[1] != 1 or x.shape[0] != self.z.shape[0]:
            raise ValueError(f"a decode step takes x [b={self.z.shape[0]}, 1, C], got {tuple(x.shape)}")
        self._reserve(1)
        u = self._block(rearrange(_project(self.mixer.in_proj, x), "b l c -> b c l"))  # b, 3blk, 1
        weight, bias = self.mixer._short_conv_weights(self.channels)
        halo = self.short.shape[-1]
        qkv = causal_depthwise_conv1d(u, weight, bias, self.short if halo else None)  # b, 3blk, 1
        if halo:
            self.short = torch.cat([self.short[..., 1:], u], dim=-1)
        q, k, v = qkv[..., 0].chunk(3, dim=1)  # b, blk each
        gating, skip = self.mixer.hyena.gating, self.mixer.hyena.skip
        self.z[..., self.length] = gating.inner(k, v)
        n = self.length + 1
        y = causal_conv_step(self.z[..., :n], self._filter_tail(n), None if skip is None else skip[self.channels])
        y = gather_from_group(gating.outer(q, y), 1, self.cp_group)  # b, C_l: the channel blocks in CP rank order
        self.length = n
        return self._output(y[:, None, :])
