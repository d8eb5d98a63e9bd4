"""Generate text with a trained byte-level LM (after ``launch/train.py`` with the same config).

    torchrun --standalone --nproc_per_node=2 launch/generate.py configs/lm_tiny.py generate.prompt="def " \
        generate.max_new_tokens=200

The command line is a config path and ``key=value`` overrides (`hyena_cp.train.generate.GenerateConfig`
for the ``generate.*`` keys; ``parallel.cp`` / ``parallel.tp`` choose the layout, whatever the
training run used; the world must be ``cp * tp``). ``generate.prompt`` is taken verbatim
(so ``"def "`` keeps its space). Rank 0 prints each sample.
"""
from __future__ import annotations

import os
from pathlib import Path

from hyena_cp.distributed import exit_process
from hyena_cp.host_memory import tune_host_memory
from hyena_cp.lazy import LazyConfig
from hyena_cp.train.cli import config_args, run_launcher
from hyena_cp.train.config import with_defaults
from hyena_cp.train.generate import generate_text, with_generate_defaults

USAGE = "usage: torchrun [torchrun options] launch/generate.py CONFIG.py [key=value ...]"
PROMPT = "generate.prompt="


def main(argv: list[str] | None = None) -> int:
    args = config_args(argv, USAGE)
    if args is None:
        return 2
    cfg = with_generate_defaults(with_defaults(LazyConfig.load(args[0])))
    # YAML would parse the prompt (and strip the space of "def "): it is set as given instead
    prompts = [a.removeprefix(PROMPT) for a in args[1:] if a.startswith(PROMPT)]
    LazyConfig.apply_overrides(cfg, [a for a in args[1:] if not a.startswith(PROMPT)])
    if prompts:
        cfg.generate.prompt = prompts[-1]
    texts = generate_text(cfg, name=Path(args[0]).stem)
    if int(os.environ.get("RANK", "0")) == 0:
        for i, text in enumerate(texts):
            print(f"--- sample {i} ---\n{text}" if len(texts) > 1 else text, flush=True)
    return 0


if __name__ == "__main__":
    tune_host_memory()  # before the first large CPU tensor: huge pages, freed memory kept (hyena_cp.host_memory)
    exit_process(run_launcher(main))
