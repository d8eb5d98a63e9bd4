"""Section ``speed``: our 1-D mixer eager vs ``torch.compile``, fp32 vs bf16 autocast, and
against two peers — a causal SDPA layer with the same projections and a straightforward
Hyena layer written from the paper (`hyena_cp.bench.reference_hyena`) — one process,
forward + backward of ``sum(y)``, B=1, on the full sequence.

Every peer's timed calls alternate in one run (`timed_rounds`), so a load change on a shared
machine hits all of them alike and the RATIOS are the result; seconds are context only.
Compilation (and the warm-up calls that settle its guards) happens before any timed call.
Targets (issue #15, CPU, forward + backward at L = 16384): Hyena >= 10x SDPA, compiled
>= 1.5x eager.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hyena_cp.bench.common import BenchContext, Section, Table, fmt_bytes, machine_line, threads
from hyena_cp.bench.layer import AttentionMixer, LayerSpec, build_layer, fwd_bwd
from hyena_cp.bench.measure import timed_rounds, top_ops
from hyena_cp.bench.reference_hyena import ReferenceHyenaLayer

__all__ = ["run", "measure", "PEERS", "RATIOS"]

TARGET_LEN, TARGET_SDPA, TARGET_COMPILE = 16384, 10.0, 1.5
ATTN_HEAD_DIM = 64
# bf16 SDPA on a CPU without native bf16 (AVX2) is ~15x slower than fp32: ~100 s a call at
# 16k, so it is measured only up to here
SDPA_BF16_MAX_LEN = 4096
# inductor leaves complex ops (the FFTs) to aten and says so once per graph; the note says it
_INDUCTOR_COMPLEX = "Torchinductor does not support code generation for complex operators"


@dataclass(frozen=True)
class Peer:
    """One measured configuration: which layer, compiled or eager, under bf16 autocast or not."""

    layer: str  # "ours" | "sdpa" | "reference"
    compiled: bool = False
    bf16: bool = False


PEERS = {"ours eager fp32": Peer("ours"), "ours compiled fp32": Peer("ours", compiled=True),
         "ours eager bf16": Peer("ours", bf16=True), "ours compiled bf16": Peer("ours", compiled=True, bf16=True),
         "SDPA fp32": Peer("sdpa"), "SDPA bf16": Peer("sdpa", bf16=True), "reference Hyena fp32": Peer("reference")}

# (label, numerator peer, denominator peer, target at TARGET_LEN or None); > 1: the denominator is faster
RATIOS = [("SDPA / ours, eager fp32", "SDPA fp32", "ours eager fp32", TARGET_SDPA),
          ("SDPA / ours, compiled fp32", "SDPA fp32", "ours compiled fp32", TARGET_SDPA),
          ("reference Hyena / ours, eager fp32", "reference Hyena fp32", "ours eager fp32", None),
          ("eager / compiled, fp32", "ours eager fp32", "ours compiled fp32", TARGET_COMPILE),
          ("eager / compiled, bf16", "ours eager bf16", "ours compiled bf16", TARGET_COMPILE),
          ("fp32 / bf16, eager", "ours eager fp32", "ours eager bf16", None),
          ("fp32 / bf16, compiled", "ours compiled fp32", "ours compiled bf16", None),
          ("SDPA bf16 / ours compiled bf16", "SDPA bf16", "ours compiled bf16", None)]


def sizes(quick: bool) -> tuple[list[int], int, int]:
    """``(lengths, channels, filter groups)``."""
    # 1024 dropped from the full run: the section must stay under ~15 min on a loaded 2-core CPU
    return ([128], 32, 4) if quick else ([4096, TARGET_LEN], 256, 8)


def _autocast(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _step(layer: nn.Module, x: torch.Tensor, bf16: bool) -> Callable[[], None]:
    def call() -> None:
        with _autocast(bf16):
            fwd_bwd(layer, x)
    return call


def _layers(seq_len: int, channels: int, heads: int, backend: str) -> dict[str, nn.Module]:
    """``{peer: callable module}``; the compiled peers wrap the SAME mixer (same weights)."""
    torch.manual_seed(0)
    ours = build_layer(LayerSpec((seq_len,), channels=channels, heads=heads))
    # dynamic=False: each length gets its own static graph (automatic dynamic shapes would turn
    # on at the second length and time a different, shape-generic kernel)
    compiled = torch.compile(ours, backend=backend, dynamic=False)
    attn = AttentionMixer(hidden_dim=channels, num_heads=max(1, channels // ATTN_HEAD_DIM))
    ref = ReferenceHyenaLayer(channels, seq_len)
    by_kind = {("ours", False): ours, ("ours", True): compiled, ("sdpa", False): attn, ("reference", False): ref}
    return {name: by_kind[(p.layer, p.compiled)] for name, p in PEERS.items()
            if not (p.layer == "sdpa" and p.bf16 and seq_len > SDPA_BF16_MAX_LEN)}


def _max_rel_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    # with grad on, as timed: under no_grad the compiled module would compile another graph
    ya, yb = a(x).detach(), b(x).detach()
    return ((ya - yb).abs().max() / ya.abs().max()).item()


def measure(layers: dict[str, nn.Module], x: torch.Tensor, *, repeats: int) -> dict:
    """Times of every peer in ``layers`` (`_layers`) on ``x: [1, L, C]``: ``{"times": {peer: [s
    per round]}, "peaks": {peer: bytes}, "compile_s": {"fp32"|"bf16": s}, "compiled_rel_diff": float}``."""
    fns = {name: _step(layers[name], x, PEERS[name].bf16) for name in layers}
    compile_s = {}
    for name, peer in PEERS.items():
        if peer.compiled:
            start = time.perf_counter()
            for _ in range(2):  # the first call compiles; a recompile its side effects trigger lands in the second
                fns[name]()
            compile_s["bf16" if peer.bf16 else "fp32"] = time.perf_counter() - start
    rel_diff = _max_rel_diff(layers["ours eager fp32"], layers["ours compiled fp32"], x)
    times, peaks = timed_rounds(fns, repeats=repeats, slow_s=float("inf"))
    return {"times": times, "peaks": peaks, "compile_s": compile_s, "compiled_rel_diff": rel_diff}


def _per_round(res: dict, num: str, den: str) -> list[float] | None:
    """``time(num) / time(den)`` within each round (the calls of a round ran back to back, so a
    load change between rounds cancels); None when a peer was not run at this length."""
    times = res["times"]
    if num not in times or den not in times:
        return None
    return [a / b for a, b in zip(times[num], times[den])]


def _ratio(res: dict, num: str, den: str) -> float | None:
    """Median over the rounds of the per-round ratio (a ratio of the two medians would compare
    calls from different rounds)."""
    per_round = _per_round(res, num, den)
    return None if per_round is None else statistics.median(per_round)


def _round_spread(res: dict, num: str, den: str) -> tuple[float, float]:
    """Min and max over the rounds of the per-round ratio."""
    per_round = _per_round(res, num, den)
    return min(per_round), max(per_round)


def _times_table(lengths: list[int], results: list[dict], note: str) -> Table:
    table = Table("Forward + backward per call: median ms (peak allocator memory), context for the ratios",
                  ["peer", *[f"L={n}" for n in lengths]])
    for name in PEERS:
        cells = [f"{1e3 * statistics.median(r['times'][name]):.1f} ({fmt_bytes(r['peaks'][name])})"
                 if name in r["times"] else "–" for r in results]
        table.rows.append([name, *cells])
    table.notes.append(note)
    return table


def _verdict(value: float | None, target: float | None, seq_len: int) -> str:
    if target is None:
        return ""
    if value is None or seq_len != TARGET_LEN:
        return f">= {target:g} (at L={TARGET_LEN}; not measured)"
    return f">= {target:g}: {'met' if value >= target else 'NOT met'}"


def _ratio_table(lengths: list[int], results: list[dict]) -> Table:
    table = Table("Speed ratios, median over rounds (time of the first / time of the second; > 1: the second is faster)",
                  ["ratio", *[f"L={n}" for n in lengths], f"target at L={TARGET_LEN}"])
    for label, num, den, target in RATIOS:
        values = [_ratio(r, num, den) for r in results]
        table.rows.append([label, *[f"{v:.2f}" if v is not None else "–" for v in values],
                           _verdict(values[-1], target, lengths[-1])])
    return table


def _targets_note(seq_len: int, res: dict) -> str:
    """The two targets at the largest length, with the per-round spread of each ratio."""
    parts = []
    for label, num, den, target in RATIOS:
        if target is None or "bf16" in label:
            continue
        value, (lo, hi) = _ratio(res, num, den), _round_spread(res, num, den)
        state = ("met" if value >= target else "NOT met") if seq_len == TARGET_LEN else f"not judged below L={TARGET_LEN}"
        parts.append(f"{label} = {value:.2f} (rounds {lo:.2f}–{hi:.2f}; target >= {target:g}: {state})")
    return f"Targets at L={seq_len}: " + "; ".join(parts) + "."


def _where_time_goes(layers: dict[str, nn.Module], x: torch.Tensor) -> str:
    """Self CPU time by op of one forward + backward of our fp32 mixer, eager and compiled
    (already warm: run after `measure`)."""
    parts = []
    for name in ("ours eager fp32", "ours compiled fp32"):
        ops = top_ops(_step(layers[name], x, False), k=6)
        graphs: dict[str, str] = {}  # inductor's "## Call CompiledFxGraph <hash> ##" -> a short name
        for op, _ in ops:
            if op.startswith("## Call CompiledFxGraph"):
                graphs[op] = f"inductor graph {len(graphs) + 1} (fused kernels)"
        parts.append(f"{name}: " + ", ".join(f"{graphs.get(op, op)} {share:.0%}" for op, share in ops))
    return f"Where the time goes at L={x.shape[1]} (forward + backward, self CPU time by op): " + "; ".join(parts) + "."


def run(ctx: BenchContext) -> Section:
    lengths, channels, heads = sizes(ctx.quick)
    # the quick (CI smoke) run traces the same graphs with AOTAutograd but skips inductor's C++ codegen
    backend = "aot_eager" if ctx.quick else "inductor"
    repeats = 2 if ctx.quick else 7  # rounds spread ~±20 % on a shared VM: 7 for a steadier median
    section = Section("Speed: eager vs compiled, fp32 vs bf16, vs SDPA and a reference Hyena (one process)")
    load_start = os.getloadavg()[0]
    results = []
    with threads(ctx.threads), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_INDUCTOR_COMPLEX)
        for seq_len in lengths:
            start = time.perf_counter()
            torch._dynamo.reset()  # fresh caches per length: no recompile limit, compile time measured alike
            layers = _layers(seq_len, channels, heads, backend)
            x = torch.randn(1, seq_len, channels, requires_grad=True)
            results.append(measure(layers, x, repeats=repeats))
            compile_s = ", ".join(f"{k} {v:.1f} s" for k, v in results[-1]["compile_s"].items())
            print(f"speed: L={seq_len} done in {time.perf_counter() - start:.0f} s (compile {compile_s})", flush=True)
        profile = _where_time_goes(layers, x)
    note = (f"B=1, C={channels}, our mixer = QKVSequenceMixer (K=3, {heads} filter groups, layernorm), "
            f"SDPA = qkv + causal SDPA ({ATTN_HEAD_DIM}-channel heads) + proj, reference = per-channel filters, "
            f"nn.Conv1d short filter, rfft/irfft at 2L; torch.compile backend {backend!r}, dynamic=False; bf16 = "
            f"torch.autocast('cpu', bfloat16), the FFTs stay fp32; SDPA bf16 only up to L={SDPA_BF16_MAX_LEN}; "
            f"{repeats} alternating rounds after one untimed (memory-profiled) warm-up each.")
    section.tables += [_ratio_table(lengths, results), _times_table(lengths, results, note)]
    section.notes += [
        _targets_note(lengths[-1], results[-1]),
        "Compile + 2 warm-up calls per length (inductor's on-disk cache may hold kernels of earlier runs): "
        + "; ".join(f"L={n}: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["compile_s"].items())
                    for n, r in zip(lengths, results))
        + "; compiled vs eager fp32 forward, max |diff| / max |y|: "
        + ", ".join(f"{r['compiled_rel_diff']:.1e}" for r in results) + ".",
        profile,
        f"Machine: {machine_line(ctx.threads)}; CPU capability {torch.backends.cpu.get_cpu_capability()} "
        f"(bf16 matmuls are native only with AVX512-BF16/AMX); 1-minute load average {load_start:.1f} at the start.",
    ]
    section.data = {"lengths": lengths, "channels": channels, "backend": backend,
                    "results": [dict(r, seq_len=n) for n, r in zip(lengths, results)],
                    "ratios": {label: [_ratio(r, num, den) for r in results] for label, num, den, _ in RATIOS}}
    return section
