"""Text generation from a trained byte-level LM checkpoint (behind ``launch/generate.py``).

    torchrun --standalone --nproc_per_node=2 launch/generate.py configs/lm_tiny.py generate.prompt="def "

The experiment config that trained the model supplies ``model`` and ``parallel``; the
``generate`` section (`GenerateConfig`) adds the prompt and the sampling settings. The
newest verified checkpoint under ``<train.output_dir>/checkpoints`` is loaded (or
``generate.checkpoint``). Checkpoints store every tensor as its FULL (single-process)
tensor, so a model trained at any CP/TP size runs at the size of this launch: each rank
reads the full tensors (`load_model_state`) and keeps its TP piece (`load_full_state`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from hyena_cp.lazy import instantiate
from hyena_cp.parallel import group_rank, group_size, shard_tp, tp_partition
from hyena_cp.distributed.mesh import destroy_parallel, init_parallel
from hyena_cp.train.build_model import build_model
from hyena_cp.train.checkpoint import CheckpointWarning, load_model_state
from hyena_cp.train.config import ParallelConfig, fill_section_defaults
from hyena_cp.train.verify import newest_verified
from hyena_cp.value_types import check_fields

__all__ = ["GenerateConfig", "generate_text", "latest_checkpoint", "load_full_state", "with_generate_defaults"]


@dataclass(frozen=True)
class GenerateConfig:
    """``generate`` section.

    prompt: text the samples continue, UTF-8 bytes (the LM's tokens).
    max_new_tokens: bytes generated per sample (prompt + these must fit the model's context).
    temperature: 0 is greedy; higher is more random.
    top_k: sample among the k most likely bytes only (None: all 256).
    num_samples: continuations of the prompt decoded together (one batch).
    seed: sampling seed (the same on every rank).
    checkpoint: a ``step_*`` folder (verified before it is read); None: the newest verified one of the
        training run.
    """

    prompt: str = "def "
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = None
    num_samples: int = 1
    seed: int = 0
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        check_fields(self, "generate")  # first: the checks below compare values
        if not self.prompt:
            raise ValueError("generate.prompt must not be empty: the model needs a token to continue")
        if self.num_samples < 1 or self.max_new_tokens < 0:
            raise ValueError(f"generate.num_samples={self.num_samples} must be >= 1 and generate.max_new_tokens="
                             f"{self.max_new_tokens} >= 0")


def with_generate_defaults(cfg: DictConfig) -> DictConfig:
    """Fill the ``generate`` keys a config leaves out (in place), so each can be overridden."""
    return fill_section_defaults(cfg, "generate", GenerateConfig)


def latest_checkpoint(root: str | Path) -> Path:
    """The newest checkpoint folder under ``root`` that verifies (read only,
    `hyena_cp.train.verify.newest_verified`): the one the ``latest`` pointer names, else the
    newest ``step_*`` folder; a warning names each one skipped and what is wrong with it."""
    root = Path(root)
    choice = newest_verified(root)
    for problem in filter(None, [choice.pointer_problem]):
        warnings.warn(f"{problem}: choosing among the step_* folders instead", CheckpointWarning, stacklevel=2)
    for name, problem in choice.rejected.items():
        warnings.warn(f"checkpoint {root / name} failed verification: {problem}; skipped", CheckpointWarning,
                      stacklevel=2)
    if choice.chosen is None:
        rejected = f" ({len(choice.rejected)} folders failed verification)" if choice.rejected else ""
        raise FileNotFoundError(f"no complete checkpoint under {root} verifies{rejected}; train the model first "
                                f"(launch/train.py with the same config and train.output_dir) or set "
                                f"generate.checkpoint")
    return root / choice.chosen


def load_full_state(model: nn.Module, state: dict[str, Tensor], tp_group=None) -> None:
    """Copy FULL (single-process) tensors into ``model``: this TP rank's piece of each TP-sharded
    parameter (megatron's partition attributes, `shard_tp`), the whole tensor otherwise.
    Every key of ``model.state_dict()`` holding a tensor must be there, and nothing else."""
    own = {k for k, v in model.state_dict().items() if isinstance(v, Tensor)}
    missing, unexpected = sorted(own - state.keys()), sorted(state.keys() - own)
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not fit the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; generate with the config that trained it")
    tp, rank = group_size(tp_group), group_rank(tp_group)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name not in own:
                continue
            part, full = tp_partition(tensor), state[name]
            piece = full if part is None else shard_tp(full, part.dim, part.stride, tp, rank)
            if piece.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(full.shape)}, which does not give "
                                 f"this rank's {tuple(tensor.shape)}; generate with the config that trained it")
            tensor.copy_(piece)


def _decode(row: Tensor) -> str:
    """Bytes -> text; the data's file separator (byte 0) ends a sample."""
    data = bytes(row.tolist()).split(b"\0", 1)[0]
    return data.decode("utf-8", errors="replace")


def generate_text(cfg: DictConfig, *, name: str) -> list[str]:
    """Load the trained LM of experiment ``cfg`` (named ``name``) and return the continued
    prompts (``generate.num_samples`` texts, prompt included), the same on every rank."""
    settings = GenerateConfig(**instantiate(cfg.generate))
    parallel = ParallelConfig(**instantiate(cfg.parallel))
    if not parallel.megatron:
        raise ValueError("generation runs the megatron-core LM (built on the run mesh's TP and CP groups): set "
                         "parallel.megatron=true")
    groups = init_parallel(parallel.cp, tp=parallel.tp, backend=parallel.backend, timeout_s=parallel.timeout_s,
                           megatron=True)
    try:
        if groups.dims.dp != 1:  # the same on every rank
            raise ValueError(f"generation runs on cp x tp = {parallel.cp * parallel.tp} processes, got a world of "
                             f"{groups.dims.world}; launch that many or change parallel.cp / parallel.tp")
        output_dir = Path(cfg.train.output_dir or Path("outputs") / name)
        path = Path(settings.checkpoint) if settings.checkpoint else latest_checkpoint(output_dir / "checkpoints")
        torch.manual_seed(0)  # every weight is overwritten; a seed keeps the build deterministic
        model = build_model(cfg.model, groups, megatron=True)
        load_full_state(model, load_model_state(path), groups.tp_group)
        prompt = torch.tensor(list(settings.prompt.encode("utf-8")), device=groups.device)
        generator = torch.Generator(groups.device).manual_seed(settings.seed)
        tokens = model.generate(prompt.repeat(settings.num_samples, 1), settings.max_new_tokens,
                                temperature=settings.temperature, top_k=settings.top_k, generator=generator)
    except BaseException:
        destroy_parallel(groups, clean=False)
        raise
    destroy_parallel(groups)
    return [_decode(row) for row in tokens.cpu()]
