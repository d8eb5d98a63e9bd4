"""A CPU-safe, context-parallel ``core_attention`` for attention layers in Hyena/attention hybrids.

megatron-core's stock local ``DotProductAttention`` does not run on a CPU-only machine (its
score buffer is allocated with ``torch.cuda.current_device()``, its dropout forks the CUDA
RNG tracker) and has no context parallelism. `TorchCoreAttention` takes its place in the
layer spec: the same call contract, computed with ``torch.nn.functional.scaled_dot_product_attention``.

Context parallelism (zigzag layout, shared with the Hyena layers: the global sequence is cut
into 2P chunks and CP rank r holds chunks r and 2P-1-r). Queries stay local; keys and values
are all-gathered over the CP group with `hyena_cp.parallel.all_gather_seq` (its backward is
the reduce-scatter, the exact adjoint; the ViT attention uses the same op), put back in
natural order with ``from_rank_major``, and masked causally by GLOBAL position: a query at
global position p sees keys 0..p (`zigzag_causal_attention`: each zigzag chunk against the keys
before its end only). Memory: each attention layer keeps the gathered K and V
for backward, ``2 * L * b * ng * hn`` elements per rank (P times its own shard's); ring
attention would avoid it at the cost of P steps.

Packed sequences (``packed_seq_params``, `hyena_cp.megatron.packing`: GLOBAL boundaries over
the b rows laid end to end, the whole sequence zigzag-sharded): a query sees only the keys of
its own document (and, causal, at or before its position), `packed_attention_mask`; rotary
positions restart at every document (`hyena_cp.megatron.rope`), so a packed document equals
that document run alone. The K/V gather is unchanged.

Tensor parallelism: megatron's ``SelfAttention`` splits heads over TP (its column-parallel
qkv and row-parallel output projection run on CPU/gloo); the core attention receives the
``np/TP`` local heads and ``ng/TP`` local query groups and needs nothing else. Head counts
must divide by TP (`check_attention_parallelism`).

On GPUs with TransformerEngine, pass ``core_attention=TEDotProductAttention`` to the spec
helpers (or to `build_hyena_lm`) instead: TE does its own CP in the same zigzag layout, so
the rotary table of `hyena_cp.megatron.rope` is right for it too (not tested here: no TE on CPU).

Tested in tests/test_megatron_attention_cp.py (fp64 against a reference, P in {1, 2, 4}, and
a local-keys twin that must fail) and, inside the LM, tests/test_megatron_lm*.py.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.distributed import ProcessGroup

from hyena_cp.megatron.compat import AttnMaskType, MegatronModule, ProcessGroupCollection, TransformerConfig
from hyena_cp.megatron.compat import PackedSeqParams, resolve_cp_group
from hyena_cp.megatron.packing import cu_seqlens_from, zigzag_rows
from hyena_cp.megatron.rope import zigzag_positions
from hyena_cp.ops.packing import check_cu_seqlens, document_ids
from hyena_cp.parallel import all_gather_seq, from_rank_major, group_rank, group_size, is_parallel

__all__ = ["TorchCoreAttention", "check_attention_parallelism", "gather_zigzag_sequence", "packed_attention_mask",
           "zigzag_causal_attention", "zigzag_causal_mask"]

_CP_MASK_TYPES = (AttnMaskType.causal, AttnMaskType.no_mask)


def check_attention_parallelism(config: TransformerConfig, *, tp_size: int) -> None:
    """Raise ``ValueError`` (on every rank, before megatron's ``SelfAttention`` is built) for
    head counts that megatron cannot split over ``tp_size`` TP ranks on CPU."""
    heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
    if heads % tp_size:
        raise ValueError(f"num_attention_heads={heads} must be divisible by the tensor-parallel size {tp_size} "
                         f"(each TP rank owns whole heads); choose num_attention_heads or tensor_model_parallel_size")
    if groups % tp_size:
        # megatron's layout for fewer query groups than TP ranks all-gathers qkv through a CUDA buffer.
        raise ValueError(f"num_query_groups={groups} must be divisible by the tensor-parallel size {tp_size} "
                         f"(megatron's replicated-KV layout for num_query_groups < TP allocates on CUDA); use "
                         f"num_query_groups a multiple of {tp_size}")


def gather_zigzag_sequence(x: Tensor, cp_group: ProcessGroup | None) -> Tensor:
    """``[s_local, ...]`` zigzag shard -> the GLOBAL ``[L, ...]`` in natural order, on every rank
    (backward: each rank gets the sum over ranks of the grad of its own shard)."""
    return from_rank_major(all_gather_seq(x, 0, cp_group), 0, "zigzag", group_size(cp_group))


def zigzag_causal_mask(local_len: int, cp_group: ProcessGroup | None, device: torch.device | None = None) -> Tensor:
    """``[s_local, L]`` bool, True where this rank's query (zigzag shard) may attend the key at
    that GLOBAL position: key position <= query position."""
    q_pos = zigzag_positions(local_len, cp_group, device)
    k_pos = torch.arange(local_len * group_size(cp_group), device=device)
    return k_pos[None, :] <= q_pos[:, None]


def zigzag_causal_attention(q: Tensor, k: Tensor, v: Tensor, cp_group: ProcessGroup | None, attention) -> Tensor:
    """Causal attention of this rank's zigzag queries ``q [b, n, s_local, d]`` over the GLOBAL keys and
    values ``[b, n, L, d]`` (natural order), one zigzag chunk at a time: chunk i (c tokens, global
    positions ``[i c, (i+1) c)``) reads only the keys ``[0, (i+1) c)``, with the causal mask of its
    own c x c diagonal block (none at all for chunk 0: ``is_causal``). Against one ``[s_local, L]``
    mask over every key this skips the keys no query of the chunk sees (rank r of P computes
    ``(2P + 1) c^2`` scores instead of ``4P c^2``) and hands SDPA an additive float mask, which it
    would otherwise convert from a bool one. ``attention``: ``scaled_dot_product_attention`` with the
    layer's dropout and scale."""
    world, rank = group_size(cp_group), group_rank(cp_group)
    chunk = q.shape[2] // 2
    outs = []
    for local, index in enumerate((rank, 2 * world - 1 - rank)):
        rows, keys = slice(local * chunk, (local + 1) * chunk), (index + 1) * chunk
        if index == 0:
            outs.append(attention(q[:, :, rows], k[:, :, :keys], v[:, :, :keys], is_causal=True))
            continue
        # key j - query i > index * chunk: a key after the query (-inf), everything else visible (0)
        mask = torch.full((chunk, keys), float("-inf"), dtype=q.dtype, device=q.device).triu_(index * chunk + 1)
        outs.append(attention(q[:, :, rows], k[:, :, :keys], v[:, :, :keys], attn_mask=mask))
    return torch.cat(outs, dim=2)


def packed_attention_mask(cu_seqlens: Tensor, batch: int, local_len: int, cp_group: ProcessGroup | None,
                          causal: bool, device: torch.device | None = None) -> Tensor:
    """``[b, 1, s_local, L]`` bool, True where this rank's query (zigzag shard) may attend the key
    at that GLOBAL position: the same document (GLOBAL ``cu_seqlens`` over the b rows laid end
    to end) and, when ``causal``, key position <= query position."""
    length = local_len * group_size(cp_group)
    ids = document_ids(cu_seqlens.to(device), batch * length)  # b*L
    keep = zigzag_rows(ids, batch, cp_group)[:, :, None] == ids.view(batch, 1, length)  # b, s_local, L
    if causal:
        keep &= zigzag_causal_mask(local_len, cp_group, device)
    return keep[:, None]


class TorchCoreAttention(MegatronModule):
    """Scaled dot-product attention as megatron's ``core_attention`` submodule, context parallel.

    Constructor arguments are those ``SelfAttention`` passes to its core attention; the CP
    group is ``pg_collection.cp`` when set, else ``parallel_state``'s, else one process.
    ``cp_comm_type`` is accepted and ignored: K and V are always all-gathered.

    Raises:
        ValueError: at construction, under CP > 1, for cross attention, a mask type other
            than causal/no_mask, or a ``config.context_parallel_size`` that differs from
            the CP group size.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: ProcessGroupCollection | None = None):
        super().__init__(config=config)
        self.cp_group = resolve_cp_group(pg_collection)
        _check_cp(config, attention_type, attn_mask_type, group_size(self.cp_group))
        self.layer_number, self.attn_mask_type = layer_number, attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        self.kv_cache = None  # set during generation only: a `hyena_cp.megatron.kv_cache.KVCache`

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """Empty: the core attention holds no parameters or buffers (megatron's ``SelfAttention``
        around it checkpoints the TP-split projections), and a generation KV cache is transient."""
        if self.state_dict():
            raise RuntimeError("TorchCoreAttention gained state; give it a sharded_state_dict that places it")
        return {}

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> Tensor:
        """``query [s_local, b, np, hn]``, ``key``/``value [s_local, b, ng, hn]`` (ng divides np:
        GQA), this rank's zigzag shard -> context ``[s_local, b, np*hn]``. ``attention_mask``:
        megatron's bool mask, True = masked out (one process only); None with a causal mask
        type means causal over GLOBAL positions. ``packed_seq_params``: packed documents (see
        the module docstring), the mask is then per document."""
        if attention_bias is not None:
            raise ValueError("TorchCoreAttention does not support attention_bias; pass None")
        if self.kv_cache is not None:  # generation: a decode step, or a prefill that keeps K and V
            if packed_seq_params is not None:
                raise ValueError("generation does not take packed sequences (packed_seq_params): prompts are one "
                                 "document per row; pass packed_seq_params=None")
            if self.kv_cache.decoding:
                return self.kv_cache.decode(query, key, value)
            self.kv_cache.record(key, value)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        cu_seqlens = self._packed(packed_seq_params, attention_mask, mask_type, query)
        if is_parallel(self.cp_group):
            if attention_mask is not None or mask_type not in _CP_MASK_TYPES:
                raise ValueError("under context parallelism TorchCoreAttention builds the causal mask from global "
                                 "positions: pass attention_mask=None with a causal or no_mask mask type")
            key, value = gather_zigzag_sequence(torch.stack([key, value], dim=1), self.cp_group).unbind(1)
        rep = query.shape[2] // key.shape[2]
        q = rearrange(query, "s b n d -> b n s d")
        k, v = (rearrange(t, "s b g d -> b g s d").repeat_interleave(rep, dim=1) for t in (key, value))
        attention = functools.partial(F.scaled_dot_product_attention, dropout_p=self.dropout if self.training else 0.0,
                                      scale=self.softmax_scale)
        if is_parallel(self.cp_group) and cu_seqlens is None and mask_type == AttnMaskType.causal:
            out = zigzag_causal_attention(q, k, v, self.cp_group, attention)
        else:
            keep, is_causal = self._mask(query, attention_mask, mask_type, cu_seqlens)
            out = attention(q, k, v, attn_mask=keep, is_causal=is_causal)
        return rearrange(out, "b n s d -> s b (n d)")

    def _packed(self, params: PackedSeqParams | None, attention_mask: Tensor | None, mask_type: AttnMaskType,
                query: Tensor) -> Tensor | None:
        """Validated GLOBAL ``cu_seqlens`` of ``params`` (None: unpacked); raises before the gather."""
        world = group_size(self.cp_group)
        cu_seqlens = cu_seqlens_from(params, where="TorchCoreAttention", cp_size=world, batch=query.shape[1],
                                     allow_thd=False)
        if cu_seqlens is None:
            return None
        if attention_mask is not None or mask_type not in _CP_MASK_TYPES:
            raise ValueError("with packed_seq_params TorchCoreAttention builds the per-document mask itself: pass "
                             "attention_mask=None with a causal or no_mask mask type")
        length = query.shape[0] * world
        check_cu_seqlens(cu_seqlens, query.shape[1] * length, length)
        return cu_seqlens

    def _mask(self, query: Tensor, attention_mask: Tensor | None, mask_type: AttnMaskType,
              cu_seqlens: Tensor | None) -> tuple[Tensor | None, bool]:
        """``(keep mask or None, is_causal)`` for ``scaled_dot_product_attention``."""
        causal = mask_type == AttnMaskType.causal
        if cu_seqlens is not None:
            mask = packed_attention_mask(cu_seqlens, query.shape[1], query.shape[0], self.cp_group, causal,
                                         query.device)
            return mask, False
        if attention_mask is not None:  # one process (refused under CP)
            return ~attention_mask, False
        if is_parallel(self.cp_group):  # no_mask (causal CP runs `zigzag_causal_attention`)
            return None, False
        return None, causal


def _check_cp(config: TransformerConfig, attention_type: str, mask_type: AttnMaskType, cp_size: int) -> None:
    if config.context_parallel_size not in (1, cp_size):
        raise ValueError(f"config.context_parallel_size={config.context_parallel_size} differs from the CP group "
                         f"size {cp_size}; make them equal (or leave the config at 1 and pass the group)")
    if cp_size == 1:
        return
    if attention_type != "self":
        raise ValueError(f"TorchCoreAttention is context parallel for self attention only, got "
                         f"attention_type={attention_type!r}; use CP size 1 for cross attention")
    if mask_type not in _CP_MASK_TYPES:
        raise ValueError(f"attn_mask_type={mask_type} is not supported under context parallelism (CP size "
                         f"{cp_size}); use AttnMaskType.causal (or no_mask)")
