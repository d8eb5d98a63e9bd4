"""The associative-recall task (`hyena_cp.data.associative_recall`) for the megatron-core Hyena LM.

The model is the language model of `LanguageModeling` (``per_token_loss = model(input_ids,
labels)`` on this rank's zigzag shard ``[b, S / cp]``, built on the run mesh's groups);
only the data and the metric differ. Training samples are drawn afresh
for every step (`FreshBatches`), so there is no training set to overfit and a resumed run reads
the same batches. Validation is a fixed set drawn from ``eval_seed`` (independent of
``train.seed``), and its metric is the accuracy of the argmax over the vocabulary at the query
position, the Hyena paper's metric.

Curriculum: ``lengths`` and ``length_steps`` give the sequence length of every step (length
``lengths[i]`` from step ``length_steps[i]`` on), so a run can learn the task on short
sequences, where a step is cheap, and then move to long ones. The model must accept the
longest (``max_sequence_length``); a Hyena with absolute filter positions
(``hyena.max_len``) sees the same filter prefix at every length.

Loss share (the invariant of `hyena_cp.train.tasks`): every CP rank of a replica holds its
zigzag shard of the same sequences; ``share = sum of its per-token losses / labelled tokens of
the replica's full batch``, so the shares add up to the replica's mean loss over its labelled
tokens. The query is the last token, so under CP it is on rank 0 (zigzag chunk 2P-1).
"""
from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyena_cp.data.associative_recall import RECALL_TARGETS, FreshBatches, Targets, associative_recall
from hyena_cp.data.sampling import cp_shard_tokens, dp_slice, eval_range
from hyena_cp.data.stdlib_text import IGNORE_INDEX
from hyena_cp.distributed.mesh import ParallelGroups
from hyena_cp.parallel.layouts import check_divisible
from hyena_cp.parallel.reductions import group_sum
from hyena_cp.train.tasks import LMBatch

__all__ = ["AssociativeRecall", "EVAL_SEED_BIT"]

EVAL_SEED_BIT = 1 << 62  # validation generators live above every training seed (`FreshBatches`: < 2**62)


