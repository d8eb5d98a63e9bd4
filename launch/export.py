"""Export a trained model to safetensors for sharing (after ``launch/train.py`` with the same config).

    python launch/export.py configs/digits_hyena_tiny.py [export.out=DIR] [export.checkpoint=DIR]

The command line is a config path and ``key=value`` overrides (`hyena_cp.train.export.ExportConfig`
for the ``export.*`` keys; ``train.output_dir`` names the run). One process, no torchrun: the
checkpoint holds full tensors whatever the layout it was trained at. Writes ``model.safetensors``
and ``model.yaml``; `hyena_cp.train.export.load_exported` builds the model from them.
"""
from __future__ import annotations

from pathlib import Path

from hyena_cp.distributed import exit_process
from hyena_cp.host_memory import tune_host_memory
from hyena_cp.lazy import LazyConfig
from hyena_cp.train.cli import config_args, run_launcher
from hyena_cp.train.config import with_defaults
from hyena_cp.train.export import export_model, with_export_defaults

USAGE = "usage: python launch/export.py CONFIG.py [key=value ...]"


def main(argv: list[str] | None = None) -> int:
    args = config_args(argv, USAGE)
    if args is None:
        return 2
    cfg = LazyConfig.apply_overrides(with_export_defaults(with_defaults(LazyConfig.load(args[0]))), args[1:])
    out = export_model(cfg, name=Path(args[0]).stem)
    print(f"wrote {out / 'model.safetensors'} and {out / 'model.yaml'}", flush=True)
    return 0


if __name__ == "__main__":
    tune_host_memory()  # before the first large CPU tensor: huge pages, freed memory kept (hyena_cp.host_memory)
    exit_process(run_launcher(main))
