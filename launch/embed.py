"""Per-layer embeddings of sequences of any length, prefilled under context parallelism.

    torchrun --standalone --nproc_per_node=2 launch/embed.py converted/evo2/model.yaml \
        embed.weights=converted/evo2 embed.sequences=seqs.fa embed.out=emb.safetensors parallel.cp=2 \
        [embed.layers=[0,-1]] [embed.pooling=none|mean|last] [embed.alphabet=bytes|nucleotides]

The command line is a config path (a ``model.yaml`` from launch/convert.py or launch/export.py, or a
training config) and ``key=value`` overrides (`hyena_cp.train.embed.EmbedConfig` for ``embed.*``;
``parallel.cp`` / ``parallel.tp`` choose the layout, the world must be ``cp * tp``). Every length
works: a sequence is padded at its end to what the CP group can shard and the padding is dropped
(exact: the models are causal). Rank 0 writes the safetensors file.
"""
from __future__ import annotations

import os

from hyena_cp.distributed import exit_process
from hyena_cp.host_memory import tune_host_memory
from hyena_cp.lazy import LazyConfig
from hyena_cp.train.cli import config_args, run_launcher
from hyena_cp.train.embed import embed_sequences, with_embed_defaults

USAGE = "usage: torchrun [torchrun options] launch/embed.py CONFIG [key=value ...]"


def main(argv: list[str] | None = None) -> int:
    args = config_args(argv, USAGE)
    if args is None:
        return 2
    cfg = LazyConfig.apply_overrides(with_embed_defaults(LazyConfig.load(args[0])), args[1:])
    out = embed_sequences(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {len(out)} tensors to {cfg.embed.out}", flush=True)
    return 0


if __name__ == "__main__":
    tune_host_memory()  # before the first large CPU tensor: huge pages, freed memory kept (hyena_cp.host_memory)
    exit_process(run_launcher(main))
