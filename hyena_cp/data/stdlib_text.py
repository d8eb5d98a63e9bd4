"""Byte-level language-modelling text made of the Python standard library's own ``.py``
files: present on every machine, no download. The text (and so the numbers a run reports)
depends on the Python version that runs it."""
from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["TokenSplits", "load_stdlib_text"]

EOS = 0  # byte that separates files; NUL never occurs in Python source


@dataclass(frozen=True)
class TokenSplits:
    """GLOBAL byte streams ``[N]`` (uint8) cut into samples of ``seq_len + 1`` bytes.

    Sample ``i`` of a split is ``stream[i * seq_len : (i + 1) * seq_len + 1]``: inputs are
    its first ``seq_len`` bytes, labels the last ``seq_len`` (next-byte prediction).
    """

    train: Tensor
    val: Tensor
    seq_len: int
    vocab_size: int = 256

    def num_samples(self, split: str) -> int:
        stream = self.train if split == "train" else self.val
        return (len(stream) - 1) // self.seq_len

    def samples(self, split: str, indices: Tensor) -> tuple[Tensor, Tensor]:
        """``(input_ids, labels)``, each ``[len(indices), seq_len]`` int64, full sequences."""
        stream = self.train if split == "train" else self.val
        offsets = indices[:, None] * self.seq_len + torch.arange(self.seq_len + 1)  # n, seq_len + 1
        tokens = stream[offsets].long()
        return tokens[:, :-1], tokens[:, 1:]


def load_stdlib_text(*, seq_len: int = 256, val_fraction: float = 0.05, max_bytes: int = 2_000_000) -> TokenSplits:
    """The top-level ``*.py`` files of the standard library in sorted order, joined by `EOS`,
    truncated to ``max_bytes``; the last ``val_fraction`` of the bytes is the validation split."""
    if seq_len < 1 or max_bytes < 2 * seq_len + 2:
        raise ValueError(f"seq_len={seq_len} must be >= 1 and max_bytes={max_bytes} >= 2 * seq_len + 2")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    root = Path(sysconfig.get_paths()["stdlib"])
    data = bytearray()
    for path in sorted(root.glob("*.py")):
        data += path.read_bytes() + bytes([EOS])
        if len(data) >= max_bytes:
            break
    stream = torch.frombuffer(data[:max_bytes], dtype=torch.uint8).clone()  # bytearray: writable
    n_val = max(int(len(stream) * val_fraction), seq_len + 1)
    if len(stream) - n_val < seq_len + 1:
        raise ValueError(f"only {len(stream)} bytes of text under {root}: lower seq_len or val_fraction")
    return TokenSplits(train=stream[:-n_val], val=stream[-n_val:], seq_len=seq_len)
