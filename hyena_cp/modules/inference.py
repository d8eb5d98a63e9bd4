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

Both grow along the sequence, so a rank holds 1/P of the layer's cache. Two filters need less,
O(1) in the sequence length (`LongConvState`):

- an explicit FIR of K taps (``hyena.fir_length``, StripedHyena 2's SE and MR): only the last
  K-1 values of ``z`` (``[b, blk, K-1]``) and the K taps; a step is O(K * blk);
- a modal filter (`hyena_cp.ops.modal.ModalFilter`, StripedHyena 2's LI): the recurrence's state
  ``[b, blk, S]`` (float32, float64 for float64 models), ``s = p * s + z``, ``y = R s + D z``
  (`modal_step`); prefilled from the whole ``z`` of the prompt (`modal_state`); O(S * blk) a step.

Prefill: the training forward's math on the zigzag shard (in_proj, halo short conv,
AllToAll of ``z``, FFT long conv, AllToAll back), keeping ``z`` after the first AllToAll and
the short-conv inputs of the last K-1 positions (held by CP rank 0, whose second zigzag
chunk ends the sequence: one small broadcast). It always communicates the default way
(AllToAll + halo); the comparison modes ``cp_comm="allgather"`` / ``short_conv_cp="a2a"``
compute the same function. An explicit FIR is prefilled through the same AllToAll (not the
training forward's K-1 halo), so any prompt whose chunks hold the short conv's halo prefills, and
the state it keeps (the last K-1 values of ``z``) is then already on the rank of its channels.

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
from hyena_cp.ops.modal import ModalFilter, modal_state, modal_step
from hyena_cp.ops.short_conv import causal_depthwise_conv1d
from hyena_cp.parallel import (agreement, broadcast_from, channel_to_seq, gather_from_group, group_rank,
                               group_size, seq_to_channel, shape_of)

__all__ = ["HyenaCache", "LongConvState", "check_decodable"]


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
    if hyena.fir_length is not None or isinstance(hyena.filter, ModalFilter):
        return hyena.max_len  # finite state: no filter taps of the whole context
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
        mixer.hyena.check_input((capacity,), world, "channel")  # channels and groups split over tp * cp
        self.mixer, self.cp_group, self.capacity = mixer, cp_group, capacity
        self.block = mixer.local_dim // world
        self.channels = slice(group_rank(cp_group) * self.block, (group_rank(cp_group) + 1) * self.block)
        like = mixer.hyena.dtype_like
        self.long = LongConvState.build(mixer.hyena, self.channels, batch_size, capacity)
        self.short = like.new_zeros(batch_size, 3 * self.block, mixer.short_kernel_size - 1)
        self.length, self.decoding, self.batch_size = 0, False, batch_size

    def nbytes(self) -> int:
        """Bytes this rank holds for the layer (long-conv state, short-conv state)."""
        return self.long.nbytes() + self.short.numel() * self.short.element_size()

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
        with agreement(self.cp_group, "HyenaCache.prefill", signature, policy=mixer.check_agreement,
                       hint="Give every CP rank its zigzag shard of the same prompt", before=x) as x:
            mixer._check(x, None, world, None, long_conv="channel")  # the prefill's long conv runs on channel blocks
            if x.shape[0] != self.batch_size:
                raise ValueError(f"x has batch {x.shape[0]}, the cache was built for batch_size={self.batch_size}")
            return self._prefill(x)

    def _prefill(self, x: torch.Tensor) -> torch.Tensor:
        """`prefill` once the ranks agreed and ``x`` passed its checks."""
        mixer, world = self.mixer, group_size(self.cp_group)
        length = x.shape[1] * world
        self._reserve(length)
        u = rearrange(_project(mixer.in_proj, x), "b l c -> b c l")  # b, 3C_l, s_local
        q, k, v = mixer._short_conv_local(u, self.cp_group).chunk(3, dim=1)  # b, C_l, s_local each
        self._keep_short_state(u)
        z = seq_to_channel(mixer.hyena.gating.inner(k, v), self.cp_group, "zigzag")  # b, blk, L
        self.long.prefill(z)
        y = channel_to_seq(mixer.hyena.long_conv(z, self.channels), self.cp_group, "zigzag")  # b, C_l, s_local
        self.length = length
        return self._output(rearrange(mixer.hyena.gating.outer(q, y), "b c l -> b l c"))

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One token ``x [b, 1, C]`` (the same on every CP rank) -> the mixer output ``[b, 1, C]``."""
        if x.dim() != 3 or x.shape[1] != 1 or x.shape[0] != self.batch_size:
            raise ValueError(f"a decode step takes x [b={self.batch_size}, 1, C], got {tuple(x.shape)}")
        self._reserve(1)
        u = self._block(rearrange(_project(self.mixer.in_proj, x), "b l c -> b c l"))  # b, 3blk, 1
        weight, bias = self.mixer._short_conv_weights(self.channels)
        halo = self.short.shape[-1]
        qkv = causal_depthwise_conv1d(u, weight, bias, self.short if halo else None)  # b, 3blk, 1
        if halo:
            self.short = torch.cat([self.short[..., 1:], u], dim=-1)
        q, k, v = qkv[..., 0].chunk(3, dim=1)  # b, blk each
        gating, skip = self.mixer.hyena.gating, self.mixer.hyena.skip
        y = self.long.step(gating.inner(k, v), self.length, None if skip is None else skip[self.channels])
        y = gather_from_group(gating.outer(q, y), 1, self.cp_group)  # b, C_l: the channel blocks in CP rank order
        self.length += 1
        return self._output(y[:, None, :])


class LongConvState:
    """The long conv's decode state of one rank's channel block (see the module docstring):
    the whole ``z`` history and the filter's taps (implicit filters), the last K-1 values of ``z``
    (an explicit FIR), or the modal recurrence's state. ``prefill(z)`` takes the prompt's
    ``z [b, blk, L]``; ``step(z_t, t, d)`` the newest ``z [b, blk]`` at position ``t`` -> ``y [b, blk]``."""

    def __init__(self, kind: str, tensors: dict[str, torch.Tensor]):
        self.kind, self.tensors = kind, tensors

    @classmethod
    @torch.no_grad()
    def build(cls, hyena, channels: slice, batch: int, capacity: int) -> "LongConvState":
        like, block = hyena.dtype_like, channels.stop - channels.start
        groups = hyena.filter_groups(channels)
        if hyena.fir_length is not None:
            taps = hyena.build_filter((hyena.fir_length,), groups)  # G_blk, K
            return cls("fir", {"taps_rev": taps.flip(-1).contiguous(),
                               "tail": like.new_zeros(batch, block, hyena.fir_length - 1)})
        if isinstance(hyena.filter, ModalFilter):
            per_group = block // (groups.stop - groups.start)
            poles = hyena.filter.poles(groups).repeat_interleave(per_group, 0)  # blk, S
            residues = hyena.filter.residues[groups].repeat_interleave(per_group, 0)
            dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
            return cls("modal", {"poles": poles.detach().clone(), "residues": residues.detach().clone(),
                                 "state": torch.zeros(batch, block, poles.shape[1], dtype=dtype, device=like.device)})
        taps = hyena.build_filter((capacity,), groups)  # G_blk, capacity
        return cls("history", {"filter_rev": taps.flip(-1).contiguous(), "z": like.new_zeros(batch, block, capacity)})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def filter_tail(self, n: int) -> torch.Tensor:
        """``k_rev`` of `causal_conv_step` for a history of ``n`` positions: ``[G_blk, n]``."""
        taps = self.tensors["filter_rev"]
        return taps[:, taps.shape[1] - n:]

    def prefill(self, z: torch.Tensor) -> None:
        t = self.tensors
        if self.kind == "history":
            t["z"][..., :z.shape[-1]] = z
        elif self.kind == "fir":
            keep = t["tail"].shape[-1]
            t["tail"] = F.pad(z[..., max(z.shape[-1] - keep, 0):], (max(keep - z.shape[-1], 0), 0))  # zeros before 0
        else:
            t["state"] = modal_state(z, t["poles"]).to(t["state"].dtype)

    def step(self, z: torch.Tensor, position: int, d: torch.Tensor | None) -> torch.Tensor:
        t = self.tensors
        if self.kind == "history":
            t["z"][..., position] = z
            return causal_conv_step(t["z"][..., :position + 1], self.filter_tail(position + 1), d)
        if self.kind == "fir":
            window = torch.cat([t["tail"], z[..., None]], dim=-1)  # b, blk, K: the last K values of z
            t["tail"] = window[..., 1:]
            return causal_conv_step(window, t["taps_rev"], d)
        y, t["state"] = modal_step(t["state"], z, t["poles"], t["residues"], d)
        return y
