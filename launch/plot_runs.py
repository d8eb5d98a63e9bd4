"""Learning curves of several training runs in one PNG, from their ``metrics.jsonl`` (written by
``launch/train.py`` in ``train.output_dir``):

    python launch/plot_runs.py docs/recall2d_curves.png "Hyena=outputs/recall2d_hyena_fixed" \
        "attention=outputs/recall2d_attention_fixed" --metrics loss val_readout_mse val_recall_acc

One panel per metric against the step (training ``loss`` records are means since the previous
record); a metric a run did not log is left out of its panel. Losses and MSEs on a log scale.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

from hyena_cp.train.metrics import MetricsLog

LOG_SCALE = ("loss", "mse")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("runs", nargs="+", help="LABEL=DIR: a run's output folder (holding metrics.jsonl)")
    parser.add_argument("--metrics", nargs="+", default=["loss", "val_loss"], help="keys of the metrics records")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    for run in args.runs:
        label, _, folder = run.partition("=")
        if not label or not (Path(folder) / "metrics.jsonl").is_file():
            parser.error(f"{run!r} must be LABEL=DIR with DIR/metrics.jsonl")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.metrics), figsize=(4.5 * len(args.metrics), 3.6), squeeze=False)
    for run in args.runs:
        label, _, folder = run.partition("=")
        records = MetricsLog.read(Path(folder) / "metrics.jsonl")
        for ax, key in zip(axes[0], args.metrics):
            points = [(r["step"], r[key]) for r in records if key in r and "event" not in r]
            if points:
                ax.plot(*zip(*points), "-" if key == "loss" else "o-", ms=3, lw=1, label=label)
    for ax, key in zip(axes[0], args.metrics):
        ax.set(xlabel="step", title=key, yscale="log" if any(s in key for s in LOG_SCALE) else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
