"""Section ``lm``: language-model quality at equal size and steps (measured, no target).

Byte-level LMs on the Python standard library's sources (`configs/lm_tiny.py`'s data, optimizer
and schedule) that differ only in their token mixers: all Hyena, all attention with RoPE,
a hybrid, and attention without position encoding (NoPE, the old baseline). Same width,
depth, MLPs, steps, batch, learning rate and seed; the mixers have about the same parameter
count (Hyena: in/out projections 4C² + short conv + filter MLP; attention: QKV/out 4C²), and
the table prints the exact counts. One process each (CP does not change the math: the
parity tests prove that), run by the training loop itself, so the numbers are those a user
gets from ``launch/train.py``. No per-architecture tuning: one learning rate for all.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from hyena_cp.bench.common import BenchContext, Section, Table

__all__ = ["VARIANTS", "run", "train_variant"]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "lm_tiny.py"
# (label, layer pattern, position embedding of the attention layers)
VARIANTS = [("Hyena", "HHHH", "rope"), ("attention + RoPE", "AAAA", "rope"), ("hybrid", "HHAH", "rope"),
            ("attention, NoPE", "AAAA", "none")]


def _overrides(pattern: str, position: str, steps: int, out_dir: Path, quick: bool) -> list[str]:
    overrides = [f"model.layer_pattern={pattern}", f"model.num_layers={len(pattern)}",
                 f"model.position_embedding={position}", "parallel.cp=1", f"train.steps={steps}",
                 f"train.eval_every={steps}", f"train.ckpt_every={steps}", "train.log_every=50",
                 f"train.output_dir={out_dir}", "train.resume=false", "train.progress=false"]
    if quick:
        overrides += ["task.eval_samples=4", "task.eval_batch_size=4", "task.global_batch_size=2",
                      "task.data.max_bytes=200000", "train.warmup_steps=0"]
    return overrides


def train_variant(group, pattern: str, position: str, steps: int, out_dir: str, quick: bool) -> dict:
    """Train one variant in this (one-rank) process; its parameter count, final metrics and time."""
    from hyena_cp.lazy import LazyConfig, instantiate
    from hyena_cp.distributed.mesh import destroy_parallel, init_parallel
    from hyena_cp.train.config import with_defaults
    from hyena_cp.train.loop import train

    cfg = LazyConfig.apply_overrides(with_defaults(LazyConfig.load(str(CONFIG))),
                                     _overrides(pattern, position, steps, Path(out_dir), quick))
    groups = init_parallel(1, megatron=True)  # megatron modules need (one-rank) groups to be built
    try:
        params = sum(p.numel() for p in instantiate(cfg.model).parameters())
    finally:
        destroy_parallel(groups)
    summary = train(cfg, name=f"lm_{pattern}_{position}")
    return {"params": params, "final": summary["final"], "time_s": summary["time_s"],
            "first_loss": summary["losses"][0], "last_loss": summary["losses"][-1]}


def run(ctx: BenchContext) -> Section:
    steps = 3 if ctx.quick else 600
    batch = 2 if ctx.quick else 16
    table = Table(f"Byte-level LM on stdlib sources: 4 layers, hidden 64, seq 256, batch {batch}, {steps} steps, one "
                  "process", ["mixers", "pattern", "position", "params", "val bits/byte", "val loss (nats)",
                              "train time / Hyena's"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, pattern, position in VARIANTS:
            out = Path(tmp) / f"{pattern}_{position}"
            (result,) = ctx.pools.run(1, train_variant, pattern, position, steps, str(out), ctx.quick)
            rows.append({"label": label, "pattern": pattern, "position": position, **result})
    hyena_time = rows[0]["time_s"]
    for r in rows:
        table.rows.append([r["label"], r["pattern"], r["position"], f"{r['params'] / 1e3:.1f} k",
                           f"{r['final']['val_bpb']:.3f}", f"{r['final']['val_loss']:.3f}",
                           f"{r['time_s'] / hyena_time:.2f}"])
    table.notes.append("Same data order, seed, AdamW (lr 3e-3, wd 0.1), warm-up and cosine schedule for every row; "
                       "validation on the first 128 held-out sequences (32 KiB). Lower bits/byte is better. "
                       "Hyena layers ignore the position setting (their filters are position-indexed).")
    return Section("Language-model quality (CPU)", [table], [], [], {"rows": rows})
