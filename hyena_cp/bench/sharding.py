"""Section ``sharding``: bytes of parameters, gradients and AdamW state per rank at dp x cp in
{1, 2, 4}, sharded by FSDP2 (``parallel.dp_mode=fsdp``) next to the replicated layout
(``dp_mode=ddp``, i.e. what every rank held before FSDP), for ViT-5-S (configs/vit5_hyena_s.py)
and a 12-layer Hyena LM (configs/hyena_lm_tiny.py widened to 512). Target: FSDP's total per
rank <= 1.1 / (dp * cp) of one process.

The counts are allocated storage (`hyena_cp.distributed.state_bytes`: FSDP's padded shards
included), after gradients of every parameter and one AdamW step; no forward is needed for
them (the gradients are zeros of the parameters' layout). Only dp * cp matters here (FSDP
shards over the flattened dimension), so the ranks form dp = P, cp = 1. Activations are the
``memory`` section's subject.
"""
from __future__ import annotations

from pathlib import Path

import torch

import hyena_cp
from hyena_cp.bench.common import BenchContext, Section, Table, fmt_bytes

__all__ = ["QUICK_WORLDS", "TARGET_SLACK", "WORLDS", "models", "rank_state_bytes", "run"]

WORLDS = (1, 2, 4)
QUICK_WORLDS = (1, 2)  # the CI smoke run
TARGET_SLACK = 1.1  # FSDP's bytes per rank may be up to 1.1/P of one process
CONFIGS = Path(hyena_cp.__file__).resolve().parent.parent / "configs"
MODES = ("fsdp", "ddp")


def models(quick: bool) -> dict[str, tuple[str, list[str], bool]]:
    """``{label: (config in configs/, overrides of its model, built on megatron-core)}``."""
    if quick:
        return {"ViT-5-Hyena tiny": ("vit5_hyena_tiny.py", [], False),
                "Hyena LM 2 x 64": ("hyena_lm_tiny.py", [], True)}
    lm = ["model.num_layers=12", "model.layer_pattern=HHHHHHHHHHHH", "model.hidden_size=512",
          "model.ffn_hidden_size=2048", "model.hyena.num_heads=8"]
    return {"ViT-5-Hyena S": ("vit5_hyena_s.py", [], False), "Hyena LM 12 x 512": ("hyena_lm_tiny.py", lm, True)}


def rank_state_bytes(group, config: str, overrides: list[str], megatron: bool, mode: str) -> dict:
    """On one rank of a P-rank group: the model (wrapped for P > 1), zero gradients, one AdamW
    step; its bytes and those of the replicated layout, and the parameter count."""
    from hyena_cp.lazy import LazyConfig, instantiate
    from hyena_cp.distributed.mesh import destroy_parallel, init_parallel
    from hyena_cp.distributed.fsdp import apply_data_parallel
    from hyena_cp.distributed.state_bytes import state_bytes

    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(CONFIGS / config)), overrides)
    groups = init_parallel(1, megatron=megatron)  # megatron-core modules read their groups there
    try:
        torch.manual_seed(0)
        model = instantiate(cfg.model)
        numel = sum(p.numel() for p in model.parameters())
        if groups.dims.world > 1:
            apply_data_parallel(model, groups.dp_cp_mesh, mode=mode)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)  # the layout FSDP's reduce-scatter leaves (DTensor shards)
        optimizer.step()
        local, replicated = state_bytes(model, optimizer)
        return {"local": local.as_dict(), "replicated": replicated.as_dict(), "numel": numel}
    finally:
        destroy_parallel(groups)


def _measure(ctx: BenchContext) -> dict[str, dict[str, dict[int, dict]]]:
    """``{label: {mode: {P: the fullest rank's result}}}``."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for label, (config, overrides, megatron) in models(ctx.quick).items():
        out[label] = {}
        for mode in MODES:
            out[label][mode] = {}
            for world in QUICK_WORLDS if ctx.quick else WORLDS:
                if world == 1 and mode == "ddp":  # one process: nothing to wrap, the same numbers
                    out[label][mode][1] = out[label]["fsdp"][1]
                    continue
                ranks = ctx.pools.run(world, rank_state_bytes, config, overrides, megatron, mode)
                out[label][mode][world] = max(ranks, key=lambda r: r["local"]["total"])
    return out


def run(ctx: BenchContext) -> Section:
    table = Table("Parameters + gradients + AdamW state per rank (float32), FSDP2 vs replicated",
                  ["model", "params", "dp x cp", "params/rank", "grads/rank", "AdamW/rank", "total/rank (fsdp)",
                   "vs one process", f"target {TARGET_SLACK}/P", "met", "total/rank (ddp, replicated)"])
    results = _measure(ctx)
    notes = []
    for label, per_mode in results.items():
        base = per_mode["fsdp"][1]["local"]["total"]
        for world in per_mode["fsdp"]:
            fsdp, ddp = per_mode["fsdp"][world], per_mode["ddp"][world]
            ratio, target = fsdp["local"]["total"] / base, TARGET_SLACK / world
            table.rows.append([label, f"{fsdp['numel'] / 1e6:.2f} M", world, fmt_bytes(fsdp["local"]["params"]),
                               fmt_bytes(fsdp["local"]["grads"]), fmt_bytes(fsdp["local"]["optimizer"]),
                               fmt_bytes(fsdp["local"]["total"]), f"{ratio:.3f}", f"{target:.3f}",
                               "yes" if ratio <= target else "no", fmt_bytes(ddp["local"]["total"])])
            if ratio > target:
                notes.append(f"{label}, P={world}: {ratio:.3f} of one process (target {target:.3f}): FSDP pads "
                             f"every parameter's dim 0 to a multiple of P, which small tensors feel.")
    table.notes.append("Allocated storage of the fullest rank (FSDP's padded shards; AdamW: exp_avg, exp_avg_sq and "
                       "a 4-byte step per parameter), after zero gradients and one AdamW step; buffers and "
                       "activations excluded. P ranks as dp = P (FSDP shards over dp x cp flattened).")
    notes = notes or ["FSDP meets the 1.1/P target for every model at every P; the replicated layout holds the "
                      "whole model, its gradients and AdamW state on every rank."]
    return Section("Parameter, gradient and optimizer memory per rank", [table], [], notes, {"results": results})
