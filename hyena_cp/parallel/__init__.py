"""Everything that talks to other ranks: the run's DeviceMesh (`dims`), data parallelism with
FSDP2 (`fsdp`), group helpers, CP layouts, the sequence<->channel AllToAll swaps, halo exchange,
reductions and the cross-rank agreement check. Nothing else in hyena_cp calls torch.distributed.
``group=None`` (or a group of size 1) always means one process and no communication.
"""
from __future__ import annotations

from .agreement import AGREEMENT_POLICIES, agreed, check_agreement_policy, check_ranks_agree, shape_of
from .comm_stats import CommStats, count_comm, record
from .dims import ParallelDims, ParallelGroups, destroy_parallel, init_parallel
from .fsdp import DP_MODES, apply_data_parallel, block_modules, full_parameters
from .grad_norm import clip_grad_norm, grad_norm
from .groups import check_group, group_rank, group_size, is_parallel
from .halo import block_halo, causal_halo_1d, row_halo_2d
from .layouts import (
    LAYOUTS,
    check_divisible,
    check_layout,
    chunk_ids,
    chunks_per_rank,
    from_rank_major,
    num_chunks,
    shard,
    to_rank_major,
    unshard,
)
from .p2p import p2p_exchange
from .redistribute import redistribute
from .reductions import all_gather_seq, all_reduce_sum, broadcast_from, copy_to_group, gather_from_group, group_sum
from .state_bytes import StateBytes, state_bytes
from .tp_dtensor import stored_view, tp_full_view, tp_unfold
from .tp_layout import TPPartition, shard_tp, tp_partition, unshard_tp
from .swap import channel_to_seq, seq_to_channel

__all__ = [
    "AGREEMENT_POLICIES",
    "CommStats",
    "DP_MODES",
    "StateBytes",
    "TPPartition",
    "LAYOUTS",
    "ParallelDims",
    "ParallelGroups",
    "agreed",
    "all_gather_seq",
    "all_reduce_sum",
    "apply_data_parallel",
    "block_modules",
    "broadcast_from",
    "block_halo",
    "causal_halo_1d",
    "channel_to_seq",
    "check_agreement_policy",
    "check_divisible",
    "check_group",
    "check_layout",
    "check_ranks_agree",
    "chunk_ids",
    "chunks_per_rank",
    "clip_grad_norm",
    "copy_to_group",
    "count_comm",
    "destroy_parallel",
    "from_rank_major",
    "full_parameters",
    "gather_from_group",
    "grad_norm",
    "group_rank",
    "group_size",
    "group_sum",
    "init_parallel",
    "is_parallel",
    "num_chunks",
    "p2p_exchange",
    "record",
    "redistribute",
    "row_halo_2d",
    "seq_to_channel",
    "shard",
    "shape_of",
    "shard_tp",
    "state_bytes",
    "stored_view",
    "to_rank_major",
    "tp_full_view",
    "tp_partition",
    "tp_unfold",
    "unshard",
    "unshard_tp",
]
