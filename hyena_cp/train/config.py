"""The ``train`` and ``parallel`` sections of an experiment config, checked by dataclasses so a
mistyped key raises instead of being ignored.

An experiment config (``configs/*.py``) defines four more entries: ``model`` (a LazyCall of
the network), ``optimizer`` (a LazyCall of a ``torch.optim`` class without ``params``),
``task`` (a LazyCall of `hyena_cp.train.tasks.ImageClassification` or `LanguageModeling`,
without ``groups``/``seed``, which the loop passes) and these two plain dicts.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields

import torch
from omegaconf import DictConfig

from hyena_cp.distributed.fsdp import DP_MODES, MIXED_PRECISION
from hyena_cp.train.optim import NO_WEIGHT_DECAY, WEIGHT_DECAY_POLICIES
from hyena_cp.value_types import check_fields

__all__ = ["NONFINITE_POLICIES", "PRECISIONS", "ParallelConfig", "TrainConfig", "check_sections", "lr_factor",
           "with_defaults"]


@dataclass(frozen=True)
class ParallelConfig:
    """``parallel`` section.

    cp: context-parallel size.
    tp: tensor-parallel size; the data-parallel size is ``world // (cp * tp)``. Only
        megatron-core models are tensor parallel (built on the mesh's TP group, see
        ``megatron``), so ``tp > 1`` needs ``megatron=true``. Rank order is megatron's
        (tp innermost, then cp, then dp; `hyena_cp.distributed.mesh`).
    backend: "auto" (NCCL on GPU, gloo on CPU), "gloo" or "nccl".
    timeout_s: collective timeout of every group of the run (the default group and the mesh's);
        a dead or hung peer fails the job after this long instead of hanging it, with a
        `hyena_cp.distributed.liveness.PeerTimeoutError` naming the ranks that had not started
        the step (torchrun can then restart it from the last checkpoint).
    megatron: the model is built on megatron-core: a model that takes ``pg_collection`` gets the
        DeviceMesh's own groups (`hyena_cp.train.build_model`), and megatron-core's
        ``parallel_state`` is initialised too, for megatron modules built without groups
        (checked to hold the DeviceMesh's ranks); False skips megatron-core's import.
    dp_mode: how parameters, gradients and optimizer state live over the ``dp * cp`` ranks of
        a TP shard (`hyena_cp.distributed.fsdp`): "fsdp" (FSDP2 ``fully_shard`` per block and at
        the root: each rank holds ~1/(dp*cp) of them) or "ddp" (FSDP2's ``replicate``: every
        rank holds all of them, one all-reduce per block). Either way gradients are summed over
        CP and averaged over DP. Ignored when dp * cp == 1 (nothing to shard) unless
        ``mixed_precision`` is set.
    mixed_precision: null (compute in the parameters' dtype) or "bf16": FSDP2's
        ``MixedPrecisionPolicy`` with bf16 parameters for forward/backward and all-gathers,
        fp32 gradient reduction, fp32 sharded parameters and optimizer state. Every op then
        sees bf16 weights (norms included; the FFT conv still upcasts to fp32) and the
        all-gathers move half the bytes. The other bf16 route is ``train.precision=bf16``
        (autocast, fp32 weights, any layout); the two are exclusive (`check_sections`).
    """

    cp: int = 1
    tp: int = 1
    backend: str = "auto"
    timeout_s: float = 300.0
    megatron: bool = False
    dp_mode: str = "fsdp"
    mixed_precision: str | None = None

    def __post_init__(self) -> None:
        check_fields(self, "parallel")  # first: the checks below compare values
        for name in ("cp", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.tp > 1 and not self.megatron:
            raise ValueError(f"parallel.tp={self.tp} needs parallel.megatron=true: only megatron-core models are "
                             "tensor parallel; set parallel.megatron=true (with a megatron-core model) or parallel.tp=1")
        if self.dp_mode not in DP_MODES:
            raise ValueError(f"parallel.dp_mode={self.dp_mode!r} must be one of {list(DP_MODES)}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"parallel.mixed_precision={self.mixed_precision!r} must be null or one of "
                             f"{sorted(MIXED_PRECISION)}")

    def wraps(self, dp_cp: int) -> bool:
        """Whether the model is wrapped for data parallelism over ``dp_cp`` ranks."""
        return dp_cp > 1 or self.mixed_precision is not None


FAULT_MODES = ("exit", "hang", "nan")
NONFINITE_POLICIES = ("stop", "skip")
# train.precision -> the autocast dtype of forward and loss (None: no autocast)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TrainConfig:
    """``train`` section (steps count optimizer steps; 0 in an ``*_every`` means "at the end only").

    seed: model init (same on every rank), data order, and the training RNG of data-parallel
        replica r, seeded with ``seed + 1000 * (r + 1)`` -- per REPLICA, not per rank, so the
        CP ranks of a replica draw the same stochastic-depth masks.
    output_dir: run folder (metrics, plot, checkpoints); None: ``outputs/<config name>``.
    resume: continue from the newest checkpoint in ``output_dir`` that verifies (its checksums,
        `hyena_cp.train.verify`) if there is one (so a torchrun restart or a re-run carries on);
        newer ones that fail are named in a warning and set aside, and with none verified the run
        refuses (`hyena_cp.train.checkpoint.Checkpointer.resume_step`). False requires a folder
        without a verified checkpoint (it never overwrites another run); unverifiable ones are
        set aside and the run starts from scratch.
    clip_grad_norm: max global grad norm (0 disables clipping).
    warmup_steps, min_lr_ratio: linear warm-up, then cosine decay to ``min_lr_ratio * lr``.
    weight_decay_policy: "timm" (the default): parameters with ``ndim <= 1`` (norms, biases,
        LayerScale gammas, Hyena's skip ``D``) and those matching ``no_weight_decay`` get no
        weight decay, the others the optimizer's ``weight_decay``; "all": every parameter
        decays (`hyena_cp.train.optim`).
    no_weight_decay: ``fnmatch`` patterns of parameter names (``named_parameters()`` of the
        model) exempt from decay under "timm"; default: position embedding, CLS and register
        tokens, Hyena's implicit filter and its mask (``*.filter.*``, ``*.mask.*``).
    precision: "fp32" (the default) or "bf16": the forward and the loss of every training step
        and of evaluation run under ``torch.autocast(device_type, dtype=torch.bfloat16)``;
        backward runs outside it (autograd replays each op in its forward dtype). Parameters,
        gradients and optimizer state stay fp32; autocast casts matmuls and convolutions to
        bf16 and keeps its fp32 ops (losses, norms on CUDA) in fp32, and the FFT long conv
        runs in fp32 whatever autocast says (`hyena_cp.ops.fftconv`). Works at any dp x cp,
        one process included. Exclusive with ``parallel.mixed_precision`` (`check_sections`).
        megatron-core models need CUDA for it (their linear layers' backward supports CUDA
        autocast only); on CPU the trainer refuses it before the first step.
    compile: apply ``torch.compile`` to every block (`hyena_cp.distributed.fsdp.block_modules`:
        the units FSDP2 wraps), in place with ``module.compile()`` so parameter names and
        checkpoint keys do not change, BEFORE data parallelism is applied (torchtitan's
        order); the root's own layers (embeddings, head) stay eager. A Hyena mixer traces
        whole under CP (its collectives are custom ops, `hyena_cp.parallel.traceable`); not
        ``fullgraph`` because other blocks may break the graph (the attention mixers'
        all-gathers, megatron-core's layers), where dynamo falls back to eager for that
        piece. The first step pays the compilation.
    compile_backend: the ``torch.compile`` backend: "inductor" (the default: generated
        kernels) or, e.g., "aot_eager" (AOTAutograd traces forward and backward and runs them
        eagerly: no codegen, what the tests use). Inductor works on CPU too (C++ through the
        system compiler): the tiny digits config in one process compiled in ~55 s on a busy
        2-core CPU (eager: 3 s) and gave the eager losses; it warns that complex ops (the FFT
        product) fall back to eager. Evaluation runs eager under any backend (`Trainer.evaluate`).
    nonfinite: what a step whose loss or gradient norm is not finite (nan, inf) does; every rank
        takes the same decision (`hyena_cp.train.nonfinite`). "stop" (the default): the run
        raises `NonFiniteError` naming the step, before the optimizer step, so the parameters,
        the optimizer state and every checkpoint stay finite. "skip": the step is skipped (no
        optimizer step, the batch is consumed, the schedule moves on, a ``nonfinite`` record
        goes to the log) unless it is the ``nonfinite_max_skips + 1``-th such step in a row,
        which stops the run as "stop" does.
    nonfinite_max_skips: the most consecutive steps "skip" skips.
    init_from: a folder holding ``model.safetensors`` with the FULL tensors of this model
        (``launch/convert.py`` of an Evo 2 / HyenaDNA checkpoint, ``launch/export.py`` of a run): the
        model starts from them instead of its random initialisation, loaded strictly (every
        tensor, nothing else; each TP rank its shard) before data parallelism wraps it. A run
        that resumes from its own checkpoint loads that on top, so restarts continue where they were.
    fault_step, fault_rank, fault_mode: testing only -- global rank ``fault_rank`` fails when it
        reaches step ``fault_step`` in the first attempt of a torchrun job: ``fault_mode``
        "exit" exits with status 1; "hang" stops responding (sleeps, never exits), so its
        peers' next collective times out after ``parallel.timeout_s``; "nan" makes its loss
        share of that step nan (a non-finite step, see ``nonfinite``).
    """

    steps: int
    seed: int = 0
    output_dir: str | None = None
    resume: bool = True
    init_from: str | None = None
    log_every: int = 10
    eval_every: int = 0
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    clip_grad_norm: float = 1.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay_policy: str = "timm"
    no_weight_decay: tuple[str, ...] = NO_WEIGHT_DECAY
    precision: str = "fp32"
    compile: bool = False
    compile_backend: str = "inductor"
    nonfinite: str = "stop"
    nonfinite_max_skips: int = 5
    fault_step: int | None = None
    fault_rank: int = 0
    fault_mode: str = "exit"
    progress: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "train")  # first: the checks below compare values
        if self.steps < 1:
            raise ValueError(f"train.steps={self.steps} must be >= 1")
        for name in ("log_every", "eval_every", "ckpt_every", "warmup_steps", "nonfinite_max_skips"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.weight_decay_policy not in WEIGHT_DECAY_POLICIES:
            raise ValueError(f"train.weight_decay_policy={self.weight_decay_policy!r} must be one of "
                             f"{list(WEIGHT_DECAY_POLICIES)}")
        object.__setattr__(self, "no_weight_decay", tuple(self.no_weight_decay))  # a list from the config
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r} must be one of {list(PRECISIONS)}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"train.nonfinite={self.nonfinite!r} must be one of {list(NONFINITE_POLICIES)}")
        if self.fault_mode not in FAULT_MODES:
            raise ValueError(f"train.fault_mode={self.fault_mode!r} must be one of {list(FAULT_MODES)}")

    def due(self, every: int, step: int) -> bool:
        """Whether a periodic action runs after ``step`` completed steps (always after the last)."""
        return step == self.steps or (every > 0 and step % every == 0)


def check_sections(train: TrainConfig, parallel: ParallelConfig) -> None:
    """Checks that span both sections. ``train.precision=bf16`` with ``parallel.mixed_precision``
    set is refused: both ask for bf16 compute, autocast over bf16 weights would only add casts
    (and upcast its fp32 ops again), and which one a run used would be ambiguous (torchtitan
    also uses autocast only where FSDP's policy does not apply)."""
    if train.precision != "fp32" and parallel.mixed_precision is not None:
        raise ValueError(f"train.precision={train.precision!r} and parallel.mixed_precision="
                         f"{parallel.mixed_precision!r} are two ways to compute in bf16; choose one: autocast with "
                         f"fp32 weights (train.precision) or FSDP2's bf16 weights and all-gathers "
                         f"(parallel.mixed_precision), and set the other to fp32 / null")


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate for (0-based) optimizer step ``step``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def fill_section_defaults(cfg: DictConfig, section: str, schema: type) -> DictConfig:
    """Fill the keys of ``cfg[section]`` that the config leaves out with the defaults of the
    dataclass ``schema`` (in place), so each can be overridden as ``key=value``."""
    if section not in cfg:
        cfg[section] = {}
    for f in fields(schema):
        if f.name not in cfg[section] and f.default is not MISSING:
            cfg[section][f.name] = f.default
    return cfg


def with_defaults(cfg: DictConfig) -> DictConfig:
    """Fill the ``train`` and ``parallel`` keys a config file leaves out with their defaults
    (in place), so every setting can be overridden as ``key=value`` and is saved with the run."""
    for section, schema in (("train", TrainConfig), ("parallel", ParallelConfig)):
        fill_section_defaults(cfg, section, schema)
    return cfg
