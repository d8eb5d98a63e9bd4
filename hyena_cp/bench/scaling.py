"""Section 3: Hyena layer vs attention layer (same projections, PyTorch SDPA) on one process:
time and memory of the forward (inference) and forward + backward, 1-D causal sequences,
2-D grids and 3-D volumes. Reports the crossover length and the ratio at the largest size.
Targets: crossover <= 2k tokens; >= 10x faster at 16k (forward + backward).

3-D: a volume of 16x64x64 = 65,536 tokens against non-causal attention over the flattened
tokens. Attention at that size takes minutes per call on a 2-core CPU, so it is measured up to
16,384 tokens (`sizes`) and EXTRAPOLATED to the volume as ``t ~ T^2`` from the largest measured size
(the row says so, with the slope measured between the two largest sizes); Hyena is measured there.
"""
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

__all__ = ["run", "compare", "crossover", "sizes", "extrapolate", "VOLUME"]

ATTN_HEAD_DIM = 64
VOLUME = {False: (16, 64, 64), True: (8, 8, 8)}  # quick -> the 3-D size attention is extrapolated to


def sizes(quick: bool) -> dict[int, list[tuple[int, ...]]]:
    """Global sizes per spatial dims, both layers measured: 1-D lengths, 2-D square grids, 3-D volumes
    (tokens ~ 1k .. 16k; the 3-D target `VOLUME` is measured for Hyena alone)."""
    if quick:
        return {1: [(128,), (256,)], 2: [(8, 8), (12, 12)], 3: [(2, 8, 8), (4, 8, 8)]}
    return {1: [(512,), (1024,), (2048,), (4096,), (8192,), (16384,)],
            2: [(32, 32), (45, 45), (64, 64), (90, 90), (128, 128)],
            3: [(4, 16, 16), (8, 16, 16), (8, 32, 32), (16, 32, 32)]}


