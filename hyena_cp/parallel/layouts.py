"""Sequence layouts under context parallelism: which chunks of the global sequence a rank holds.

Pure tensor reordering, no communication. This is the one place that defines the layouts;
data loading, the AllToAll swaps, the halo exchange and the tests all use it.

Layouts (``world`` = CP group size P, ``rank`` in ``[0, P)``):

- ``"zigzag"`` (1-D causal): the sequence is cut into 2P equal chunks and rank r holds
  chunks r and 2P-1-r, concatenated in that order. This is Megatron/TransformerEngine's
  ``get_batch_on_this_cp_rank`` layout, so Hyena and attention layers share one sharding
  and causal work is balanced across ranks.
- ``"rows"`` (2-D, or any non-causal op): P contiguous equal chunks, rank r holds chunk r.
  For a 2-D grid the chunks are blocks of whole grid rows.

With ``world == 1`` every layout is the identity and no divisibility is required: a single
rank holds the whole sequence in natural order, whatever its length.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

LAYOUTS = ("zigzag", "rows")

_CHUNKS_PER_RANK = {"zigzag": 2, "rows": 1}


def check_layout(layout: str) -> None:
    """Raise ``ValueError`` unless ``layout`` is one of `LAYOUTS`."""
    if layout not in _CHUNKS_PER_RANK:
        raise ValueError(f"layout={layout!r} is not a known CP layout; use one of {LAYOUTS}")


def chunks_per_rank(layout: str) -> int:
    """Number of chunks each rank holds (2 for zigzag, 1 for rows)."""
    check_layout(layout)
    return _CHUNKS_PER_RANK[layout]


def num_chunks(layout: str, world: int) -> int:
    """Number of equal chunks the global sequence is cut into for ``world`` ranks."""
    return chunks_per_rank(layout) * world


def chunk_ids(layout: str, world: int, rank: int) -> tuple[int, ...]:
    """Global chunk indices held by ``rank``, in the order they are concatenated locally."""
    check_layout(layout)
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} is outside the CP group of size world={world}")
    if layout == "zigzag":
        return (rank, 2 * world - 1 - rank)
    return (rank,)


def rank_major_order(layout: str, world: int) -> list[int]:
    """Global chunk ids in the order of the rank pieces concatenated in rank order."""
    return [c for r in range(world) for c in chunk_ids(layout, world, r)]


def check_divisible(length: int, layout: str, world: int, name: str = "sequence length",
                    cp_name: str = "cp_size") -> None:
    """Raise ``ValueError`` unless a global length of ``length`` can be sharded in ``layout``
    over ``world`` ranks: divisible by 2P (zigzag) or P (rows). The one check of this rule.

    ``name`` is how the caller's user knows the dimension (e.g. ``"sequence length L"``,
    ``"grid rows H"`` or a config key ``"data.seq_len"``) and ``cp_name`` how they set the CP
    size (``"cp_size"``, ``"parallel.cp"``); both appear in the message with the fix.
    """
    check_layout(layout)
    if world < 1:
        raise ValueError(f"CP group size must be >= 1, got world={world}")
    if world == 1:
        return
    n = num_chunks(layout, world)
    if length % n:
        need = f"2*{cp_name}={n}" if layout == "zigzag" else f"{cp_name}={n}"
        raise ValueError(
            f"{name}={length} must be divisible by {need} for the {layout} layout "
            f"({cp_name}={world}); pad it to a multiple of {n} or choose another {cp_name}"
        )


def _reorder_chunks(x: Tensor, dim: int, n: int, order: Sequence[int]) -> Tensor:
    """Cut ``dim`` of ``x`` into ``n`` equal chunks and return them concatenated in ``order``."""
    if list(order) == list(range(n)):
        return x
    index = torch.tensor(order, device=x.device)
    chunks = x.unflatten(dim, (n, x.shape[dim] // n))  # ..., n, len/n, ...
    return chunks.index_select(dim, index).flatten(dim, dim + 1)


def to_rank_major(x: Tensor, dim: int, layout: str, world: int) -> Tensor:
    """Global natural order along ``dim`` -> the rank pieces concatenated in rank order.

    ``x`` is a GLOBAL tensor; the result is the same data with the P rank-local pieces
    laid out one after another (piece r = ``shard(x, dim, layout, world, r)``).
    """
    dim = dim % x.dim()
    check_divisible(x.shape[dim], layout, world, f"size of dim {dim}")
    return _reorder_chunks(x, dim, num_chunks(layout, world), rank_major_order(layout, world))


def from_rank_major(x: Tensor, dim: int, layout: str, world: int) -> Tensor:
    """Inverse of `to_rank_major`: rank pieces concatenated in rank order -> natural order."""
    dim = dim % x.dim()
    check_divisible(x.shape[dim], layout, world, f"size of dim {dim}")
    order = rank_major_order(layout, world)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return _reorder_chunks(x, dim, len(order), inverse)


def shard(x: Tensor, dim: int, layout: str, world: int, rank: int) -> Tensor:
    """This rank's local piece of the GLOBAL tensor ``x`` along ``dim`` (contiguous).

    ``[..., L, ...] -> [..., L / world, ...]``; for zigzag the two chunks are concatenated
    in the order of `chunk_ids`.
    """
    dim = dim % x.dim()
    check_divisible(x.shape[dim], layout, world, f"size of dim {dim}")
    ids = chunk_ids(layout, world, rank)
    if world == 1:
        return x.contiguous()
    size = x.shape[dim] // num_chunks(layout, world)
    return torch.cat([x.narrow(dim, c * size, size) for c in ids], dim=dim).contiguous()


def unshard(pieces: Sequence[Tensor], dim: int, layout: str) -> Tensor:
    """Global tensor from the per-rank local pieces, given in rank order (inverse of `shard`)."""
    if not pieces:
        raise ValueError("unshard needs at least one rank piece")
    shapes = {tuple(p.shape) for p in pieces}
    if len(shapes) != 1:
        raise ValueError(f"all rank pieces must have the same shape, got {sorted(shapes)}")
    world = len(pieces)
    dim = dim % pieces[0].dim()
    local = pieces[0].shape[dim]
    if world > 1 and local % chunks_per_rank(layout):
        raise ValueError(
            f"local size {local} of dim {dim} must be divisible by "
            f"{chunks_per_rank(layout)} (chunks per rank) for the {layout} layout"
        )
    return from_rank_major(torch.cat(list(pieces), dim=dim), dim, layout, world)
