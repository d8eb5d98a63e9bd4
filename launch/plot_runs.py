"""Learning curves of several training runs in one PNG, from their ``metrics.jsonl`` (written by
``launch/train.py`` in ``train.output_dir``):

    python launch/plot_runs.py OUT.png outputs/recall_ar_2k=Hyena outputs/recall_ar_2k_attention=attention
    python launch/plot_runs.py OUT.png outputs/recall2d_hyena_fixed=Hyena --metrics loss val_readout_mse

Each argument after the output file is a run's output folder, optionally ``=label``.

Without ``--metrics``: one panel of validation accuracy, where every ``val_acc*`` key a run logs
(``val_acc`` at the run's ``task.eval_len``, ``val_acc_256``, ...) is one line, and a dotted line
marks each step where a run's curriculum moves to a longer sequence (``task.length_steps``).
With ``--metrics KEY ...``: one panel per key against the step (training ``loss`` records are means
since the previous record; a key a run did not log is left out of its panel); losses and MSEs on a
log scale.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
from omegaconf import OmegaConf

from hyena_cp.train.metrics import MetricsLog

LOG_SCALE = ("loss", "mse")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("runs", nargs="+", help="DIR[=LABEL]: a run's output folder (holding metrics.jsonl)")
    parser.add_argument("--metrics", nargs="+", help="keys of the metrics records, one panel each "
                        "(default: one panel of every val_acc* key)")
    args = parser.parse_args(argv)
    if not args.out.endswith(".png"):
        parser.error(f"the output {args.out!r} must be a .png file")
    for run in args.runs:
        if not (Path(run.partition("=")[0]) / "metrics.jsonl").is_file():
            parser.error(f"{run!r} must be DIR[=LABEL] with DIR/metrics.jsonl")
    return args


def _records(folder: str) -> list[dict]:
    return [r for r in MetricsLog.read(Path(folder) / "metrics.jsonl") if "event" not in r]


def _accuracy_panel(ax, runs: list[str]) -> None:
    for spec in runs:
        folder, _, label = spec.partition("=")
        records = _records(folder)
        config = Path(folder) / "config.yaml"
        task = OmegaConf.load(config).get("task", {}) if config.is_file() else {}
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


def _metric_panels(axes, runs: list[str], metrics: list[str]) -> None:
    for spec in runs:
        folder, _, label = spec.partition("=")
        records = _records(folder)
        for ax, key in zip(axes, metrics):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), "-" if key == "loss" else "o-", ms=3, lw=1, label=label or Path(folder).name)
    for ax, key in zip(axes, metrics):
        ax.set(xlabel="step", title=key, yscale="log" if any(s in key for s in LOG_SCALE) else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse's usage error
        return int(exit_.code or 0)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if args.metrics:
        fig, axes = plt.subplots(1, len(args.metrics), figsize=(4.5 * len(args.metrics), 3.6), squeeze=False)
        _metric_panels(axes[0], args.runs, args.metrics)
    else:
        fig, ax = plt.subplots(figsize=(9, 4))
        _accuracy_panel(ax, args.runs)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
