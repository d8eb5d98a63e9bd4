"""The non-finite guard: a nan or inf loss, gradient norm or evaluation never passes unnoticed.

Each training step, after backward and before the optimizer step, every rank checks its loss
(summed over its data-parallel group) and the global gradient norm, and the job agrees on one
verdict (`hyena_cp.distributed.decisions.any_rank`, one tiny all-reduce over all ranks): a nan on
one rank stops, or skips, the step on every rank, so no rank is left waiting in the next
collective. What a non-finite step does is ``train.nonfinite`` (`hyena_cp.train.config.TrainConfig`):

- "stop": `NonFiniteError` naming the step, raised on every rank before the optimizer step,
  so the parameters and optimizer state stay those of the last finite step.
- "skip": no optimizer step (the batch is consumed and the schedule moves on, as megatron
  does for an overflowing fp16 step); more than ``train.nonfinite_max_skips`` in a row stop
  the run as "stop" does.

Evaluation results that are not finite also raise `NonFiniteError` (never reported as a
result), and `hyena_cp.train.checkpoint.Checkpointer.save` refuses state that is not finite,
so no checkpoint of a diverged model is ever written and rotation never deletes the newest
finite one.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from hyena_cp.distributed.decisions import any_rank
from hyena_cp.distributed.mesh import ParallelGroups

__all__ = ["NonFiniteError", "NonFiniteGuard"]


class NonFiniteError(RuntimeError):
    """A loss, gradient norm, evaluation or checkpoint that is not finite (raised on every rank)."""


ADVICE = "lower optimizer.lr or raise train.warmup_steps, or check the data"


@dataclass
class NonFiniteGuard:
    """The verdict on each step (collective: every rank calls `step_is_finite` at every step)."""

    policy: str
    max_skips: int
    groups: ParallelGroups
    skipped_in_a_row: int = 0

    def step_is_finite(self, step: int, loss: float, grad_norm: float) -> bool:
        """True: take the optimizer step; False: skip it ("skip"); raises `NonFiniteError`
        ("stop", or one skip too many). ``step`` is 1-based (the step being taken)."""
        here = math.isfinite(loss) and math.isfinite(grad_norm)
        if not any_rank(not here, self.groups):
            self.skipped_in_a_row = 0
            return True
        seen = (f"step {step}: the loss is {loss} and the gradient norm {grad_norm}" if not here else
                f"step {step}: the loss or the gradient norm is not finite on another rank (here: loss {loss}, "
                f"gradient norm {grad_norm})")
        if self.policy == "stop":
            raise NonFiniteError(f"{seen}; stopped before the optimizer step, "
                                 f"so the parameters and the checkpoints stay finite; {ADVICE}, or set "
                                 "train.nonfinite=skip to skip such steps")
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row > self.max_skips:
            raise NonFiniteError(f"{seen}: {self.skipped_in_a_row} non-finite steps in a row, more than "
                                 f"train.nonfinite_max_skips={self.max_skips}; stopped before the optimizer step, "
                                 f"so the parameters and the checkpoints stay finite; {ADVICE}")
        return False

    def check_evaluation(self, step: int, evals: Mapping[str, float]) -> None:
        """Raise `NonFiniteError` on every rank if any evaluation result is not finite."""
        if any_rank(not all(math.isfinite(v) for v in evals.values()), self.groups):
            shown = ", ".join(f"{k}={v}" for k, v in evals.items())
            raise NonFiniteError(f"evaluation after step {step} is not finite ({shown}): the model has diverged; "
                                 f"{ADVICE}")
