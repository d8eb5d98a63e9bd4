"""Packed sequences: document boundaries as tensors (pure math, no process groups).

Convention (flash-attention / megatron THD): ``cu_seqlens`` is an integer tensor ``[N+1]`` of
cumulative document lengths, 0 first and the total token count last, non-decreasing (an
empty document is allowed and holds no token). It counts GLOBAL positions in natural order,
never a CP shard. A batch of B rows of length L is described by ONE ``cu_seqlens`` over the
rows laid end to end (``B*L`` tokens, row b at ``[b*L, (b+1)*L)``); every row end ``b*L`` is
a boundary, so no document crosses rows. With B = 1 this is exactly the THD convention.

Everything that depends on the boundaries is derived here, once, from ``cu_seqlens``:
`document_positions` (offset of each token in its document: the short conv's tap masks and
the rotary positions), `document_ids` (the attention mask), `DocumentBuckets` (how the long
FFT conv runs each document on its own).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DocumentBuckets", "check_cu_seqlens", "concat_cu_seqlens", "document_ids", "document_positions",
           "fft_segment_length", "is_one_document_per_row"]


def check_cu_seqlens(cu_seqlens: Tensor, total_len: int, row_len: int | None = None) -> None:
    """Raise ``ValueError`` unless ``cu_seqlens`` describes documents of ``total_len`` tokens
    (``B*L``) that never cross a row end (a multiple of ``row_len = L``, when given).

    Reads the values (a host sync on GPUs): call it once per forward, before any collective.
    """
    fix = ("pass cu_seqlens as an integer tensor [N+1] of cumulative GLOBAL document lengths: 0 first, "
           f"the total B*L={total_len} last, non-decreasing")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() \
            or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool or cu_seqlens.numel() < 2:
        got = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, Tensor) else type(cu_seqlens)
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor with at least 2 entries, got {got}; {fix}")
    cu = cu_seqlens.detach().cpu().long()
    if cu[0] != 0 or cu[-1] != total_len:
        raise ValueError(f"cu_seqlens must start at 0 and end at the global token count B*L={total_len}, got "
                         f"first {int(cu[0])} and last {int(cu[-1])}; {fix}")
    if bool((cu.diff() < 0).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}; {fix}")
    if row_len is not None and total_len > row_len:
        row_ends = torch.arange(row_len, total_len, row_len)
        missing = row_ends[~torch.isin(row_ends, cu)]
        if missing.numel():
            raise ValueError(f"cu_seqlens must contain every row end b*L (L={row_len}): a document may not cross "
                             f"rows of the batch; missing {missing.tolist()}. Split such documents at the row end")


def concat_cu_seqlens(rows: Sequence[Tensor], row_len: int) -> Tensor:
    """Per-row boundaries (each ``[N_b + 1]``: 0 ... ``row_len``) -> the batch's ``cu_seqlens``
    over the rows laid end to end (int64)."""
    pieces = [torch.as_tensor(r, dtype=torch.long)[:-1] + b * row_len for b, r in enumerate(rows)]
    return torch.cat([*pieces, torch.tensor([len(rows) * row_len])])


def document_ids(cu_seqlens: Tensor, total_len: int) -> Tensor:
    """``[total_len]`` int64: which document each GLOBAL token belongs to (0-based)."""
    lengths = cu_seqlens.long().diff()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths,
                                   output_size=total_len)


def document_positions(cu_seqlens: Tensor, total_len: int) -> Tensor:
    """``[total_len]`` int64: each GLOBAL token's offset in its document (0 at a document start)."""
    cu = cu_seqlens.long()
    return torch.arange(total_len, device=cu.device) - cu[document_ids(cu, total_len)]


def is_one_document_per_row(cu_seqlens: Tensor, total_len: int, row_len: int) -> bool:
    """True when the documents are exactly the rows (``cu_seqlens`` = 0, L, 2L, ..., ignoring
    empty documents): packing changes nothing and the plain path is exact."""
    cu = torch.unique_consecutive(cu_seqlens.detach().cpu().long())
    return cu.numel() == total_len // row_len + 1 and bool((cu == torch.arange(0, total_len + 1, row_len)).all())


def fft_segment_length(n: int) -> int:
    """Smallest ``2^a`` or ``3 * 2^a`` that is >= ``n`` (n >= 1): the segment a document of
    ``n`` tokens is zero-padded to (its FFT length is twice that). Less than 1.5x padding,
    and sizes whose FFTs are fast (radix 2 and 3)."""
    if n < 1:
        raise ValueError(f"fft_segment_length: n={n} must be >= 1")
    power = 1 << (n - 1).bit_length()  # smallest power of two >= n
    three = 3 * power // 4
    return three if power >= 4 and three >= n else power


@dataclass(frozen=True)
class DocumentBuckets:
    """How to run a per-document op on the tokens of ``cu_seqlens``, grouped by padded length.

    Documents are bucketed by `fft_segment_length`; bucket i holds ``counts[i]`` documents,
    each zero-padded to ``lengths[i]`` tokens, and the buckets' slots are laid end to end.
    ``gather`` (``[slots]``) is the token index of every slot, ``total_len`` (a zero slot the
    caller appends) past a document's end; ``scatter`` (``[total_len]``) is the slot of every
    token. Gathering a ``[..., total_len + 1]`` tensor with ``gather`` gives all buckets at
    once (ONE gather: its adjoint is one scatter-add, not one per bucket), bucket i being
    ``[..., offsets[i]:offsets[i+1]]`` = ``[..., counts[i], lengths[i]]``; gathering the
    concatenated bucket results with ``scatter`` puts every token back.
    """

    lengths: tuple[int, ...]
    counts: tuple[int, ...]
    gather: Tensor
    scatter: Tensor

    @property
    def offsets(self) -> tuple[int, ...]:
        """Slot offset of each bucket, and the total slot count last."""
        ends = [0]
        for m, n in zip(self.lengths, self.counts):
            ends.append(ends[-1] + m * n)
        return tuple(ends)

    @classmethod
    def build(cls, cu_seqlens: Tensor, total_len: int) -> DocumentBuckets:
        """Buckets of the documents of ``cu_seqlens`` (empty documents are skipped)."""
        cu = cu_seqlens.long()
        starts, sizes = cu[:-1], cu.diff()
        by_length: dict[int, list[int]] = {}
        for doc, n in enumerate(sizes.tolist()):
            if n > 0:
                by_length.setdefault(fft_segment_length(n), []).append(doc)
        slot_of_doc = torch.zeros_like(starts)
        lengths, counts, gathers, base = [], [], [], 0
        for m in sorted(by_length):
            docs = torch.tensor(by_length[m], device=cu.device)
            offsets = torch.arange(m, device=cu.device)
            index = starts[docs, None] + offsets  # docs, m
            gathers.append(torch.where(offsets < sizes[docs, None], index, total_len).flatten())
            slot_of_doc[docs] = base + m * torch.arange(len(docs), device=cu.device)
            lengths.append(m)
            counts.append(len(docs))
            base += m * len(docs)
        ids = document_ids(cu, total_len)
        scatter = slot_of_doc[ids] + torch.arange(total_len, device=cu.device) - starts[ids]
        return cls(tuple(lengths), tuple(counts), torch.cat(gathers), scatter)
