"""The training loop: data x tensor x context parallel training of a config's model on its task.

Set-up: the model (same seed on every rank) is wrapped by FSDP2 over the ``dp x cp`` ranks of
its TP shard (`hyena_cp.distributed.fsdp`, ``parallel.dp_mode``: "fsdp" shards parameters,
gradients and optimizer state, "ddp" replicates them); the optimizer is built on the wrapped
(sharded) parameters.

One step on every rank: this (dp, cp) position's batch (full images, or this rank's zigzag
token shard; the TP ranks of the position get the identical batch) -> forward (FSDP
all-gathers each block's parameters) -> this rank's loss SHARE -> backward of ``cp x share``
(FSDP reduce-scatters each block's gradients with a MEAN over dp x cp: with the factor
cp, summed over CP and averaged over DP for each TP shard, `hyena_cp.distributed.fsdp`) ->
clip by the norm of the FULL gradient (`hyena_cp.distributed.grad_norm`: FSDP shards and TP
shards summed, replicas counted once) -> the non-finite guard: one verdict on the loss and the
norm, agreed over all ranks, stops or skips the step (`hyena_cp.train.nonfinite`,
``train.nonfinite``) -> optimizer step on this rank's shards.

The dp x tp x cp invariant this keeps: the ranks of one TP shard hold the same (reduced)
gradients, so the sharded model takes the single-process step; the TP ranks of a (dp, cp)
position see the same data, compute the same loss and clip by the same factor. The logged
loss sums the shares over dp x cp only (every TP rank holds the whole loss). Evaluation runs
with the parameters unsharded (`hyena_cp.distributed.fsdp.full_parameters`), so replicas may
run different numbers of batches. Rank 0 logs, plots and drives the progress bar;
checkpoints are collective. After the first step the log records the parameter, gradient
and optimizer bytes per rank (the fullest rank), also written to ``final.json``.

The optimizer gets two parameter groups, with and without weight decay
(`hyena_cp.train.optim`, ``train.weight_decay_policy``). Each rank records the step it starts
on the job's store (`hyena_cp.distributed.liveness.Heartbeat`), so a collective that times out
because a peer stopped responding raises a `PeerTimeoutError` naming ``parallel.timeout_s``
and the ranks that had not started the step.

Speed keys (`TrainConfig`): ``train.compile`` compiles every block in place before FSDP2
wraps it (`compile_blocks`); ``train.precision=bf16`` runs each step's forward and loss, and
evaluation, under bf16 autocast (`Trainer.autocast`), backward and the optimizer outside it.

This module never calls ``torch.distributed`` itself: groups, barriers and reductions come
from `hyena_cp.parallel`, and checkpoint I/O from `hyena_cp.train.checkpoint` (DCP).
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from hyena_cp.lazy import LazyConfig, check_types, instantiate
from hyena_cp.distributed.mesh import ParallelGroups, destroy_parallel, init_parallel
from hyena_cp.distributed.fsdp import apply_data_parallel, block_modules, full_parameters, loss_scale
from hyena_cp.distributed.grad_norm import clip_grad_norm
from hyena_cp.distributed.liveness import Heartbeat
from hyena_cp.parallel.reductions import group_sum
from hyena_cp.distributed.state_bytes import max_over_ranks, state_bytes
from hyena_cp.parallel.tp_layout import tp_partition
from hyena_cp.train.build_model import build_model
from hyena_cp.train.checkpoint import CheckpointError, Checkpointer
from hyena_cp.train.config import PRECISIONS, ParallelConfig, TrainConfig, check_sections, lr_factor
from hyena_cp.train.export import load_initial_weights
from hyena_cp.train.metrics import MetricsLog, memory_line, plot_curves, progress_bar
from hyena_cp.train.nonfinite import NonFiniteError, NonFiniteGuard
from hyena_cp.train.optim import param_groups
from hyena_cp.train.tasks import Task

__all__ = ["ScheduleWarning", "Trainer", "compile_blocks", "train"]


# Errors that every rank raises together, from one agreed verdict (`NonFiniteGuard`, the
# checkpoint choice broadcast by rank 0), so a barrier before leaving cannot wait for a dead peer.
AGREED_ERRORS = (NonFiniteError, CheckpointError)


def restart_count() -> int:
    """Which attempt of a torchrun job this is (0 for the first, or outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


@dataclass
class Trainer:
    """Everything one rank needs for a run; build it with `Trainer.build`."""

    cfg: TrainConfig
    parallel: ParallelConfig
    groups: ParallelGroups
    model: nn.Module
    optimizer: torch.optim.Optimizer
    task: Task
    checkpointer: Checkpointer
    output_dir: Path
    name: str
    heartbeat: Heartbeat
    guard: NonFiniteGuard
    step: int = 0
    resumed_from: int | None = None
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    evals: dict[str, float] = field(default_factory=dict)
    memory: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg: DictConfig, groups: ParallelGroups, output_dir: Path, name: str) -> Trainer:
        settings, parallel = _sections(cfg)
        torch.manual_seed(settings.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, groups, megatron=parallel.megatron)
        _check_tensor_parallel(model, groups.dims.tp)
        if settings.init_from:
            load_initial_weights(model, settings.init_from, groups.tp_group)
        _check_autocast(settings.precision, parallel.megatron, groups.device)
        if settings.compile:  # before FSDP2, as torchtitan does: its hooks stay outside the compiled blocks
            compile_blocks(model, settings.compile_backend)
        dims = groups.dims
        if parallel.wraps(dims.dp * dims.cp):
            apply_data_parallel(model, groups.dp_cp_mesh, mode=parallel.dp_mode,
                                mixed_precision=parallel.mixed_precision)
        heartbeat = Heartbeat(groups.rank, groups.dims.world, parallel.timeout_s)  # before the first collective
        params = param_groups(model, settings.weight_decay_policy, settings.no_weight_decay)  # the sharded ones
        optimizer = instantiate(cfg.optimizer, params=params)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])  # the schedule scales this base rate
        task = instantiate(cfg.task, groups=groups, seed=settings.seed)
        _check_padded_windows(model, task, dims.cp)
        torch.manual_seed(settings.seed + 1000 * (groups.dp_rank + 1))  # per replica, see TrainConfig
        checkpointer = Checkpointer(output_dir / "checkpoints", groups, keep=settings.keep_checkpoints,
                                    dp_mode=parallel.dp_mode)
        guard = NonFiniteGuard(settings.nonfinite, settings.nonfinite_max_skips, groups)
        return cls(settings, parallel, groups, model, optimizer, task, checkpointer, output_dir, name, heartbeat, guard)

    # ----------------------------------------------------------------- resume
    def resume(self) -> None:
        """Load the newest verified checkpoint if ``train.resume``; refuse to mix runs otherwise
        (`Checkpointer.resume_step`)."""
        latest = self.checkpointer.resume_step(self.cfg.resume)
        if latest < 0:
            return
        progress = self.checkpointer.load(latest, self.model, self.optimizer)
        if progress["global_batch_size"] != self.task.sampler.global_batch_size:
            raise ValueError(f"checkpoint step {latest} was trained with global_batch_size="
                             f"{progress['global_batch_size']}; the data position needs the same value")
        self.step = self.resumed_from = progress["step"]
        meta = self.checkpointer.meta(latest)
        if meta["dp"] != self.groups.dims.dp:  # the per-replica streams do not map
            torch.manual_seed(hash((self.cfg.seed, self.groups.dp_rank, self.step)) % 2**63)
        if self.groups.rank == 0:
            _warn_if_schedule_changed(self.checkpointer.path(latest), latest, meta.get("schedule"), self.schedule())

    def schedule(self) -> dict[str, Any]:
        """The learning-rate schedule's settings (`lr_factor` of the base rates), as stored in
        each checkpoint's ``meta.json``."""
        return {"train.steps": self.cfg.steps, "train.warmup_steps": self.cfg.warmup_steps,
                "train.min_lr_ratio": self.cfg.min_lr_ratio,
                "optimizer.lr": [float(g["initial_lr"]) for g in self.optimizer.param_groups]}

    def _maybe_fail(self) -> bool:
        """Fault injection for the recovery tests (first attempt only, see TrainConfig); True:
        poison this step's loss ("nan")."""
        cfg = self.cfg
        if self.step == cfg.fault_step and self.groups.rank == cfg.fault_rank and restart_count() == 0:
            verb = {"exit": "exits", "hang": "hangs", "nan": "makes its loss nan"}[cfg.fault_mode]
            print(f"[fault injection] rank {self.groups.rank} {verb} at step {self.step}", file=sys.stderr, flush=True)
            if cfg.fault_mode == "exit":
                os._exit(1)
            while cfg.fault_mode == "hang":  # alive but silent, until torchrun (or the test) ends the process
                time.sleep(60)
            return True
        return False

    # ------------------------------------------------------------------- step
    def train_step(self, poison: bool = False) -> tuple[float, float, bool]:
        """One step; returns (global mean loss, global grad norm, whether the optimizer stepped:
        False for a non-finite step skipped under ``train.nonfinite=skip``, see `NonFiniteGuard`).
        ``poison``: make this rank's loss nan (fault injection)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        g = self.groups
        with self.autocast():
            share = self.task.loss_share(self.model, self.task.batch(self.step))
        if poison:
            share = share * float("nan")
        # FSDP averages the gradients over dp x cp in backward; x cp makes that "sum over CP, mean over DP"
        (share * loss_scale(g.dims.cp)).backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.cfg.clip_grad_norm if self.cfg.clip_grad_norm > 0 else float("inf")
        grad_norm = float(clip_grad_norm(params, max_norm, g.tp_group))  # the same norm on every rank
        # shares add up over CP; the TP ranks hold the same share, so TP is not summed over
        loss = float(group_sum(share.detach().double(), g.grad_group) / g.dims.dp)
        stepped = self.guard.step_is_finite(self.step + 1, loss, grad_norm)  # the same verdict on every rank
        if stepped:
            factor = lr_factor(self.step, self.cfg.steps, self.cfg.warmup_steps, self.cfg.min_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            self.optimizer.step()
        self.step += 1
        return loss, grad_norm, stepped

    def autocast(self) -> AbstractContextManager:
        """``torch.autocast`` in ``train.precision``'s dtype on this rank's device (a no-op for fp32)."""
        dtype = PRECISIONS[self.cfg.precision]
        return nullcontext() if dtype is None else torch.autocast(self.groups.device.type, dtype=dtype)

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        # full parameters: no collectives per forward, so replicas may run unequal batches; eager even
        # under train.compile: no_grad and eval mode would recompile every compiled frame for a rare call
        with full_parameters(self.model), self.autocast(), torch.compiler.set_stance("force_eager"):
            evals = self.task.evaluate(self.model)
        self.guard.check_evaluation(self.step, evals)  # a diverged model is an error, never a result
        self.evals = evals
        return self.evals

    def measure_memory(self) -> dict[str, dict[str, int]]:
        """Parameter, gradient and optimizer bytes of the fullest rank, and of the replicated
        layout (collective: every rank calls it)."""
        local, replicated = state_bytes(self.model, self.optimizer)
        fullest = max_over_ranks(local, self.groups.world_group, self.groups.device)
        self.memory = {"per_rank": fullest.as_dict(), "replicated": replicated.as_dict()}
        return self.memory

    def save(self) -> None:
        progress = {"step": self.step, "epoch": self.task.sampler.epoch(self.step),
                    "global_batch_size": self.task.sampler.global_batch_size}
        self.checkpointer.save(self.step, self.model, self.optimizer, progress, info={"schedule": self.schedule()})

    # -------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        """Train from ``self.step`` to ``train.steps``; returns a summary (same on every rank)."""
        cfg, main = self.cfg, self.groups.rank == 0
        log = MetricsLog(self.output_dir / "metrics.jsonl", self.resumed_from) if main else None
        bar = progress_bar(cfg.steps, self.step, main and cfg.progress)
        if log:
            bar.write(self._banner())
            if self.resumed_from is not None:
                log.write({"event": "resume", "step": self.resumed_from, "attempt": restart_count()})
        start, window = time.perf_counter(), []
        with self.heartbeat.explain_timeouts():
            while self.step < cfg.steps:
                window = self._step_and_log(log, bar, start, window)
        bar.close()
        if not self.evals:  # resumed at the end: report the checkpoint's metrics
            self.evaluate()
        if not self.memory:
            self._log_memory(log, bar)
        if log:
            self._finish(log)
        return {"step": self.step, "losses": self.losses, "grad_norms": self.grad_norms, "final": self.evals,
                "memory": self.memory, "resumed_from": self.resumed_from, "output_dir": str(self.output_dir),
                "time_s": time.perf_counter() - start}

    def _step_and_log(self, log: MetricsLog | None, bar, start: float, window: list[float]) -> list[float]:
        """One step of `run` with its logging, evaluation and checkpoint; returns the loss window."""
        cfg = self.cfg
        poison = self._maybe_fail()
        self.heartbeat.beat(self.step)
        tic = time.perf_counter()
        loss, grad_norm, stepped = self.train_step(poison)
        rate = self.task.items_per_step / (time.perf_counter() - tic)
        if not self.memory:  # after the first step: gradients and optimizer state exist
            self._log_memory(log, bar)
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        if stepped:
            window.append(loss)
        elif log:
            self._log_skipped(log, bar, loss, grad_norm)
        bar.update(1)
        bar.set_postfix({"loss": f"{loss:.4f}", f"{self.task.unit}/s": f"{rate:.0f}"}, refresh=False)
        if log and window and cfg.due(cfg.log_every, self.step):  # mean loss since the last record
            log.write({"step": self.step, "loss": sum(window) / len(window),
                       "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                       f"{self.task.unit}_per_s": rate, "time_s": time.perf_counter() - start})
            window = []
        if cfg.due(cfg.eval_every, self.step):
            self._evaluate_and_log(log, bar)
        if cfg.due(cfg.ckpt_every, self.step):
            self.save()
        return window

    def _log_skipped(self, log: MetricsLog, bar, loss: float, grad_norm: float) -> None:
        skipped, limit = self.guard.skipped_in_a_row, self.cfg.nonfinite_max_skips
        log.write({"event": "nonfinite", "step": self.step, "loss": loss, "grad_norm": grad_norm, "action": "skipped",
                   "in_a_row": skipped})
        bar.write(f"step {self.step}: loss {loss}, gradient norm {grad_norm}: not finite, step skipped ({skipped} in a "
                  f"row; train.nonfinite_max_skips={limit})")

    def _banner(self) -> str:
        dims = self.groups.dims  # the full model's parameters: a TP shard is 1/tp of its tensor
        params = sum(p.numel() * (dims.tp if tp_partition(p) else 1) for p in self.model.parameters())
        where = f"resuming from step {self.resumed_from}" if self.resumed_from is not None else "from scratch"
        return (f"{self.name}: {params / 1e6:.3f}M parameters, world={dims.world} "
                f"(dp={dims.dp} x cp={dims.cp} x tp={dims.tp}) on {self.groups.device.type}, {self.cfg.steps} steps "
                f"{where}; outputs in {self.output_dir}/")

    def _log_memory(self, log: MetricsLog | None, bar) -> None:
        memory = self.measure_memory()
        if log:
            log.write({"event": "memory", "step": self.step, **memory})
            bar.write(memory_line(memory, self.parallel.dp_mode if self.groups.dims.dp * self.groups.dims.cp > 1
                                  else "one process"))

    def _evaluate_and_log(self, log: MetricsLog | None, bar) -> None:
        evals = self.evaluate()
        if log:
            log.write({"step": self.step, **evals})
            bar.write(f"step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in evals.items()))

    def _finish(self, log: MetricsLog) -> None:
        plot_curves(MetricsLog.read(log.path), self.output_dir / "curves.png", self.name)
        summary = {"step": self.step, **self.evals, "memory": self.memory}
        (self.output_dir / "final.json").write_text(json.dumps(summary, indent=1) + "\n")


class ScheduleWarning(UserWarning):
    """A resume whose learning-rate schedule settings differ from its checkpoint's."""


