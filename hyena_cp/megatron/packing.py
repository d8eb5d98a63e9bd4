"""Packed sequences on megatron-core: what a ``PackedSeqParams`` means to the Hyena mixer, the
CP attention and the rotary table, and the one place that reads it.

Layout (decided for issue 13): the WHOLE packed sequence is zigzag-sharded over CP, exactly
as an unpacked one (2P chunks, rank r holds chunks r and 2P-1-r), and ``cu_seqlens`` are
GLOBAL boundaries that fall anywhere, across chunks and ranks. Megatron/TransformerEngine's
THD+CP layout instead splits EACH document into 2P chunks. We chose the whole-sequence zigzag
because (1) the Hyena AllToAll, the halo exchange, the data loader and the attention K/V
gather keep one fixed layout whatever the boundaries, so packing adds no communication and
no per-document permutation; (2) THD+CP needs every document padded to a multiple of 2P
(no document of length 1, padding tokens inside every document); (3) its reason, balancing
causal attention work per document, does not apply to `TorchCoreAttention`, which gathers K
and V and computes the dense masked scores on every rank anyway. The cost: TE's THD
attention kernels expect their own layout, so packed sequences under CP > 1 run with
`TorchCoreAttention` (checked by `HyenaLanguageModel`).

Format: ``PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)``.
Activations keep megatron's ``[s, b, h]`` (so ``SelfAttention`` neither squeezes the batch nor
applies its THD rotary path) and ``cu`` are cumulative GLOBAL document lengths over the b rows
laid end to end (`hyena_cp.ops.packing`: every row end is a boundary; with b = 1 megatron's
THD convention). `HyenaLanguageModel` builds it from ``cu_seqlens`` (`make_packed_seq_params`).
``qkv_format="thd"`` (megatron's ``[t, 1, h]``) is the same thing at b = 1 and CP = 1 and is
accepted there by the Hyena mixer; under CP > 1 it means megatron's per-document layout and
is refused. Padded boundaries (``cu_seqlens_*_padded``) belong to that layout too: here a
padded tail is simply one more document whose labels are ``IGNORE_INDEX``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from hyena_cp.megatron.compat import PackedSeqParams
from hyena_cp.parallel import group_rank, group_size, shard

__all__ = ["PACKED_QKV_FORMATS", "cu_seqlens_from", "make_packed_seq_params", "zigzag_rows"]

PACKED_QKV_FORMATS = (None, "sbhd", "thd")  # None: megatron's default, not THD, i.e. sbhd


def make_packed_seq_params(cu_seqlens: Tensor) -> PackedSeqParams:
    """The ``PackedSeqParams`` the model hands every layer for GLOBAL boundaries ``cu_seqlens``."""
    cu = cu_seqlens.to(torch.int32)
    longest = int(cu.diff().max())
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def cu_seqlens_from(params: PackedSeqParams | None, *, where: str, cp_size: int, batch: int,
                    allow_thd: bool) -> Tensor | None:
    """``cu_seqlens`` of a (self-attention) ``PackedSeqParams``, or None; raises ``ValueError``
    naming ``packed_seq_params`` and the fix for what this layout cannot take. Values are
    validated by the caller against its length (`hyena_cp.ops.packing.check_cu_seqlens`)."""
    if params is None:
        return None
    if not isinstance(params, PackedSeqParams):
        raise ValueError(f"{where}: packed_seq_params must be megatron's PackedSeqParams (or None), got "
                         f"{type(params).__name__}")
    fmt = params.qkv_format
    if fmt not in PACKED_QKV_FORMATS:
        raise ValueError(f"{where}: packed_seq_params.qkv_format={fmt!r}; use 'sbhd' (activations [s, b, h], GLOBAL "
                         f"cu_seqlens over the b rows laid end to end, the whole sequence zigzag-sharded over CP)")
    if fmt == "thd" and not (allow_thd and cp_size == 1 and batch == 1):
        raise ValueError(f"{where}: packed_seq_params.qkv_format='thd' is megatron's THD(+CP) layout (each document "
                         f"split into 2*CP chunks), which is not supported here (CP size {cp_size}, batch {batch}); "
                         f"zigzag-shard the whole packed sequence and pass qkv_format='sbhd' (HyenaLanguageModel"
                         f"(cu_seqlens=...) does this)")
    cu = params.cu_seqlens_q
    if cu is None:
        raise ValueError(f"{where}: packed_seq_params.cu_seqlens_q is None; set it to the GLOBAL cumulative document "
                         f"lengths [N+1], or pass packed_seq_params=None for an unpacked batch")
    others = {"cu_seqlens_kv": params.cu_seqlens_kv, "cu_seqlens_q_padded": params.cu_seqlens_q_padded,
              "cu_seqlens_kv_padded": params.cu_seqlens_kv_padded}
    for name, other in others.items():
        if other is not None and not torch.equal(other.detach().cpu().long(), cu.detach().cpu().long()):
            raise ValueError(f"{where}: packed_seq_params.{name} differs from cu_seqlens_q; self attention over "
                             f"unpadded documents needs them equal (or None): pad with a document of padding tokens "
                             f"whose labels are IGNORE_INDEX instead")
    return cu


def zigzag_rows(values: Tensor, batch: int, cp_group: ProcessGroup | None) -> Tensor:
    """Per-token GLOBAL values ``[b*L]`` (rows laid end to end, natural order) -> ``[b, s_local]``
    of the tokens this rank holds in the zigzag layout."""
    world = group_size(cp_group)
    rows = values.view(batch, -1)  # b, L
    return rows if world == 1 else shard(rows, 1, "zigzag", world, group_rank(cp_group))
