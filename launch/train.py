"""Train an experiment config with data x tensor x context parallelism.

    torchrun --standalone --nproc_per_node=2 launch/train.py configs/digits_hyena_tiny.py [key=value ...]

The command line is a config path and ``key=value`` overrides, nothing else (e.g.
``train.steps=50 parallel.cp=1 train.output_dir=/tmp/run``). The data-parallel size is
``world / (parallel.cp * parallel.tp)``; ``parallel.tp > 1`` needs a megatron-core model and
``parallel.megatron=true``; ``parallel.dp_mode`` ("fsdp", the default, or "ddp") decides whether
FSDP2 shards parameters, gradients and optimizer state over the dp x cp ranks or replicates them
(`hyena_cp.train.config.ParallelConfig`). Runs resume from the newest
checkpoint in ``train.output_dir`` by default (``train.resume=false`` to refuse that), so
``torchrun --max-restarts=N`` and re-running the same command both carry on.
"""
from __future__ import annotations

import os
from pathlib import Path

from hyena_cp.distributed import exit_process
from hyena_cp.host_memory import tune_host_memory
from hyena_cp.lazy import LazyConfig
from hyena_cp.train.cli import config_args, run_launcher
from hyena_cp.train.config import with_defaults
from hyena_cp.train.loop import train

USAGE = "usage: torchrun [torchrun options] launch/train.py CONFIG.py [key=value ...]"


def describe(final: dict[str, float]) -> str:
    """The line a user reads at the end: accuracy first when the task has one."""
    if "val_acc" in final:
        return f"final validation accuracy: {100 * final['val_acc']:.2f}% (val_loss {final['val_loss']:.4f})"
    return "final validation: " + ", ".join(f"{k}={v:.4f}" for k, v in final.items())


def main(argv: list[str] | None = None) -> int:
    args = config_args(argv, USAGE)
    if args is None:
        return 2
    cfg = LazyConfig.apply_overrides(with_defaults(LazyConfig.load(args[0])), args[1:])
    summary = train(cfg, name=Path(args[0]).stem)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{describe(summary['final'])} after {summary['step']} steps "
              f"({summary['time_s']:.0f} s in this attempt); outputs in {summary['output_dir']}/", flush=True)
    return 0


if __name__ == "__main__":
    tune_host_memory()  # before the first large CPU tensor: huge pages, freed memory kept (hyena_cp.host_memory)
    exit_process(run_launcher(main))
