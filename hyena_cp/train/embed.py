"""Embeddings of sequences of any length with a megatron-core LM under CP x TP (behind ``launch/embed.py``).

    torchrun --standalone --nproc_per_node=2 launch/embed.py converted/evo2/model.yaml \\
        embed.weights=converted/evo2 embed.sequences=seqs.fa embed.out=emb.safetensors parallel.cp=2

The config needs a ``model`` section (a converted or exported folder's ``model.yaml``, or a training
config); the weights are ``embed.weights`` (a folder holding ``model.safetensors``) or else the newest
checkpoint of the training run (``train.output_dir``). Each sequence runs alone (batch 1), padded to
what the CP group can shard and cut back (`hyena_cp.megatron.embeddings`: exact). Rank 0 writes
``embed.out``: one tensor per sequence and layer, ``"<name>/layer<i>"``, ``[L, h]`` per token or
``[h]`` pooled, in float32 (safetensors; written to a temporary name and renamed).

Sequences (``embed.sequences``): FASTA (``>name`` lines, the sequence on the lines after) or plain
text, one sequence per line (named ``seq<k>``). Tokens (``embed.alphabet``): ``"bytes"`` (UTF-8 bytes:
Evo 2's tokenizer) or ``"nucleotides"`` (HyenaDNA's: A, C, G, T, N are 7..11, any other character the
unknown token 6; lower case is read as upper case).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import Tensor

from hyena_cp.lazy import instantiate
from hyena_cp.distributed.mesh import destroy_parallel, init_parallel
from hyena_cp.train.build_model import build_model
from hyena_cp.train.checkpoint import load_model_state
from hyena_cp.train.config import ParallelConfig, fill_section_defaults
from hyena_cp.train.export import load_initial_weights
from hyena_cp.train.generate import latest_checkpoint, load_full_state
from hyena_cp.value_types import check_fields

__all__ = ["EmbedConfig", "ALPHABETS", "embed_sequences", "read_sequences", "tokenize", "with_embed_defaults"]

ALPHABETS = ("bytes", "nucleotides")
NUCLEOTIDES = {"A": 7, "C": 8, "G": 9, "T": 10, "N": 11}
UNKNOWN = 6


@dataclass(frozen=True)
class EmbedConfig:
    """``embed`` section (see the module docstring).

    sequences: the input file (FASTA or one sequence per line).
    out: the safetensors file to write.
    weights: a folder holding ``model.safetensors``; None: the newest checkpoint of the training run.
    layers: 0 (embedding), 1..num_layers (layer outputs), -1 (final norm).
    pooling: "none" (per token), "mean" (over the sequence's tokens) or "last" (the last token).
    alphabet: "bytes" or "nucleotides".
    """

    sequences: str = ""
    out: str = "embeddings.safetensors"
    weights: str | None = None
    layers: tuple[int, ...] = (-1,)
    pooling: str = "mean"
    alphabet: str = "bytes"

    def __post_init__(self) -> None:
        check_fields(self, "embed")
        if self.alphabet not in ALPHABETS:
            raise ValueError(f"embed.alphabet={self.alphabet!r} must be one of {ALPHABETS}")
        if not self.sequences:
            raise ValueError("embed.sequences is empty: name the file of sequences to embed (FASTA or one per line)")


def with_embed_defaults(cfg: DictConfig) -> DictConfig:
    """Fill the ``embed`` and ``parallel`` keys a config leaves out (in place)."""
    fill_section_defaults(cfg, "parallel", ParallelConfig)
    return fill_section_defaults(cfg, "embed", EmbedConfig)


def read_sequences(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``[(name, sequence)]`` of a FASTA or one-sequence-per-line file."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path} holds no sequence")
    if not lines[0].startswith(">"):
        return [(f"seq{k}", line) for k, line in enumerate(lines)]
    records: list[tuple[str, list[str]]] = []
    for line in lines:
        if line.startswith(">"):
            records.append((line[1:].split()[0] if line[1:].split() else f"seq{len(records)}", []))
        else:
            records[-1][1].append(line)
    return [(name, "".join(parts)) for name, parts in records]


def tokenize(sequence: str, alphabet: str) -> Tensor:
    """``[L]`` int64 token ids of ``sequence`` (see the module docstring)."""
    if alphabet == "bytes":
        return torch.tensor(list(sequence.encode("utf-8")), dtype=torch.long)
    if alphabet == "nucleotides":
        return torch.tensor([NUCLEOTIDES.get(c, UNKNOWN) for c in sequence.upper()], dtype=torch.long)
    raise ValueError(f"embed.alphabet={alphabet!r} must be one of {ALPHABETS}")


def _load_weights(model, cfg: DictConfig, settings: EmbedConfig, tp_group) -> None:
    if settings.weights:
        load_initial_weights(model, settings.weights, tp_group)
        return
    output_dir = cfg.get("train", {}).get("output_dir")
    if not output_dir:
        raise ValueError("set embed.weights (a folder holding model.safetensors) or train.output_dir (a training run)")
    load_full_state(model, load_model_state(latest_checkpoint(Path(output_dir) / "checkpoints")), tp_group)


def embed_sequences(cfg: DictConfig) -> dict[str, Tensor]:
    """The embeddings of ``embed.sequences`` (on every rank; rank 0 also writes ``embed.out``)."""
    from hyena_cp.megatron.embeddings import hidden_states  # megatron-core only when used

    settings = EmbedConfig(**instantiate(cfg.embed))
    parallel = ParallelConfig(**instantiate(cfg.parallel))
    records = [(name, tokenize(seq, settings.alphabet)) for name, seq in read_sequences(settings.sequences)]
    groups = init_parallel(parallel.cp, tp=parallel.tp, backend=parallel.backend, timeout_s=parallel.timeout_s,
                           megatron=True)
    try:
        if groups.dims.dp != 1:
            raise ValueError(f"embedding runs on cp x tp = {parallel.cp * parallel.tp} processes, got a world of "
                             f"{groups.dims.world}; launch that many or change parallel.cp / parallel.tp")
        torch.manual_seed(0)  # every weight is overwritten; a seed keeps the build deterministic
        model = build_model(cfg.model, groups, megatron=True)
        _load_weights(model, cfg, settings, groups.tp_group)
        out = {}
        for name, ids in records:
            states = hidden_states(model, ids[None].to(groups.device), list(settings.layers), settings.pooling)
            out.update({f"{name}/layer{i}": s[0].float().cpu().contiguous() for i, s in states.items()})
        if groups.rank == 0:
            target = Path(settings.out)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            save_file(out, os.fspath(tmp), metadata={"pooling": settings.pooling,
                                                     "layers": ",".join(map(str, settings.layers))})
            os.replace(tmp, target)
    except BaseException:
        destroy_parallel(groups, clean=False)
        raise
    destroy_parallel(groups)
    return out
