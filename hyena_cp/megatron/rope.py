"""Rotary position embeddings for the attention layers, built for this rank's zigzag shard.

megatron-core's ``RotaryEmbedding`` cannot run on a CPU-only machine (``get_emb`` moves
``inv_freq`` to ``torch.cuda.current_device()``, and its CP slicing,
``get_pos_emb_on_this_cp_rank``, builds a CUDA index tensor). So the table is built here,
in megatron's format, directly from the GLOBAL positions of the tokens this rank holds
(`zigzag_positions`). Passed as ``rotary_pos_emb`` to ``TransformerBlock``, it reaches every
layer: megatron's ``SelfAttention`` rotates q and k with ``apply_rotary_pos_emb``, which for
unpacked ``[s, b, n, d]`` tensors uses the table as given (no second CP slicing) and runs on
CPU with ``apply_rope_fusion=False``; Hyena layers ignore it.

Format (``RotaryEmbedding.get_emb`` with ``rotary_interleaved=False``, ``rotary_percent=1``):
``[s_local, 1, 1, dim]`` angles ``cat(freqs, freqs)``, ``freqs[t, i] = pos[t] * base^(-2i/dim)``,
so rotation pairs are ``(i, i + dim/2)``. Angles are computed in float64 and cast once.

Packed sequences: `document_rotary_pos_emb` gives every token its position IN ITS DOCUMENT
(0 at each document start, what megatron's THD path does), as a ``[s_local, b, 1, dim]``
table (rows may hold different documents); megatron's unfused ``[s, b, n, d]`` rotation
broadcasts it over heads, so a packed document is rotated exactly as if it ran alone.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor
from torch.distributed import ProcessGroup

from hyena_cp.megatron.packing import zigzag_rows
from hyena_cp.ops.packing import document_positions
from hyena_cp.parallel import group_rank, group_size, shard

__all__ = ["POSITION_EMBEDDINGS", "document_rotary_pos_emb", "rotary_angles", "rotary_pos_emb", "zigzag_positions"]

POSITION_EMBEDDINGS = ("rope", "none")


def zigzag_positions(local_len: int, cp_group: ProcessGroup | None, device: torch.device | None = None) -> Tensor:
    """GLOBAL positions ``[s_local]`` (long) of the tokens this rank holds in the zigzag layout
    (chunks r and 2P-1-r of a global sequence of ``local_len * P`` tokens)."""
    world = group_size(cp_group)
    return shard(torch.arange(local_len * world, device=device), 0, "zigzag", world, group_rank(cp_group))


def rotary_angles(positions: Tensor, dim: int, base: float = 10000.0, scale: float = 1.0) -> Tensor:
    """megatron's ``rotary_pos_emb`` ``[s, 1, 1, dim]`` (float64) for GLOBAL ``positions [s]``, each
    divided by ``scale`` (linearly interpolated RoPE, as Evo 2's long-context models use)."""
    if dim % 2:
        raise ValueError(f"rotary dim={dim} (kv_channels) must be even: RoPE rotates channel pairs")
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    freqs = torch.outer(positions.to(torch.float64) / scale, inv_freq)  # s, dim/2
    return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]


def rotary_pos_emb(local_len: int, dim: int, *, base: float, cp_group: ProcessGroup | None,
                   dtype: torch.dtype = torch.float32, device: torch.device | None = None, scale: float = 1.0) -> Tensor:
    """The rotary table of this rank's zigzag shard: ``[s_local, 1, 1, dim]`` in ``dtype``."""
    return rotary_angles(zigzag_positions(local_len, cp_group, device), dim, base, scale).to(dtype)


def document_rotary_pos_emb(cu_seqlens: Tensor, batch: int, local_len: int, dim: int, *, base: float,
                            cp_group: ProcessGroup | None, dtype: torch.dtype = torch.float32,
                            device: torch.device | None = None, scale: float = 1.0) -> Tensor:
    """The rotary table ``[s_local, b, 1, dim]`` of this rank's zigzag shard of a packed batch:
    each token at its offset in its document (GLOBAL ``cu_seqlens`` over the b rows laid end to end)."""
    length = local_len * group_size(cp_group)
    positions = zigzag_rows(document_positions(cu_seqlens.to(device), batch * length), batch, cp_group)  # b, s_local
    angles = rotary_angles(positions.flatten(), dim, base, scale)  # (b s), 1, 1, dim
    return rearrange(angles, "(b s) 1 1 d -> s b 1 d", b=batch).to(dtype)
