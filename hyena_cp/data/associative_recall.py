"""Associative recall, generated from a seed (nothing downloaded), in the Hyena paper's format.

The Hyena paper (Poli et al. 2023, Table 4.2) and its code base (safari's ``icl_synthetics``,
``copy_method="assoc_recall"``) use a vocabulary of 30: two special tokens and 28 ordinary
ones, the first half keys and the second half values. Each sample draws its own map from
keys to values (uniform, independent: two keys may share a value), then a run of key-value
pairs with uniform keys, then the query marker ``=>`` and one of the keys that occurred; the
target is that key's value. Token ids here:

- ``0 .. num_keys-1``: keys; ``num_keys .. num_keys+num_values-1``: values;
- `query_token` (the paper's ``=>``) and `noop_token` (the paper's ``.``: the answer for a key
  that did not occur; never a target here, as in the paper's default ``allow_dot=False``).

A sample of ``seq_len`` input tokens (even, >= 4) is ``(seq_len - 2) / 2`` pairs, ``=>``, the
query key. Labels are next-token labels (``labels[t]`` is the target of input ``t``) and
`IGNORE_INDEX` everywhere except, with ``targets="query"``, the last position: its label is the
queried key's value, and accuracy on it is the task's metric.

``targets="values"`` also labels every key whose value is already determined by an earlier
pair (the key occurred before, so its value can be recalled from the context): the denser
training signal of the paper's own training set, whose labels cover every position (keys,
which cannot be predicted, included); evaluation always uses ``"query"``.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from hyena_cp.data.stdlib_text import IGNORE_INDEX

__all__ = ["RECALL_TARGETS", "FreshBatches", "associative_recall", "noop_token", "query_token", "recall_vocab_size"]

RECALL_TARGETS = ("query", "values")
Targets = Literal["query", "values"]


def query_token(num_keys: int, num_values: int) -> int:
    """The id of the query marker (the paper's ``=>``)."""
    return num_keys + num_values


def noop_token(num_keys: int, num_values: int) -> int:
    """The id of the paper's ``.`` (answer for an absent key; in the vocabulary, never generated)."""
    return num_keys + num_values + 1


def recall_vocab_size(num_keys: int, num_values: int) -> int:
    """Keys, values and the two special tokens: 30 for the paper's 14 keys and 14 values."""
    return num_keys + num_values + 2


def _check(num_samples: int, seq_len: int, num_keys: int, num_values: int, targets: str) -> None:
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    if seq_len < 4 or seq_len % 2:
        raise ValueError(f"seq_len={seq_len} must be even and >= 4 (key-value pairs, the query marker, the query key)")
    if num_keys < 1 or num_values < 1:
        raise ValueError(f"num_keys={num_keys} and num_values={num_values} must be >= 1")
    if targets not in RECALL_TARGETS:
        raise ValueError(f"targets={targets!r} must be one of {RECALL_TARGETS}")


def associative_recall(num_samples: int, seq_len: int, *, generator: torch.Generator, num_keys: int = 14,
                       num_values: int = 14, targets: Targets = "query") -> tuple[Tensor, Tensor]:
    """``(input_ids, labels)``, each ``[num_samples, seq_len]`` int64, drawn from ``generator``.

    ``input_ids[b] = k_1 v_1 k_2 v_2 ... k_n v_n => q`` with ``n = (seq_len - 2) / 2``,
    ``v_i = map_b(k_i)`` and ``q`` uniform over the keys that occur in sample ``b``;
    ``labels[b, -1] = map_b(q)``; see the module docstring for ``targets``.
    """
    _check(num_samples, seq_len, num_keys, num_values, targets)
    b, n = num_samples, (seq_len - 2) // 2
    value_of = num_keys + torch.randint(num_values, (b, num_keys), generator=generator)  # b, keys: the map
    keys = torch.randint(num_keys, (b, n), generator=generator)  # b, n
    values = value_of.gather(1, keys)  # b, n
    present = torch.zeros(b, num_keys).scatter_(1, keys, 1.0)  # b, keys: 1 where the key occurs
    query = torch.multinomial(present, 1, generator=generator)  # b, 1: uniform over the keys that occur
    marker = torch.full((b, 1), query_token(num_keys, num_values), dtype=torch.long)
    pairs = torch.stack([keys, values], dim=-1).reshape(b, 2 * n)  # b, 2n: k v k v ...
    input_ids = torch.cat([pairs, marker, query], dim=1)  # b, seq_len
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -1] = value_of.gather(1, query)[:, 0]
    if targets == "values":
        labels[:, 0:2 * n:2] = torch.where(_seen_before(keys, num_keys), values, IGNORE_INDEX)
    return input_ids, labels


def _seen_before(keys: Tensor, num_keys: int) -> Tensor:
    """``keys [b, n]`` -> bool ``[b, n]``: pair i's key occurred in a pair j < i."""
    b, n = keys.shape
    index = torch.arange(n).expand(b, n)
    first = torch.full((b, num_keys), n).scatter_reduce(1, keys, index, reduce="amin")  # b, keys
    return index > first.gather(1, keys)


class FreshBatches:
    """Training samples drawn afresh for every step: step ``s`` of a run seeded ``seed`` uses a
    generator seeded ``(seed << 32) | s``, a pure function of the two, so a resumed run reads the
    batches an uninterrupted run reads. No sample repeats, so an epoch is one step."""

    def __init__(self, *, global_batch_size: int, seed: int):
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size={global_batch_size} must be >= 1")
        if not 0 <= seed < 2 ** 30:
            raise ValueError(f"seed={seed} must be in [0, 2**30)")
        self.global_batch_size, self.seed = global_batch_size, seed

    def epoch(self, step: int) -> int:
        return step

    def generator(self, step: int) -> torch.Generator:
        if not 0 <= step < 2 ** 32:
            raise ValueError(f"step={step} must be in [0, 2**32)")
        return torch.Generator().manual_seed((self.seed << 32) | step)
