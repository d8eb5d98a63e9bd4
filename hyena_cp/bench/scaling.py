"""Section 3: Hyena layer vs attention layer (same projections, PyTorch SDPA) on one process:
time and memory of the forward (inference) and forward + backward, 1-D causal sequences
and 2-D grids. Reports the crossover length and the ratio at the largest size.
Targets: crossover <= 2k tokens; >= 10x faster at 16k (forward + backward)."""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from hyena_cp.bench.common import BenchContext, Section, Table, fmt_bytes, threads
from hyena_cp.bench.layer import AttentionMixer, LayerSpec, build_layer, fwd_bwd
from hyena_cp.bench.measure import saved_for_backward, time_and_peak, top_ops
from hyena_cp.bench.report import line_plot
from hyena_cp.models.attention import Attention2d

__all__ = ["run", "compare", "crossover", "sizes"]

ATTN_HEAD_DIM = 64


def sizes(quick: bool) -> dict[int, list[tuple[int, ...]]]:
    """Global sizes per spatial dims: 1-D lengths, 2-D square grids (tokens ~ 1k .. 16k)."""
    if quick:
        return {1: [(128,), (256,)], 2: [(8, 8), (12, 12)]}
    return {1: [(512,), (1024,), (2048,), (4096,), (8192,), (16384,)],
            2: [(32, 32), (45, 45), (64, 64), (90, 90), (128, 128)]}