def _warn_if_schedule_changed(path: Path, step: int, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """A resume under other schedule settings changes the learning rate of every later step:
    allowed (e.g. to train longer), but said, with which settings are used from here on.
    ``saved`` is None for a checkpoint that does not record its schedule."""
    changed = [k for k in current if saved is not None and k in saved and saved[k] != current[k]]
    if changed:
        was = ", ".join(f"{k}={saved[k]}" for k in changed)
        now = ", ".join(f"{k}={current[k]}" for k in changed)
        warnings.warn(f"checkpoint {path} was trained with {was}; this run has {now}: the learning-rate schedule "
                      f"of this run's config ({now}) is used from step {step} on, so the steps after it do not "
                      f"follow the schedule the checkpoint was on", ScheduleWarning, stacklevel=3)


def _check_tensor_parallel(model: nn.Module, tp: int) -> None:
    """A model without TP-sharded parameters would run replicated on every TP rank: tp ranks'
    worth of work for one. Raised on every rank alike (the same model), before any collective."""
    if tp > 1 and not any(tp_partition(p) is not None for p in model.parameters()):
        raise ValueError(f"parallel.tp={tp} but the model has no tensor-parallel parameters (megatron-core's "
                         f"tensor_model_parallel attribute); only megatron-core models are tensor parallel: "
                         f"use parallel.tp=1 for this model")


def _check_padded_windows(model: nn.Module, task, cp: int) -> None:
    """A language model's windows, padded to what the CP group shards (`LanguageModeling`), must fit
    its ``max_sequence_length``; said here, naming the settings, instead of by the first forward."""
    limit, padded = getattr(model, "max_sequence_length", None), getattr(task, "shard_len", None)
    if limit is not None and padded is not None and padded > limit:
        seq_len = task.data.seq_len
        raise ValueError(f"task.data.seq_len={seq_len} is padded to {padded} tokens (a multiple of 2*parallel.cp="
                         f"{2 * cp}), more than model.max_sequence_length={limit}: raise model.max_sequence_length to "
                         f"{padded}, or use a seq_len that is a multiple of {2 * cp}")


def _check_autocast(precision: str, megatron: bool, device: torch.device) -> None:
    """megatron-core's linear layers register their autograd functions' autocast state for CUDA
    only (``custom_fwd(device_type="cuda")``), so under CPU autocast their backward multiplies a
    bf16 gradient by an fp32 weight and fails; refuse that before the first step."""
    if precision != "fp32" and megatron and device.type != "cuda":
        raise ValueError(f"train.precision={precision!r} with a megatron-core model (parallel.megatron=true) needs "
                         f"CUDA: megatron-core's linear layers support autocast on CUDA only; on {device.type} use "
                         f"train.precision=fp32")


def compile_blocks(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` every block of ``model`` (`block_modules`) in place (``module.compile``:
    parameter names and state-dict keys stay those of the eager model); the rest stays eager.
    Call it before `apply_data_parallel`. Graph breaks are allowed (not ``fullgraph``): a Hyena
    mixer traces whole under CP, other blocks need not (`TrainConfig`)."""
    import torch._dynamo  # only compiled runs pay the import

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"train.compile_backend={backend!r} is not a torch.compile backend; known: {sorted(known)}")
    blocks = block_modules(model)
    if not blocks:
        raise ValueError(f"train.compile=true but {type(model).__name__} has no blocks (nn.ModuleList elements) "
                         f"to compile")
    for block in blocks:
        block.compile(backend=backend)
    return model


def _sections(cfg: DictConfig) -> tuple[TrainConfig, ParallelConfig]:
    """The checked ``train`` and ``parallel`` sections of ``cfg``."""
    settings, parallel = TrainConfig(**instantiate(cfg.train)), ParallelConfig(**instantiate(cfg.parallel))
    check_sections(settings, parallel)
    return settings, parallel


def train(cfg: DictConfig, *, name: str) -> dict[str, Any]:
    """Run the experiment ``cfg`` (named ``name``, e.g. the config file's stem) on this rank.

    All ranks call it; torchrun or a test harness starts them. Joins an existing default
    process group, or creates one from torchrun's environment (a world of one without it).
    Outputs go to ``train.output_dir`` (default ``outputs/<name>``)."""
    _, parallel = _sections(cfg)  # a bad config raises here, before any process group exists
    check_types(cfg)  # the calls' arguments too (optimizer.lr, task.global_batch_size, ...)
    groups = init_parallel(parallel.cp, tp=parallel.tp, backend=parallel.backend, timeout_s=parallel.timeout_s,
                           megatron=parallel.megatron)
    try:
        out = Path(cfg.train.output_dir or Path("outputs") / name)
        if groups.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(LazyConfig.format(cfg))
        trainer = Trainer.build(cfg, groups, out, name)
        trainer.resume()
        summary = trainer.run()
    except AGREED_ERRORS:  # every rank raised it at the same point: end together (a clean gloo exit)
        destroy_parallel(groups)
        raise
    except BaseException:
        destroy_parallel(groups, clean=False)  # peers may be gone: no barrier
        raise
    destroy_parallel(groups)
    return summary
