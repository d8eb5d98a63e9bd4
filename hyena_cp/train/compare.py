"""Compare the training curves of two runs (``metrics.jsonl``, `hyena_cp.train.metrics`): the
check that a run under another parallel layout (e.g. ``parallel.cp=2``) trained like one
process. Records are matched by step: the logged loss (a mean over the steps since the
previous record), the gradient norm and every validation metric."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hyena_cp.train.metrics import MetricsLog

__all__ = ["CurveDiff", "compare_runs"]

COMPARED = ("loss", "grad_norm")


@dataclass(frozen=True)
class CurveDiff:
    """Largest relative difference of each compared key over the common steps."""

    steps: int  # steps with a training record in both runs
    max_rel: dict[str, float]  # key -> max |a - b| / |b|
    worst_step: dict[str, int]  # key -> the step where it occurs

    def within(self, rtol: float) -> bool:
        return all(v <= rtol for v in self.max_rel.values())


def _records(run: str | os.PathLike[str]) -> dict[int, dict[str, float]]:
    """step -> the numbers logged for it (training and evaluation records merged)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a run's output folder (train.output_dir)")
    by_step: dict[int, dict[str, float]] = {}
    for record in MetricsLog.read(path):
        if "event" not in record:
            by_step.setdefault(record["step"], {}).update(
                {k: v for k, v in record.items() if k in COMPARED or k.startswith("val_")})
    return by_step


def compare_runs(run: str | os.PathLike[str], reference: str | os.PathLike[str]) -> CurveDiff:
    """`CurveDiff` of ``run`` against ``reference`` (relative to the reference's values)."""
    a, b = _records(run), _records(reference)
    common = sorted(a.keys() & b.keys())
    if not common:
        raise ValueError(f"{run} and {reference} log no common step; compare runs of the same config")
    max_rel: dict[str, float] = {}
    worst: dict[str, int] = {}
    for step in common:
        for key in a[step].keys() & b[step].keys():
            rel = abs(a[step][key] - b[step][key]) / max(abs(b[step][key]), 1e-12)
            if rel >= max_rel.get(key, -1.0):
                max_rel[key], worst[key] = rel, step
    steps = sum(1 for s in common if "loss" in a[s] and "loss" in b[s])
    return CurveDiff(steps, max_rel, worst)