def _layers(spec: LayerSpec, device, dtype) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """``{kind: (layer, input shape)}``: the Hyena mixer takes ``[B, L, C]``/``[B, H, W, C]``;
    the attention baselines take tokens ``[B, T, C]``."""
    heads = max(1, spec.channels // ATTN_HEAD_DIM)
    if spec.dims == 1:
        attn: nn.Module = AttentionMixer(hidden_dim=spec.channels, num_heads=heads)
    else:
        attn = Attention2d(dim=spec.channels, num_heads=heads, grid_w=spec.spatial[1], num_patches=spec.tokens)
    return {"hyena": (build_layer(spec, device=device, dtype=dtype), spec.shape),
            "attention": (attn.to(device=device, dtype=dtype), (spec.batch, spec.tokens, spec.channels))}


def compare(spec: LayerSpec, *, repeats: int, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32) -> dict[str, dict[str, float | None]]:
    """Per layer kind: forward (no grad) and forward + backward median seconds and peak
    memory, and bytes saved for backward, on the FULL (global) input; the kinds' timed calls
    alternate (`time_and_peak`)."""
    layers = _layers(spec, device, dtype)
    inputs = {name: torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
              for name, (_, shape) in layers.items()}

    def forward(name: str) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                layers[name][0](inputs[name])
        return call

    fwd = time_and_peak({name: forward(name) for name in layers}, repeats=repeats, device=device)
    fb = time_and_peak({name: partial(fwd_bwd, layer, inputs[name]) for name, (layer, _) in layers.items()},
                       repeats=repeats, device=device)
    results = {}
    for name, (layer, _) in layers.items():
        saved, _, y = saved_for_backward(layer, lambda: layer(inputs[name]))
        del y
        results[name] = {"fwd_s": fwd[name][0], "fwd_peak": fwd[name][1], "fb_s": fb[name][0], "fb_peak": fb[name][1],
                         "saved": saved}
    return results


def crossover(tokens: list[int], ratios: list[float]) -> str:
    """Token count where attention/Hyena time crosses 1 (log-log interpolation between the
    measured sizes), or where it lies outside the measured range."""
    if ratios[0] >= 1:
        return f"<= {tokens[0]} (Hyena faster at every size)"
    for (t0, r0), (t1, r1) in zip(zip(tokens, ratios), zip(tokens[1:], ratios[1:])):
        if r0 < 1 <= r1:
            frac = -math.log(r0) / (math.log(r1) - math.log(r0))
            return f"~{math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0))):.0f}"
    return f"> {tokens[-1]} (attention faster at every size)"


def _table(dims: int, specs: list[LayerSpec], res: list[dict]) -> Table:
    kind = ("1-D causal, attention = qkv + SDPA(is_causal=True) + proj" if dims == 1 else
            "2-D grid, attention = ViT-5 Attention2d (QK-norm, 2-D RoPE, global SDPA)")
    table = Table(f"Hyena vs attention layer, {kind}",
                  ["size", "tokens", "fwd ms H / A", "fwd A/H", "fwd+bwd ms H / A", "fwd+bwd A/H",
                   "saved H / A", "peak fwd+bwd H / A"])
    for spec, r in zip(specs, res):
        h, a = r["hyena"], r["attention"]
        table.rows.append([spec.label(), spec.tokens, f"{1e3 * h['fwd_s']:.1f} / {1e3 * a['fwd_s']:.1f}",
                           f"{a['fwd_s'] / h['fwd_s']:.2f}", f"{1e3 * h['fb_s']:.1f} / {1e3 * a['fb_s']:.1f}",
                           f"{a['fb_s'] / h['fb_s']:.2f}", f"{fmt_bytes(h['saved'])} / {fmt_bytes(a['saved'])}",
                           f"{fmt_bytes(h['fb_peak'])} / {fmt_bytes(a['fb_peak'])}"])
    return table


def _where_time_goes(spec: LayerSpec) -> str:
    """Profile of one Hyena layer forward at ``spec``: the measured cause behind its speed."""
    layer = build_layer(spec)
    x = torch.randn(spec.shape)
    with torch.no_grad():
        layer(x)  # warm-up
        ops = top_ops(lambda: layer(x))
    listed = ", ".join(f"{name} {share:.0%}" for name, share in ops)
    return f"Where the Hyena forward's CPU time goes at {spec.label()} (self time by aten op): {listed}."


def run(ctx: BenchContext) -> Section:
    channels, heads = (32, 4) if ctx.quick else (256, 8)
    section = Section("Hyena vs attention (one process)")
    with threads(ctx.threads):
        for dims, shapes in sizes(ctx.quick).items():
            specs = [LayerSpec(s, channels=channels, heads=heads) for s in shapes]
            res = [compare(spec, repeats=3 if ctx.quick else 5) for spec in specs]
            tokens = [s.tokens for s in specs]
            fwd = [r["attention"]["fwd_s"] / r["hyena"]["fwd_s"] for r in res]
            fb = [r["attention"]["fb_s"] / r["hyena"]["fb_s"] for r in res]
            table = _table(dims, specs, res)
            table.notes.append(f"B=1, D={channels}, attention heads of {ATTN_HEAD_DIM} channels, float32, "
                               f"torch.set_num_threads({ctx.threads}); H = Hyena layer, A = attention layer; A/H > 1: "
                               "Hyena faster. saved = bytes kept for backward; peak = most bytes the allocator "
                               "held above the start.")
            section.tables.append(table)
            label = "1-D" if dims == 1 else "2-D"
            section.notes.append(f"{label}: crossover forward {crossover(tokens, fwd)} tokens, forward+backward "
                                 f"{crossover(tokens, fb)} tokens; at {tokens[-1]} tokens attention/Hyena = "
                                 f"{fwd[-1]:.1f}x (forward), {fb[-1]:.1f}x (forward+backward).")
            section.notes.append(_where_time_goes(specs[-1]))
            series = {f"{k} {p}": (tokens, [r[k][f"{p}_s"] for r in res]) for k in ("hyena", "attention")
                      for p in ("fwd", "fb")}
            section.plots.append(line_plot(ctx.out / f"scaling_{dims}d.png", f"{label}: seconds per call (CPU)",
                                           "tokens", "seconds", series))
            section.data[f"{dims}d"] = {"tokens": tokens, "results": res}
    return section
