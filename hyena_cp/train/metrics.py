"""Training metrics on rank 0: a JSONL log, a tqdm progress bar and a PNG of the curves.

``metrics.jsonl`` holds one JSON object per line: training records
``{"step", "loss" (mean since the previous record), "lr", "grad_norm", "<unit>_per_s", "time_s"}``, evaluation records
``{"step", "val_loss", "val_acc"?}`` and events ``{"event": "resume", "step", "attempt"}``,
``{"event": "memory", "step", "per_rank": {...}, "replicated": {...}}`` (parameter, gradient and
optimizer bytes of the fullest rank and of the replicated layout, `hyena_cp.distributed.state_bytes`)
and ``{"event": "nonfinite", "step", "loss", "grad_norm", "action": "skipped", "in_a_row"}`` (a
step skipped under ``train.nonfinite=skip``; its loss is not in the training records).
A resumed run first drops the records of steps after its checkpoint (a crashed attempt
may have logged them), so the file always describes one consistent run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import matplotlib
from tqdm import tqdm

from hyena_cp.bench.common import fmt_bytes

__all__ = ["MetricsLog", "memory_line", "plot_curves", "progress_bar"]


class MetricsLog:
    """Append-only JSONL metrics file (written by the caller on rank 0 only)."""

    def __init__(self, path: str | os.PathLike[str], resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.read(self.path) if line.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    @staticmethod
    def read(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def memory_line(memory: dict[str, dict[str, int]], layout: str) -> str:
    """The log line of a memory record: per-rank bytes next to the replicated layout's."""
    mine, full = memory["per_rank"], memory["replicated"]
    parts = ", ".join(f"{key} {fmt_bytes(mine[key])}" for key in ("params", "grads", "optimizer"))
    ratio = mine["total"] / full["total"] if full["total"] else 1.0
    return (f"memory per rank ({layout}): {parts}; total {fmt_bytes(mine['total'])} = {ratio:.3f} x the replicated "
            f"{fmt_bytes(full['total'])}")


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """Steps bar (tqdm computes the ETA); disabled on ranks other than 0."""
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=1.0)


def plot_curves(records: list[dict[str, Any]], path: str | os.PathLike[str], title: str) -> None:
    """Loss (train and validation) and, if logged, validation accuracy against the step."""
    matplotlib.use("Agg")  # no display on clusters or CI
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    acc = [r for r in val if "val_acc" in r]
    fig, axes = plt.subplots(1, 2 if acc else 1, figsize=(10 if acc else 5.5, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", ms=3)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=f"{title}: loss")
    ax.legend()
    if acc:
        ax = axes[0, 1]
        ax.plot([r["step"] for r in acc], [100 * r["val_acc"] for r in acc], "o-", ms=3)
        low = min(100 * r["val_acc"] for r in acc)
        ax.set(xlabel="step", ylabel="validation accuracy (%)", title=f"{title}: accuracy (final "
               f"{100 * acc[-1]['val_acc']:.1f}%)", ylim=(max(0.0, low - 5), 100.5))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
