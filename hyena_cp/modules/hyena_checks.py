"""Argument checks of the Hyena operator (`hyena_cp.modules.hyena.Hyena`), one mixin: every rule a
call or a layout must meet, raised as a ``ValueError`` that names the setting and its fix. They run
on every rank before any collective (after the ranks agreed on their call signature,
`hyena_cp.parallel.agreement`), so a bad input is an error on every rank, never a hang."""
from __future__ import annotations

from typing import Literal

import torch

from hyena_cp.ops.packing import check_cu_seqlens, is_one_document_per_row
from hyena_cp.parallel import group_size, shape_of

__all__ = ["HyenaChecks", "Sharding"]

Sharding = Literal["sequence", "channel"]


class HyenaChecks:
    """The checks `Hyena` runs; they read its settings (``filter``, ``geometry``, ``fir_length``,
    ``hidden_dim``, ``num_heads``, ``local_dim``, ``tp_group``, ``cond_dim``, ``gating``)."""

    def check_input(self, global_spatial: tuple[int, ...], world: int, sharded: Sharding = "sequence") -> None:
        """Raise the constraints of this operator for a global size ``(L,)``/``(H, W)`` on a
        cp_group of ``world`` ranks (called on every rank before any collective). ``sharded``:
        how the operator will receive q, k, v (an explicit filter on sequence shards splits no
        filter group, and needs zigzag chunks of at least its halo K-1)."""
        self.filter.reference(global_spatial)
        if self.fir_length is not None and sharded == "sequence":
            self._check_fir_shard(global_spatial[0], world)
            return
        tp = group_size(self.tp_group)
        if self.hidden_dim % (tp * world):
            raise ValueError(f"hidden_dim={self.hidden_dim} must be divisible by tp_size*cp_size={tp}*{world}; "
                             f"change hidden_dim or the context-parallel size")
        if self.num_heads % (tp * world):
            raise ValueError(f"num_heads={self.num_heads} must be divisible by tp_size*cp_size={tp}*{world} (filter "
                             f"groups are never split across ranks); set num_heads to a multiple of {tp * world}")

    def _check_fir_shard(self, length: int, world: int) -> None:
        """An explicit filter on zigzag shards: each chunk must hold the K-1 tokens its halo reads."""
        if world == 1:
            return
        self.geometry.check_shard((length,), world, 1, halo=False)  # L % 2P
        chunk, halo = length // (2 * world), self.fir_length - 1
        if chunk < halo:
            raise ValueError(f"zigzag chunk length L/(2*cp_size)={length}/{2 * world}={chunk} is shorter than the halo "
                             f"K-1={halo} of the explicit filter (fir_length={self.fir_length}): its direct conv reads "
                             f"the K-1 tokens before each chunk from ONE neighbour; use L >= {2 * world * halo} or "
                             f"fewer context-parallel ranks")

    def check_packing(self, cu_seqlens: torch.Tensor | None, batch: int, global_len: int) -> None:
        """Raise ``ValueError`` (before any collective) unless ``cu_seqlens`` is None or valid
        boundaries of ``batch`` rows of ``global_len`` tokens (1-D causal only)."""
        if cu_seqlens is None:
            return
        if self.geometry.boundaries != ("causal",):
            raise ValueError("cu_seqlens (packed sequences) is for a causal 1-D Hyena; a grid or a non-causal "
                             "sequence has no documents: pass cu_seqlens=None")
        if self.cond_dim is not None:
            raise ValueError("cu_seqlens (packed sequences) with a conditioned filter is not supported: its filter "
                             "bank is per row, not per document")
        check_cu_seqlens(cu_seqlens, batch * global_len, global_len)
        self.check_packed_filter(cu_seqlens, batch, global_len)

    def check_packed_filter(self, cu_seqlens: torch.Tensor, batch: int, global_len: int) -> None:
        """Refuse documents shorter than their row with length-relative filters: positions are then
        normalised by the packed length, so a document would see a prefix of the length-L filter,
        not the filter it gets alone (one document per row is the unpacked case, exact)."""
        if not self.filter.absolute and not is_one_document_per_row(cu_seqlens, batch * global_len, global_len):
            raise ValueError("packed documents (cu_seqlens / packed_seq_params) need Hyena filters with absolute "
                             "positions, but max_len=None: the filters are then normalised by the packed length, "
                             "so a document would not behave as it does alone. Set max_len to the longest sequence "
                             "(Hyena(max_len=...), HyenaMixerConfig(max_len=...); a filter= generator: its own size "
                             "setting) or do not pack")

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

    def _check_call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group, sharded: Sharding,
                    mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                    conditioning: torch.Tensor | None) -> None:
        """Everything `forward` needs of its arguments on this rank (after the ranks agreed)."""
        world = group_size(cp_group)
        self.check_qkv(q, k, v, sharded, mask, world)
        self.check_conditioning(conditioning, q)
        if sharded == "channel" and world > 1 and not self.gating.token_local:
            raise ValueError("qk_norm / conv_norm need every channel of a token, which channel shards "
                             "(sharded='channel', the mixer's short_conv_cp='a2a') do not hold; use short_conv_cp='halo'")
        global_spatial = tuple(q.shape[2:]) if sharded == "channel" else self.geometry.global_size(q.shape[2:], world)
        self.check_input(global_spatial, world, sharded)
        self.check_packing(cu_seqlens, q.shape[0], global_spatial[0])

    def check_conditioning(self, conditioning: torch.Tensor | None, like: torch.Tensor) -> None:
        """``conditioning`` is given exactly when the filter is conditioned, as ``[B, cond_dim]``."""
        if (conditioning is None) != (self.cond_dim is None):
            raise ValueError("this Hyena's filter " + ("is conditioned: pass conditioning [B, cond_dim="
                                                       f"{self.cond_dim}]" if self.cond_dim is not None else
                                                       "takes no conditioning: pass none"))
        if conditioning is not None and (not isinstance(conditioning, torch.Tensor)
                                         or tuple(conditioning.shape) != (like.shape[0], self.cond_dim)):
            raise ValueError(f"conditioning must be [B, cond_dim] = {[like.shape[0], self.cond_dim]}, "
                             f"got {shape_of(conditioning)}")
