"""Byte-level language-modelling text made of the Python standard library's own ``.py``
files: present on every machine, no download. The text (and so the numbers a run reports)
depends on the Python version that runs it.

Documents: each source file (its bytes and the `EOS` that ends it) is one document, and
`TokenSplits.packed_samples` cuts the same fixed-length windows as `TokenSplits.samples`
with the document boundaries inside each window: a window packs the end of one file, the
files that follow whole, and the start of the next (files are far longer than a window, so
this is the order-preserving packing that wastes no byte). Targets that cross into the next
document (the first byte of a file, predicted from the previous file's EOS) are
`IGNORE_INDEX`, and the model, given the boundaries, sees nothing across them.
"""
from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "NUCLEOTIDE_IDS", "TokenSplits", "as_nucleotides", "load_stdlib_text"]

EOS = 0  # byte that separates files; NUL never occurs in Python source
IGNORE_INDEX = -100  # label without loss (torch cross_entropy's default); hyena_cp.megatron uses this one


@dataclass(frozen=True)
class TokenSplits:
    """GLOBAL byte streams ``[N]`` (uint8) cut into samples of ``seq_len + 1`` bytes.

    Sample ``i`` of a split is ``stream[i * seq_len : (i + 1) * seq_len + 1]``: inputs are
    its first ``seq_len`` bytes, labels the last ``seq_len`` (next-byte prediction).
    ``train_starts`` / ``val_starts``: sorted int64 offsets in each stream where a document
    (a file, or the part of one a split begins with) starts; None when unknown.
    """

    train: Tensor
    val: Tensor
    seq_len: int
    vocab_size: int = 256
    train_starts: Tensor | None = None
    val_starts: Tensor | None = None

    def num_samples(self, split: str) -> int:
        stream = self.train if split == "train" else self.val
        return (len(stream) - 1) // self.seq_len

    def samples(self, split: str, indices: Tensor) -> tuple[Tensor, Tensor]:
        """``(input_ids, labels)``, each ``[len(indices), seq_len]`` int64, full sequences."""
        stream = self.train if split == "train" else self.val
        offsets = indices[:, None] * self.seq_len + torch.arange(self.seq_len + 1)  # n, seq_len + 1
        tokens = stream[offsets].long()
        return tokens[:, :-1], tokens[:, 1:]

    def packed_samples(self, split: str, indices: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``(input_ids, labels, cu_seqlens)``: the windows of `samples`, with ``labels`` set to
        `IGNORE_INDEX` where the target starts the next document, and per window its document
        boundaries ``cu_seqlens[i]`` (int64 ``[N_i + 1]``: 0, the starts inside the window,
        ``seq_len``)."""
        starts = self.train_starts if split == "train" else self.val_starts
        if starts is None:
            raise ValueError("these TokenSplits carry no document starts; build them with load_stdlib_text, or "
                             "set task.pack=false")
        inputs, labels = self.samples(split, indices)
        offsets = indices[:, None] * self.seq_len + torch.arange(self.seq_len + 1)  # n, seq_len + 1
        begins = torch.isin(offsets, starts)  # a document starts at this byte
        labels = labels.masked_fill(begins[:, 1:], IGNORE_INDEX)
        begins[:, 0] = True  # every window starts a document (the rest of the one it cuts)
        arange = torch.arange(self.seq_len)
        cu = [torch.cat([arange[row[:-1]], torch.tensor([self.seq_len])]) for row in begins]
        return inputs, labels, cu


# HyenaDNA's character tokenizer: A, C, G, T are ids 7..10 (the special tokens come first)
NUCLEOTIDE_IDS = torch.tensor([7, 8, 9, 10], dtype=torch.uint8)


def as_nucleotides(stream: Tensor) -> Tensor:
    """Each byte as four bases, two bits each, most significant first, in HyenaDNA's token ids:
    ``[N]`` uint8 -> ``[4N]`` uint8 (EOS, byte 0, becomes AAAA)."""
    shifts = torch.tensor([6, 4, 2, 0], dtype=torch.uint8)
    return NUCLEOTIDE_IDS[((stream[:, None] >> shifts) & 3).long()].flatten()


def load_stdlib_text(*, seq_len: int = 256, val_fraction: float = 0.05, max_bytes: int = 2_000_000,
                     alphabet: str = "bytes") -> TokenSplits:
    """The top-level ``*.py`` files of the standard library in sorted order, joined by `EOS`,
    truncated to ``max_bytes``; the last ``val_fraction`` of the bytes is the validation split.
    ``alphabet="nucleotides"``: the same text as a DNA-shaped stream for nucleotide models
    (`as_nucleotides`: four bases per byte in HyenaDNA's ids, vocabulary 12; ``seq_len`` counts bases)."""
    if seq_len < 1 or max_bytes < 2 * seq_len + 2:
        raise ValueError(f"seq_len={seq_len} must be >= 1 and max_bytes={max_bytes} >= 2 * seq_len + 2")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    if alphabet not in ("bytes", "nucleotides"):
        raise ValueError(f"alphabet={alphabet!r} must be 'bytes' or 'nucleotides'")
    root = Path(sysconfig.get_paths()["stdlib"])
    data, starts = bytearray(), []
    for path in sorted(root.glob("*.py")):
        starts.append(len(data))
        data += path.read_bytes() + bytes([EOS])
        if len(data) >= max_bytes:
            break
    stream = torch.frombuffer(data[:max_bytes], dtype=torch.uint8).clone()  # bytearray: writable
    vocab, scale = 256, 1
    if alphabet == "nucleotides":
        stream, vocab, scale = as_nucleotides(stream), 12, 4
    starts = [scale * start for start in starts]
    n_val = max(int(len(stream) * val_fraction), seq_len + 1)
    if len(stream) - n_val < seq_len + 1:
        raise ValueError(f"only {len(stream)} bytes of text under {root}: lower seq_len or val_fraction")
    n_train, starts_t = len(stream) - n_val, torch.tensor(starts)
    val_starts = torch.cat([torch.zeros(1, dtype=torch.long), starts_t[starts_t > n_train] - n_train])
    return TokenSplits(train=stream[:n_train], val=stream[n_train:], seq_len=seq_len, vocab_size=vocab,
                       train_starts=starts_t[starts_t < n_train], val_starts=val_starts)