class AssociativeRecall:
    """Associative recall (vocabulary ``num_keys + num_values + 2``; 30 in the Hyena paper).

    Args:
        lengths: sequence length of each curriculum stage (each divisible by ``2 * cp``).
        length_steps: the step each stage starts at (increasing, the first 0).
        global_batch_size: sequences per optimizer step over all replicas (divisible by dp).
        eval_len: validation sequence length (default: the last of ``lengths``).
        eval_samples, eval_batch_size: validation sequences, and per forward pass (per replica).
        eval_seed: seed of the validation set (the same set for every ``train.seed``).
        extra_eval_lens: more validation lengths, each reported as ``val_acc_<len>`` and
            ``val_loss_<len>`` (e.g. how a model trained at 8k does at 32k).
        num_keys, num_values: the vocabulary's keys and values (14 and 14 in the paper).
        targets: training labels, "query" (the query position only, the metric's) or "values"
            (also every key whose value an earlier pair determines; `associative_recall`).
        groups, seed: passed by the loop.
    """

    unit = "tokens"

    def __init__(self, *, lengths: list[int], length_steps: list[int], global_batch_size: int,
                 eval_len: int | None = None, eval_samples: int = 256, eval_batch_size: int = 16, eval_seed: int = 0,
                 extra_eval_lens: list[int] = (), num_keys: int = 14, num_values: int = 14,
                 targets: Targets = "query", groups: ParallelGroups, seed: int):
        _check_schedule(list(lengths), list(length_steps))
        self.lengths, self.length_steps = list(lengths), list(length_steps)
        self.eval_lens = [self.lengths[-1] if eval_len is None else eval_len, *extra_eval_lens]
        cp = groups.dims.cp
        for name, length in [("lengths", n) for n in self.lengths] + [("eval_len / extra_eval_lens", n)
                                                                      for n in self.eval_lens]:
            if length < 4 or length % 2:
                raise ValueError(f"task.{name}={length} must be even and >= 4 (key-value pairs and a query); change it")
            check_divisible(length, "zigzag", cp, f"task.{name}", cp_name="parallel.cp")
        if targets not in RECALL_TARGETS:
            raise ValueError(f"task.targets={targets!r} must be one of {RECALL_TARGETS}")
        if eval_samples < 1 or eval_batch_size < 1:
            raise ValueError(f"task.eval_samples={eval_samples} and task.eval_batch_size={eval_batch_size} must be >= 1")
        self.groups, self.targets, self.vocab = groups, targets, (num_keys, num_values)
        self.eval_samples, self.eval_batch_size, self.eval_seed = eval_samples, eval_batch_size, eval_seed
        self.sampler = FreshBatches(global_batch_size=global_batch_size, seed=seed)
        dp_slice(torch.arange(global_batch_size), groups.dims.dp, 0)  # divisibility check before any step
        self._step_len = self.lengths[0]
        self._eval_sets: dict[int, tuple[Tensor, Tensor]] = {}

    def seq_len(self, step: int) -> int:
        """The curriculum's sequence length at (0-based) step ``step``."""
        return self.lengths[bisect.bisect_right(self.length_steps, step) - 1]

    @property
    def items_per_step(self) -> int:
        """Tokens of the latest step over all replicas (the length changes with the curriculum)."""
        return self.sampler.global_batch_size * self._step_len

    def _shard(self, inputs: Tensor, labels: Tensor) -> LMBatch:
        g = self.groups
        counted = int((labels != IGNORE_INDEX).sum())
        shard = [cp_shard_tokens(t, g.dims.cp, g.cp_rank).to(g.device) for t in (inputs, labels)]  # b, S/cp
        return LMBatch(shard[0], shard[1], None, counted)

    def batch(self, step: int) -> LMBatch:
        """This rank's `LMBatch` of step ``step``: the replica's slice of a fresh global batch,
        zigzag-sharded (every rank draws the same global batch from the step's generator)."""
        self._step_len = self.seq_len(step)
        inputs, labels = associative_recall(self.sampler.global_batch_size, self._step_len,
                                            generator=self.sampler.generator(step), num_keys=self.vocab[0],
                                            num_values=self.vocab[1], targets=self.targets)
        rows = dp_slice(torch.arange(len(inputs)), self.groups.dims.dp, self.groups.dp_rank)
        return self._shard(inputs[rows], labels[rows])

    def loss_share(self, model: nn.Module, batch: LMBatch) -> Tensor:
        return model(batch.input_ids, batch.labels).float().sum() / max(batch.counted, 1)

    def eval_set(self, seq_len: int) -> tuple[Tensor, Tensor]:
        """The GLOBAL validation set at ``seq_len``: ``eval_samples`` sequences, query labels only."""
        if seq_len not in self._eval_sets:
            gen = torch.Generator().manual_seed(EVAL_SEED_BIT | (self.eval_seed << 24) | seq_len)
            self._eval_sets[seq_len] = associative_recall(self.eval_samples, seq_len, generator=gen,
                                                          num_keys=self.vocab[0], num_values=self.vocab[1])
        return self._eval_sets[seq_len]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Query-position loss and accuracy at ``eval_len`` (``val_loss``, ``val_acc``) and at each
        of ``extra_eval_lens`` (suffixed ``_<len>``)."""
        out: dict[str, float] = {}
        for i, seq_len in enumerate(self.eval_lens):
            loss, acc = self._evaluate_at(model, seq_len)
            suffix = "" if i == 0 else f"_{seq_len}"
            out[f"val_loss{suffix}"], out[f"val_acc{suffix}"] = loss, acc
        return out

    def _evaluate_at(self, model: nn.Module, seq_len: int) -> tuple[float, float]:
        g = self.groups
        inputs, labels = self.eval_set(seq_len)
        rows = eval_range(self.eval_samples, g.dims.dp, g.dp_rank)
        sums = torch.zeros(3, dtype=torch.float64, device=g.device)  # loss sum, correct, labelled tokens
        for start in range(rows.start, rows.stop, self.eval_batch_size):
            stop = min(start + self.eval_batch_size, rows.stop)
            batch = self._shard(inputs[start:stop], labels[start:stop])
            logits = model(batch.input_ids)  # b, S/cp, vocab (the full vocabulary on every TP rank)
            keep = batch.labels != IGNORE_INDEX  # the query positions this rank holds
            picked, target = logits[keep].float(), batch.labels[keep]  # n, vocab; n
            loss = F.cross_entropy(picked, target, reduction="sum")
            correct = (picked.argmax(-1) == target).sum()
            sums += torch.stack([loss.double(), correct.double(), sums.new_tensor(len(target))])
        sums = group_sum(sums, g.grad_group)  # dp x cp ranks hold different queries (TP ranks the same)
        return float(sums[0] / sums[2]), float(sums[1] / sums[2])


def _check_schedule(lengths: list[int], length_steps: list[int]) -> None:
    if not lengths or len(lengths) != len(length_steps):
        raise ValueError(f"task.lengths={lengths} and task.length_steps={length_steps} must be non-empty and of equal "
                         f"length (one start step per curriculum stage)")
    if length_steps[0] != 0 or any(b <= a for a, b in zip(length_steps, length_steps[1:])):
        raise ValueError(f"task.length_steps={length_steps} must start at 0 and increase")
