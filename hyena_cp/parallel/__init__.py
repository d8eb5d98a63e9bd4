"""What talks to other ranks on the model's path: the collectives of context and tensor parallelism
as traceable custom ops (`traceable`), CP layouts, the sequence<->channel AllToAll swaps, halo
exchanges, reductions, token redistribution, TP layouts of parameters, the communication accounting
(`comm_stats`) and the cross-rank agreement check. The job around the model — the device mesh,
FSDP2/DDP, the gradient norm, state bytes, liveness, job-wide decisions — is `hyena_cp.distributed`;
the process pool of the tests and benchmarks is `hyena_cp.testing`. Model code (ops, modules,
models, megatron) calls torch.distributed only through this package. ``group=None`` (or a group of
size 1) always means one process and no communication.
"""
from __future__ import annotations

from .agreement import AGREEMENT_POLICIES, agreed, agreement, check_agreement_policy, check_ranks_agree, shape_of
from .comm_stats import CommStats, count_comm, record
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
from .reductions import (all_gather_seq, all_reduce_sum, broadcast_from, copy_to_group, gather_from_group, group_max,
                         group_sum)
from .tp_dtensor import stored_view, tp_full_view, tp_unfold
from .tp_layout import TPPartition, shard_tp, tp_partition, unshard_tp
from .swap import channel_to_seq, seq_to_channel

__all__ = [
    "AGREEMENT_POLICIES",
    "CommStats",
    "TPPartition",
    "LAYOUTS",
    "agreed",
    "agreement",
    "all_gather_seq",
    "all_reduce_sum",
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
    "copy_to_group",
    "count_comm",
    "from_rank_major",
    "gather_from_group",
    "group_rank",
    "group_max",
    "group_size",
    "group_sum",
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
    "stored_view",
    "to_rank_major",
    "tp_full_view",
    "tp_partition",
    "tp_unfold",
    "unshard",
    "unshard_tp",
]
