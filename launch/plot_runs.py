"""Validation accuracy of several runs on one plot (e.g. a model and its baseline):

    python launch/plot_runs.py OUT.png outputs/recall_ar_2k=Hyena outputs/recall_ar_2k_attention=attention

Each argument after the output file is a run's output folder, optionally ``=label``; every
``val_acc*`` key a run logs (``val_acc`` at the run's ``task.eval_len`` when it has one,
``val_acc_256``, ...) becomes one line; a dotted line marks each step where a run's curriculum
moves to a longer sequence (``task.length_steps``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
from omegaconf import OmegaConf

from hyena_cp.train.metrics import MetricsLog

USAGE = "usage: python launch/plot_runs.py OUT.png RUN_DIR[=LABEL] [RUN_DIR[=LABEL] ...]"


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].endswith(".png"):
        print(USAGE, file=sys.stderr)
        return 2
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for spec in argv[1:]:
        folder, _, label = spec.partition("=")
        records = [r for r in MetricsLog.read(Path(folder) / "metrics.jsonl") if "event" not in r]
        task = OmegaConf.load(Path(folder) / "config.yaml").task
        eval_len = task.get("eval_len")
        for step in list(task.get("length_steps") or [])[1:]:
            ax.axvline(step, color="0.6", ls=":", lw=1)
        for key in sorted({k for r in records for k in r if k.startswith("val_acc")}):
            points = [(r["step"], 100 * r[key]) for r in records if key in r]
            length = key.removeprefix("val_acc").lstrip("_") or eval_len
            name = label or Path(folder).name
            ax.plot(*zip(*points), "o-", ms=3, label=f"{name} ({length} tokens)" if length else name)
    ax.set(xlabel="step", ylabel="validation accuracy (%)", ylim=(0, 101))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: lines span the whole height
    fig.tight_layout()
    fig.savefig(argv[0], dpi=110)
    print(f"wrote {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