def _layers(spec: LayerSpec, device, dtype) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """``{kind: (layer, input shape)}``: the Hyena mixer takes ``[B, L, C]``/``[B, H, W, C]``;
    the attention baselines take tokens ``[B, T, C]``."""
    heads = max(1, spec.channels // ATTN_HEAD_DIM)
    if spec.dims != 2:  # a causal sequence, or every token of a volume (non-causal)
        attn: nn.Module = AttentionMixer(hidden_dim=spec.channels, num_heads=heads, causal=spec.dims == 1)
    else:
        attn = Attention2d(dim=spec.channels, num_heads=heads, grid_w=spec.spatial[1], num_patches=spec.tokens)
    return {"hyena": (build_layer(spec, device=device, dtype=dtype), spec.shape),
            "attention": (attn.to(device=device, dtype=dtype), (spec.batch, spec.tokens, spec.channels))}


def compare(spec: LayerSpec, *, repeats: int, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32,
            kinds: tuple[str, ...] = ("hyena", "attention")) -> dict[str, dict[str, float | None]]:
    """Per layer kind (of ``kinds``): forward (no grad) and forward + backward median seconds and
    peak memory, and bytes saved for backward, on the FULL (global) input; the kinds' timed calls
    alternate (`time_and_peak`)."""
    layers = {kind: layer for kind, layer in _layers(spec, device, dtype).items() if kind in kinds}
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


_KINDS = {1: "1-D causal, attention = qkv + SDPA(is_causal=True) + proj",
          2: "2-D grid, attention = ViT-5 Attention2d (QK-norm, 2-D RoPE, global SDPA)",
          3: "3-D volume, attention = qkv + SDPA over all tokens (non-causal) + proj"}


def _row(label: str, tokens: int, h: dict, a: dict, approx: str = "") -> list:
    saved_a = fmt_bytes(a["saved"]) if "saved" in a else "n/a"
    peak_a = fmt_bytes(a["fb_peak"]) if "fb_peak" in a else "n/a"
    return [label, tokens, f"{1e3 * h['fwd_s']:.1f} / {approx}{1e3 * a['fwd_s']:.1f}", f"{approx}{a['fwd_s'] / h['fwd_s']:.2f}",
            f"{1e3 * h['fb_s']:.1f} / {approx}{1e3 * a['fb_s']:.1f}", f"{approx}{a['fb_s'] / h['fb_s']:.2f}",
            f"{fmt_bytes(h['saved'])} / {saved_a}", f"{fmt_bytes(h['fb_peak'])} / {peak_a}"]


def _table(dims: int, specs: list[LayerSpec], res: list[dict]) -> Table:
    table = Table(f"Hyena vs attention layer, {_KINDS[dims]}",
                  ["size", "tokens", "fwd ms H / A", "fwd A/H", "fwd+bwd ms H / A", "fwd+bwd A/H",
                   "saved H / A", "peak fwd+bwd H / A"])
    table.rows += [_row(spec.label(), spec.tokens, r["hyena"], r["attention"]) for spec, r in zip(specs, res)]
    return table


def extrapolate(tokens: list[int], seconds: list[float], target: int) -> tuple[float, float]:
    """``(seconds at target, measured slope)``: quadratic in the tokens from the largest measured size,
    and the log-log slope between the two largest (~2 where attention's T^2 work dominates)."""
    slope = math.log(seconds[-1] / seconds[-2]) / math.log(tokens[-1] / tokens[-2])
    return seconds[-1] * (target / tokens[-1]) ** 2, slope


def _volume(ctx: BenchContext, table: Table, tokens: list[int], res: list[dict], channels: int, heads: int) -> dict:
    """The 3-D target volume: Hyena measured, attention extrapolated (a row of ``table``, labelled)."""
    spec = LayerSpec(VOLUME[ctx.quick], channels=channels, heads=heads)
    hyena = compare(spec, repeats=2 if ctx.quick else 3, kinds=("hyena",))["hyena"]
    attn, slopes = {}, {}
    for part in ("fwd", "fb"):
        attn[f"{part}_s"], slopes[part] = extrapolate(tokens, [r["attention"][f"{part}_s"] for r in res], spec.tokens)
    table.rows.append(_row(f"{spec.label()}, attention extrapolated", spec.tokens, hyena, attn, approx="~"))
    table.notes.append(f"Last row: Hyena measured; attention EXTRAPOLATED as t ~ T^2 from {tokens[-1]} tokens (measured "
                       f"log-log slope between the two largest sizes: forward {slopes['fwd']:.2f}, forward+backward "
                       f"{slopes['fb']:.2f}); attention is not run at {spec.tokens} tokens (at the full run's 65,536: minutes per call on "
                       "a 2-core CPU).")
    return {"tokens": spec.tokens, "hyena": hyena, "attention_extrapolated": attn, "slopes": slopes}


def _where_time_goes(spec: LayerSpec) -> str:
    """Profile of one Hyena layer forward at ``spec``: the measured cause behind its speed."""
    layer = build_layer(spec)
    x = torch.randn(spec.shape)
    with torch.no_grad():
        layer(x)  # warm-up
        ops = top_ops(lambda: layer(x))
    listed = ", ".join(f"{name} {share:.0%}" for name, share in ops)
    return f"Where the Hyena forward's CPU time goes at {spec.label()} (self time by aten op): {listed}."


def _part(ctx: BenchContext, section: Section, dims: int, shapes: list[tuple[int, ...]], channels: int,
          heads: int) -> None:
    """One table, notes and plot per dimension count (3-D: with the extrapolated target volume)."""
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
    label = f"{dims}-D"
    section.notes.append(f"{label}: crossover forward {crossover(tokens, fwd)} tokens, forward+backward "
                         f"{crossover(tokens, fb)} tokens; at {tokens[-1]} tokens attention/Hyena = "
                         f"{fwd[-1]:.1f}x (forward), {fb[-1]:.1f}x (forward+backward).")
    series = {f"{k} {p}": (list(tokens), [r[k][f"{p}_s"] for r in res]) for k in ("hyena", "attention")
              for p in ("fwd", "fb")}
    data = {"tokens": tokens, "results": res}
    if dims == 3:
        data["volume"] = vol = _volume(ctx, table, tokens, res, channels, heads)
        t = vol["tokens"]
        for p in ("fwd", "fb"):
            series[f"hyena {p}"][0].append(t)
            series[f"hyena {p}"][1].append(vol["hyena"][f"{p}_s"])
            series[f"attention {p} (extrapolated)"] = ([tokens[-1], t], [res[-1]["attention"][f"{p}_s"],
                                                                       vol["attention_extrapolated"][f"{p}_s"]])
        section.notes.append(f"3-D at {t} tokens: attention/Hyena ~{vol['attention_extrapolated']['fwd_s'] / vol['hyena']['fwd_s']:.1f}x "
                             f"(forward), ~{vol['attention_extrapolated']['fb_s'] / vol['hyena']['fb_s']:.1f}x "
                             "(forward+backward), attention extrapolated (see the table's last row).")
    section.tables.append(table)
    section.notes.append(_where_time_goes(specs[-1]))
    section.plots.append(line_plot(ctx.out / f"scaling_{dims}d.png", f"{label}: seconds per call (CPU)",
                                   "tokens", "seconds", series))
    section.data[f"{dims}d"] = data


def run(ctx: BenchContext) -> Section:
    channels, heads = (32, 4) if ctx.quick else (256, 8)
    section = Section("Hyena vs attention (one process)")
    with threads(ctx.threads):
        for dims, shapes in sizes(ctx.quick).items():
            _part(ctx, section, dims, shapes, channels, heads)
    return section
