"""Shared by the tensor-parallel training tests: a tiny megatron-core TP model, a task for it, and
a trainer config around both (the TP Hyena LM lands separately; this exercises the stack).

`TinyTPModel` has every kind of parameter the stack must tell apart: a replicated norm weight,
column-parallel weights and biases (partition dim 0) with stride 3 (the ``[q; k; v]`` layout)
and stride 1, row-parallel weights (dim 1) with the matching strides, and a replicated
row-parallel bias. With ``use_cpu_initialization=True`` megatron builds the FULL weights from
the default generator and keeps this rank's slice, so one seed gives the same full model at
every TP size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from hyena_cp.data.sampling import GlobalBatchSampler, dp_slice
from hyena_cp.lazy import LazyCall, LazyConfig
from hyena_cp.megatron.compat import ColumnParallelLinear, RowParallelLinear, TransformerConfig, cpu_config_defaults
from hyena_cp.distributed.mesh import ParallelGroups
from hyena_cp.parallel.tp_layout import shard_tp
from hyena_cp.train.config import with_defaults
from hyena_cp.train.loop import train

FEATURES, HIDDEN, HIDDEN_STRIDED = 8, 8, 12  # divisible by tp (and by 3 * tp) for tp in (1, 2, 4)


def tp_config(dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """A CPU ``TransformerConfig`` for this process's TP size (from ``parallel_state``)."""
    return TransformerConfig(num_layers=1, hidden_size=FEATURES, num_attention_heads=4, hidden_dropout=0.0,
                             attention_dropout=0.0, params_dtype=dtype, init_method_std=0.3,
                             tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                             **cpu_config_defaults())


class TinyTPModel(nn.Module):
    """``x [b, FEATURES] -> h = rmsnorm(x); fc2(gelu(fc1(h))) + fc4(gelu(fc3(h)))`` ``[b, FEATURES]``,
    replicated in and out; fc1/fc2 split their hidden channels with stride 3 (so a rank's
    fc1 output channels are exactly the fc2 input channels it holds), fc3/fc4 with stride 1.
    Needs megatron's ``parallel_state`` (TP size 1, 2 or 4)."""

    def __init__(self, *, dtype: torch.dtype = torch.float32):
        super().__init__()
        config = tp_config(dtype)
        linear = dict(config=config, init_method=config.init_method)
        self.norm = nn.RMSNorm(FEATURES, dtype=dtype)
        self.fc1 = ColumnParallelLinear(FEATURES, HIDDEN_STRIDED, bias=True, gather_output=False, stride=3, **linear)
        self.fc2 = RowParallelLinear(HIDDEN_STRIDED, FEATURES, bias=True, input_is_parallel=True, skip_bias_add=False,
                                     stride=3, **linear)
        self.fc3 = ColumnParallelLinear(FEATURES, HIDDEN, bias=True, gather_output=False, **linear)
        self.fc4 = RowParallelLinear(HIDDEN, FEATURES, bias=False, input_is_parallel=True, skip_bias_add=False,
                                     **linear)
        # megatron zeroes biases; non-zero ones make their gradients matter. Drawn FULL, then
        # sharded like megatron's weights, so the full model does not depend on the TP size.
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for fc, stride in ((self.fc1, 3), (self.fc3, 1)):
                full = torch.empty(fc.bias.shape[0] * tp, dtype=dtype).uniform_(-0.5, 0.5)
                fc.bias.copy_(shard_tp(full, 0, stride, tp, rank))
            self.fc2.bias.uniform_(-0.5, 0.5)
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)  # b, FEATURES (replicated)
        out = torch.zeros_like(h)
        for column, row in ((self.fc1, self.fc2), (self.fc3, self.fc4)):
            hidden, _ = column(h)  # b, hidden / tp (this rank's channels)
            out = out + row(F.gelu(hidden))[0]  # b, FEATURES (summed over TP)
        return out


class TinyRegression:
    """Fixed random regression data for `TinyTPModel`; the `hyena_cp.train.tasks.Task` protocol.

    Each (dp, cp) position takes its replica's slice; the model does not use CP, so every CP
    rank computes the whole replica loss and its share is ``loss / cp``."""

    unit = "samples"

    def __init__(self, *, global_batch_size: int, groups: ParallelGroups, seed: int, num_samples: int = 64):
        gen = torch.Generator().manual_seed(1234)
        self.x = torch.randn(num_samples, FEATURES, generator=gen)
        self.y = torch.randn(num_samples, FEATURES, generator=gen)
        self.groups, self.items_per_step = groups, global_batch_size
        self.sampler = GlobalBatchSampler(num_samples=num_samples, global_batch_size=global_batch_size, seed=seed)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        idx = dp_slice(self.sampler.indices(step), self.groups.dims.dp, self.groups.dp_rank)
        return self.x[idx], self.y[idx]

    def loss_share(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.mse_loss(model(x), y) / self.groups.dims.cp

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"val_loss": float(F.mse_loss(model(self.x), self.y))}  # the same on every rank


def tiny_tp_config() -> DictConfig:
    """The trainer config of `TinyTPModel` on `TinyRegression` (clipping active: max norm 0.05)."""
    return OmegaConf.create({
        "model": LazyCall(TinyTPModel)(),
        "optimizer": LazyCall(torch.optim.AdamW)(lr=1e-2, weight_decay=0.1),
        "task": LazyCall(TinyRegression)(global_batch_size=8),
        "parallel": {"megatron": True, "backend": "gloo"},
        "train": {"steps": 4, "log_every": 1, "warmup_steps": 1, "clip_grad_norm": 0.05, "progress": False},
    }, flags={"allow_objects": True})


def run_tiny(overrides: list[str], output_dir: str) -> dict[str, Any]:
    """`train` of `tiny_tp_config` on one rank of a pool (module level, so `dist_run` can send it)."""
    cfg = LazyConfig.apply_overrides(with_defaults(tiny_tp_config()), overrides + [f"train.output_dir={output_dir}"])
    return train(cfg, name=Path(output_dir).name)
