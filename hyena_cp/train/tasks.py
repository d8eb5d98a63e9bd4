"""What the training loop trains on: batches for a step, this rank's loss share, evaluation.

Both tasks follow the gradient invariant (docs/design.md): each rank's loss is its SHARE, the
shares of the CP ranks of one data-parallel replica add up to that replica's loss, and the loop
then sums gradients over CP and averages them over DP (FSDP2, `hyena_cp.distributed.fsdp`).

- `ImageClassification` (ViT-5 models): every CP rank of a replica gets the same FULL image
  batch ``[B, C, H, W]``; the model shards rows itself and returns logits ``[B, classes]``
  replicated on every CP rank, so the share is ``cross_entropy / cp``.
- `LanguageModeling` (megatron-core Hyena LM): every CP rank gets its zigzag shard
  ``[b, S / cp]`` of the same sequences; the model returns per-token losses of that shard,
  so the share is ``sum / (counted tokens of the replica's batch)`` (labels other than
  ``IGNORE_INDEX``, counted on the full sequences every rank holds: no collective). With
  ``pack=True`` the sequences carry their documents' GLOBAL boundaries (``cu_seqlens``).

Under tensor parallelism the tasks see only the (dp, cp) coordinates (`ParallelGroups.dp_rank`,
``cp_rank``): every TP rank of a (dp, cp) position gets the identical batch, and the model
returns the same loss on each (a TP model gathers or reduces its outputs over TP itself), so
the shares and metric sums run over dp x cp only (``grad_group`` / ``dp_group``), never TP.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyena_cp.data.digits import ImageSplits
from hyena_cp.data.sampling import GlobalBatchSampler, cp_shard_tokens, dp_slice, eval_range
from hyena_cp.data.stdlib_text import IGNORE_INDEX, TokenSplits
from hyena_cp.ops.packing import concat_cu_seqlens
from hyena_cp.distributed.mesh import ParallelGroups
from hyena_cp.parallel.reductions import group_sum

__all__ = ["ImageClassification", "LanguageModeling", "Task"]


class Task(Protocol):
    """What the loop needs from a task (built by ``instantiate(cfg.task, groups=..., seed=...)``)."""

    unit: str  # what throughput counts: "images" or "tokens"
    items_per_step: int  # units per optimizer step, over all replicas
    sampler: GlobalBatchSampler  # the data position is its step

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """This rank's inputs and targets for global step ``step``."""

    def loss_share(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        """This rank's share of its replica's loss (the CP shares add up to it)."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics over all replicas (collective; the same on every rank)."""


class ImageClassification:
    """Image classification on `ImageSplits` (e.g. `hyena_cp.data.load_digits_splits`).

    Args:
        data: GLOBAL train/validation tensors (every rank holds all of them).
        global_batch_size: images per optimizer step over all replicas (divisible by dp).
        eval_batch_size: images per forward pass during evaluation (per replica).
        groups: this rank's parallel groups (passed by the loop, not the config).
        seed: data-order seed (passed by the loop from ``train.seed``).
    """

    unit = "images"

    def __init__(self, *, data: ImageSplits, global_batch_size: int, eval_batch_size: int = 256,
                 groups: ParallelGroups, seed: int):
        self.data, self.groups, self.eval_batch_size = data, groups, eval_batch_size
        self.sampler = GlobalBatchSampler(num_samples=len(data.train_labels), global_batch_size=global_batch_size,
                                          seed=seed)
        dp_slice(torch.arange(global_batch_size), groups.dims.dp, 0)  # divisibility check before any step
        self.items_per_step = global_batch_size

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """``(images [B_dp, C, H, W], labels [B_dp])``: this replica's slice, full images."""
        idx = dp_slice(self.sampler.indices(step), self.groups.dims.dp, self.groups.dp_rank)
        device = self.groups.device
        return self.data.train_images[idx].to(device), self.data.train_labels[idx].to(device)

    def loss_share(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        images, labels = batch
        logits = model(images, cp_group=self.groups.cp_group)  # B_dp, classes (replicated over CP)
        return F.cross_entropy(logits, labels) / self.groups.dims.cp

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean loss and accuracy over the whole validation split (shared out over replicas)."""
        g = self.groups
        rows = eval_range(len(self.data.val_labels), g.dims.dp, g.dp_rank)
        sums = torch.zeros(3, dtype=torch.float64, device=g.device)  # loss sum, correct, count
        for start in range(rows.start, rows.stop, self.eval_batch_size):
            stop = min(start + self.eval_batch_size, rows.stop)
            images = self.data.val_images[start:stop].to(g.device)
            labels = self.data.val_labels[start:stop].to(g.device)
            logits = model(images, cp_group=g.cp_group)
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            correct = (logits.argmax(-1) == labels).sum()
            sums += torch.stack([loss.double(), correct.double(), sums.new_tensor(stop - start)])
        sums = group_sum(sums, g.dp_group)  # CP (and TP) ranks hold identical numbers: sum over replicas only
        return {"val_loss": float(sums[0] / sums[2]), "val_acc": float(sums[1] / sums[2])}


class LMBatch(NamedTuple):
    """This rank's share of a language-modelling step."""

    input_ids: Tensor  # b, S/cp: this rank's zigzag shard
    labels: Tensor  # b, S/cp: same layout, IGNORE_INDEX where a target has no loss
    cu_seqlens: Tensor | None  # GLOBAL document boundaries over the b rows (pack=True), else None
    counted: int  # labels with a loss in the replica's FULL batch (all CP shards together)


class LanguageModeling:
    """Next-token prediction on `TokenSplits` (e.g. `hyena_cp.data.load_stdlib_text`).

    The model is called as ``per_token_loss = model(input_ids, labels)`` with both
    ``[b, S / cp]`` (this rank's zigzag shard), plus ``cu_seqlens=`` (GLOBAL boundaries over
    the b rows laid end to end, identical on every rank) when packing; it is built on the run
    mesh's TP and CP groups (``parallel.megatron=true``: `hyena_cp.train.build_model`).

    Args:
        data: GLOBAL byte streams, windows of any ``data.seq_len``: under CP each window is padded at
            its END to a multiple of ``2 * cp`` (inputs 0, labels ``IGNORE_INDEX``), as
            `hyena_cp.megatron.embeddings` pads a sequence. The model is causal, so no real token
            reads the padding, and the padding has no loss: the run equals one process on the
            unpadded windows (a model whose halos need longer zigzag chunks says so).
        global_batch_size: sequences per optimizer step over all replicas (divisible by dp).
        eval_batch_size: sequences per forward pass during evaluation (per replica).
        eval_samples: validation sequences evaluated (None: all of them).
        pack: sequences as packed documents (`TokenSplits.packed_samples`): the model keeps
            documents apart and targets crossing into the next document are not counted.
        groups, seed: passed by the loop.
    """

    unit = "tokens"

    def __init__(self, *, data: TokenSplits, global_batch_size: int, eval_batch_size: int = 16,
                 eval_samples: int | None = 64, pack: bool = False, groups: ParallelGroups, seed: int):
        parts = 2 * groups.dims.cp
        self.shard_len = -(-data.seq_len // parts) * parts  # what the zigzag layout shards
        self.data, self.groups, self.eval_batch_size, self.pack = data, groups, eval_batch_size, pack
        self.sampler = GlobalBatchSampler(num_samples=data.num_samples("train"), global_batch_size=global_batch_size,
                                          seed=seed)
        dp_slice(torch.arange(global_batch_size), groups.dims.dp, 0)
        available = data.num_samples("val")
        self.eval_samples = available if eval_samples is None else min(eval_samples, available)
        self.items_per_step = global_batch_size * data.seq_len

    def _local(self, split: str, indices: Tensor) -> LMBatch:
        g, cu_seqlens = self.groups, None
        if self.pack:
            inputs, labels, rows = self.data.packed_samples(split, indices)  # b, S (full sequences)
            cu_seqlens = concat_cu_seqlens(rows, self.shard_len).to(g.device)  # the last document takes the padding
        else:
            inputs, labels = self.data.samples(split, indices)  # b, S (full sequences)
        pad = self.shard_len - self.data.seq_len
        inputs, labels = F.pad(inputs, (0, pad)), F.pad(labels, (0, pad), value=IGNORE_INDEX)  # b, S padded
        counted = int((labels != IGNORE_INDEX).sum())
        shard = [cp_shard_tokens(t, g.dims.cp, g.cp_rank).to(g.device) for t in (inputs, labels)]  # b, S/cp
        return LMBatch(shard[0], shard[1], cu_seqlens, counted)

    def batch(self, step: int) -> LMBatch:
        """This rank's `LMBatch`: ``input_ids``, ``labels`` ``[b_dp, S_padded / cp]`` int64 zigzag shards."""
        return self._local("train", dp_slice(self.sampler.indices(step), self.groups.dims.dp, self.groups.dp_rank))

    @staticmethod
    def _per_token_loss(model: nn.Module, batch: LMBatch) -> Tensor:
        if batch.cu_seqlens is None:
            return model(batch.input_ids, batch.labels)  # b, S/cp
        return model(batch.input_ids, batch.labels, cu_seqlens=batch.cu_seqlens)

    def loss_share(self, model: nn.Module, batch: LMBatch) -> Tensor:
        # Normalised by the tokens that have a loss (IGNORE_INDEX labels get 0 and do not count).
        return self._per_token_loss(model, batch).float().sum() / max(batch.counted, 1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean loss per byte over the first ``eval_samples`` validation sequences, and bits per byte."""
        g = self.groups
        rows = eval_range(self.eval_samples, g.dims.dp, g.dp_rank)
        sums = torch.zeros(2, dtype=torch.float64, device=g.device)  # loss sum, tokens
        for start in range(rows.start, rows.stop, self.eval_batch_size):
            indices = torch.arange(start, min(start + self.eval_batch_size, rows.stop))
            batch = self._local("val", indices)
            counted = (batch.labels != IGNORE_INDEX).sum()  # this rank's shard: summed over dp x cp below
            sums += torch.stack([self._per_token_loss(model, batch).double().sum(), counted.to(sums)])
        # the dp x cp ranks of one TP rank hold different tokens (the TP ranks the same ones)
        sums = group_sum(sums, g.grad_group)
        loss = float(sums[0] / sums[1])
        return {"val_loss": loss, "val_bpb": loss / math.log(2)}
