"""Dense tasks on N-D grids for the training loop (the `hyena_cp.train.tasks.Task` protocol).

`SpatialRecallTask` trains a dense network (`hyena_cp.models.CCNN`) to copy a digit into a fixed
corner (`hyena_cp.data.spatial_recall`). As in `ImageClassification`, every CP rank of a
replica gets the same FULL batch ``[B, *S, C_in]``; the network keeps its own block of the first
axis and returns that block of the output, and `CCNN.local_part` cuts the same block of the
target. The loss is the MSE over every output value: each rank's share is its block's sum of
squared errors divided by the values of the replica's whole batch, so the CP shares add up to
the replica's loss (the loop's invariant).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hyena_cp.data.sampling import GlobalBatchSampler, dp_slice, eval_range
from hyena_cp.data.spatial_recall import SpatialRecallData
from hyena_cp.distributed.mesh import ParallelGroups
from hyena_cp.parallel.reductions import group_sum

__all__ = ["SpatialRecallTask"]


class SpatialRecallTask:
    """Regress the target grid; evaluate the copy.

    Validation metrics (over the whole validation split, the same on every rank):

    - ``val_loss``: the training objective, MSE over every output value;
    - ``val_readout_mse``: MSE over the readout box only (the copied glyph; the rest of the
      target is zeros, which is easy, so this is the number that says whether it recalls);
    - ``val_recall_acc``: the fraction of samples whose output in the readout box is nearest (L2)
      to the class template (mean training glyph) of the digit that was to be copied. A perfect
      copy scores `SpatialRecallData.template_accuracy`, about 0.92, not 1.

    Args:
        data: the GLOBAL samples (every rank renders what it needs).
        global_batch_size: samples per optimizer step over all replicas (divisible by dp).
        eval_batch_size: samples per forward pass during evaluation (per replica).
        groups, seed: passed by the loop.
    """

    unit = "samples"

    def __init__(self, *, data: SpatialRecallData, global_batch_size: int, eval_batch_size: int = 64,
                 groups: ParallelGroups, seed: int):
        self.data, self.groups, self.eval_batch_size = data, groups, eval_batch_size
        self.sampler = GlobalBatchSampler(num_samples=len(data.train), global_batch_size=global_batch_size, seed=seed)
        dp_slice(torch.arange(global_batch_size), groups.dims.dp, 0)  # divisibility check before any step
        self.items_per_step = global_batch_size
        self._readout = data.readout_mask()  # *S
        self._templates = data.template_canvases()  # 10, *S

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """``(inputs [B_dp, *S, C_in], targets [B_dp, *S, C_out])``: this replica's slice, full grids."""
        idx = dp_slice(self.sampler.indices(step), self.groups.dims.dp, self.groups.dp_rank)
        inputs, targets = self.data.render("train", idx)
        return inputs.to(self.groups.device), targets.to(self.groups.device)

    def loss_share(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        out = model(inputs, cp_group=self.groups.cp_group)  # B, S0/P, *S_rest, C_out
        local = model.local_part(targets, self.groups.cp_group)
        return (out.float() - local.float()).square().sum() / targets.numel()

    def _partial_sums(self, model: nn.Module, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Per sample of ``val[start:stop]``, this rank's block's part of: the squared error, the
        readout squared error and the squared distances to the 10 templates (``[n, 12]`` float64);
        and the samples' digit classes."""
        g = self.groups
        idx = torch.arange(start, stop)
        inputs, targets = self.data.render("val", idx)
        out = model(inputs.to(g.device), cp_group=g.cp_group).double()[..., 0]  # n, *S_local
        local = model.local_part(targets.to(g.device), g.cp_group).double()[..., 0]
        readout = model.local_part(self._readout[None].to(g.device), g.cp_group)[0]  # *S_local
        templates = model.local_part(self._templates.to(g.device), g.cp_group).double()  # 10, *S_local
        err = (out - local).square()
        copied, shown = out[:, readout], templates[:, readout]  # n, k and 10, k (k: this rank's readout values)
        dist = (copied[:, None] - shown[None]).square().sum(-1)  # n, 10
        sums = torch.cat([err.flatten(1).sum(1, keepdim=True), err[:, readout].sum(1, keepdim=True), dist], dim=1)
        return sums, self.data.labels("val", idx).to(g.device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        g = self.groups
        rows = eval_range(len(self.data.val), g.dims.dp, g.dp_rank)
        totals = torch.zeros(4, dtype=torch.float64, device=g.device)  # squared error, readout error, correct, count
        for start in range(rows.start, rows.stop, self.eval_batch_size):
            stop = min(start + self.eval_batch_size, rows.stop)
            sums, labels = self._partial_sums(model, start, stop)
            sums = group_sum(sums, g.cp_group)  # each CP rank held one block of every sample
            correct = (sums[:, 2:].argmin(1) == labels).sum()
            totals += torch.stack([sums[:, 0].sum(), sums[:, 1].sum(), correct.double(), totals.new_tensor(stop - start)])
        totals = group_sum(totals, g.dp_group)  # CP ranks now hold identical numbers: sum over replicas only
        count = totals[3]
        values = math.prod(self.data.size) * self.data.out_channels
        return {"val_loss": float(totals[0] / (count * values)),
                "val_readout_mse": float(totals[1] / (count * int(self._readout.sum()))),
                "val_recall_acc": float(totals[2] / count)}
