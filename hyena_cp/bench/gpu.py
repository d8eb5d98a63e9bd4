"""Section 5: one GPU (skipped without CUDA). The same layer in fp32 and bf16 autocast:
achieved FLOP/s (``flop_count``) against a measured matmul rate and achieved bytes/s
(eager kernel traffic, `TrafficCounter`) against a measured device-to-device copy; then the
FFT long conv vs SDPA (flash) crossover, operator and layer.

Every function takes ``device``, so the CPU test runs the same code with tiny sizes.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hyena_cp.bench.common import BenchContext, Section, Table, fmt_bytes, median_time
from hyena_cp.bench.layer import AttentionMixer, LayerSpec, build_layer, fwd_bwd
from hyena_cp.bench.measure import TrafficCounter, time_and_peak
from hyena_cp.bench.scaling import crossover
from hyena_cp.ops.fftconv import fft_causal_conv1d

__all__ = ["run", "run_on", "device_rates", "layer_table", "crossover_table", "GpuSizes", "QUICK"]

MODES = {"fp32": None, "bf16 autocast": torch.bfloat16}


@dataclass(frozen=True)
class GpuSizes:
    """Problem sizes of the section (the CPU test passes tiny ones)."""

    copy_bytes: int = 2**30
    matmul_n: int = 8192
    repeats: int = 20
    channels: int = 256
    heads: int = 8
    layers: tuple[tuple[int, ...], ...] = ((16384,), (65536,), (262144,), (128, 128), (256, 256))
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
    batches: tuple[int, ...] = (1, 8)


QUICK = GpuSizes(copy_bytes=2**20, matmul_n=128, repeats=3, channels=32, heads=4, layers=((256,), (8, 8)),
                 lengths=(128, 256, 512), batches=(1,))


def device_rates(device: torch.device | str, size: GpuSizes) -> dict[str, float]:
    """Measured peak-ish rates: copy bandwidth (bytes read + written per second) and matmul
    FLOP/s in bf16 and fp32 (TF32 as the process has it set; off by default)."""
    src = torch.empty(size.copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_copy = median_time(lambda: dst.copy_(src), repeats=size.repeats, warmup=2, device=device, min_seconds=0.2)
    rates = {"copy_bytes_per_s": 2 * src.numel() / t_copy}
    del src, dst
    n = size.matmul_n
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = median_time(lambda: a @ b, repeats=size.repeats, warmup=2, device=device, min_seconds=0.2)
        rates[f"matmul_{name}_flop_per_s"] = 2 * n**3 / t
    return rates


def _autocast(device: torch.device | str, dtype: torch.dtype | None):
    kind = torch.device(device).type
    return nullcontext() if dtype is None else torch.autocast(device_type=kind, dtype=dtype)


def _traffic(fn) -> int:
    with TrafficCounter() as counter:
        fn()
    return counter.bytes


def layer_table(device: torch.device | str, rates: dict[str, float], size: GpuSizes) -> tuple[Table, list[dict]]:
    """Hyena layer fwd and fwd+bwd per size and precision, with achieved rates."""
    table = Table("Hyena layer on one device", ["size", "precision", "pass", "ms", "peak mem", "TFLOP/s",
                                                "of matmul", "GB/s (eager traffic)", "of copy bw"])
    data = []
    for shape in size.layers:
        spec = LayerSpec(shape, channels=size.channels, heads=size.heads)
        layer = build_layer(spec, device=device)
        x = torch.randn(spec.shape, device=device, requires_grad=True)
        grid_w = shape[-1] if spec.dims == 2 else None
        for mode, dtype in MODES.items():
            matmul = rates["matmul_bf16_flop_per_s" if dtype else "matmul_fp32_flop_per_s"]

            def forward() -> None:
                with torch.no_grad(), _autocast(device, dtype):
                    layer(x)

            def train_step() -> None:
                with _autocast(device, dtype):
                    fwd_bwd(layer, x)

            for name, fn, inference in (("fwd", forward, True), ("fwd+bwd", train_step, False)):
                seconds, peak = time_and_peak({name: fn}, repeats=size.repeats, device=device)[name]
                flop = spec.batch * layer.flop_count(spec.tokens, inference=inference, grid_w=grid_w)
                moved = _traffic(fn)
                bandwidth = moved / seconds
                table.rows.append([spec.label(), mode, name, f"{1e3 * seconds:.3f}", fmt_bytes(peak),
                                   f"{flop / seconds / 1e12:.2f}", f"{flop / seconds / matmul:.1%}",
                                   f"{bandwidth / 1e9:.0f}", f"{bandwidth / rates['copy_bytes_per_s']:.1%}"])
                data.append({"size": spec.label(), "mode": mode, "pass": name, "s": seconds, "peak": peak,
                             "flop": flop, "bytes": moved})
    return table, data


def _sdpa_backend(device: torch.device | str):
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION) if torch.device(device).type == "cuda" else nullcontext()


def _op_pair(device, batch: int, length: int, size: GpuSizes) -> dict[str, float | None]:
    """fwd+bwd seconds and peak memory of the FFT long conv (filters given) vs causal SDPA
    (flash on CUDA), bf16 inputs, ``size.channels`` channels in 64-channel heads."""
    c, heads = size.channels, max(1, size.channels // 64)
    u = torch.randn(batch, c, length, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(size.heads, length, device=device, requires_grad=True)
    d = torch.randn(c, device=device, requires_grad=True)
    q, kk, v = (torch.randn(batch, heads, length, c // heads, device=device, dtype=torch.bfloat16, requires_grad=True)
                for _ in range(3))

    def fft_step() -> None:
        fft_causal_conv1d(u, k, d).sum().backward()

    def sdpa_step() -> None:
        with _sdpa_backend(device):
            F.scaled_dot_product_attention(q, kk, v, is_causal=True).sum().backward()

    return _flatten(time_and_peak({"fft_conv": fft_step, "sdpa": sdpa_step}, repeats=size.repeats, device=device))


def _layer_pair(device, batch: int, length: int, size: GpuSizes) -> dict[str, float | None]:
    """fwd+bwd seconds and peak memory of the Hyena layer vs the causal attention layer
    (same projections), bf16 autocast."""
    spec = LayerSpec((length,), channels=size.channels, heads=size.heads, batch=batch)
    layers = {"hyena_layer": build_layer(spec, device=device),
              "attention_layer": AttentionMixer(hidden_dim=size.channels, num_heads=max(1, size.channels // 64))}
    x = torch.randn(spec.shape, device=device, requires_grad=True)

    def step(layer: torch.nn.Module) -> None:
        with _autocast(device, torch.bfloat16), _sdpa_backend(device):
            fwd_bwd(layer, x)

    steps = {name: partial(step, layer.to(device)) for name, layer in layers.items()}
    return _flatten(time_and_peak(steps, repeats=size.repeats, device=device))


def _flatten(results: dict[str, tuple[float, int | None]]) -> dict[str, float | None]:
    """``{name: (seconds, peak)}`` -> ``{name: seconds, name_peak: peak}``."""
    return {key: value for name, (t, peak) in results.items() for key, value in ((name, t), (f"{name}_peak", peak))}


def crossover_table(device: torch.device | str, size: GpuSizes) -> tuple[Table, list[str], list[dict]]:
    table = Table("FFT long conv vs SDPA (flash), causal 1-D, fwd+bwd, bf16 inputs",
                  ["B", "L", "FFT conv ms", "SDPA ms", "SDPA/FFT", "Hyena layer ms", "attention layer ms", "A/H",
                   "peak mem H / A"])
    rows, notes = [], []
    for batch in size.batches:
        for length in size.lengths:
            r = {**_op_pair(device, batch, length, size), **_layer_pair(device, batch, length, size), "B": batch,
                 "L": length}
            rows.append(r)
            table.rows.append([batch, length, f"{1e3 * r['fft_conv']:.3f}", f"{1e3 * r['sdpa']:.3f}",
                               f"{r['sdpa'] / r['fft_conv']:.2f}", f"{1e3 * r['hyena_layer']:.3f}",
                               f"{1e3 * r['attention_layer']:.3f}", f"{r['attention_layer'] / r['hyena_layer']:.2f}",
                               f"{fmt_bytes(r['hyena_layer_peak'])} / {fmt_bytes(r['attention_layer_peak'])}"])
        mine = [r for r in rows if r["B"] == batch]
        lengths = [r["L"] for r in mine]
        notes.append(f"B={batch}: operator crossover (FFT conv, fp32 FFT inside, vs flash SDPA) "
                     f"{crossover(lengths, [r['sdpa'] / r['fft_conv'] for r in mine])} tokens; layer crossover "
                     f"{crossover(lengths, [r['attention_layer'] / r['hyena_layer'] for r in mine])} tokens; at "
                     f"L={lengths[-1]} attention/Hyena = {mine[-1]['attention_layer'] / mine[-1]['hyena_layer']:.1f}x "
                     "(layer).")
    table.notes.append(f"C={size.channels} channels: SDPA in heads of 64, Hyena with {size.heads} filter groups. "
                       "Small sizes are bound by kernel-launch latency (eager PyTorch, no CUDA graphs).")
    return table, notes, rows


def run_on(device: torch.device | str, size: GpuSizes) -> Section:
    """The whole GPU section on ``device`` (the CPU test runs it with tiny sizes)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    name += f", torch {torch.__version__}"
    rates = device_rates(device, size)
    rate_table = Table(f"Measured device rates ({name})", ["copy (read+write)", "bf16 matmul",
                       f"fp32 matmul (TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})"],
                       [[f"{rates['copy_bytes_per_s'] / 1e9:.0f} GB/s",
                         f"{rates['matmul_bf16_flop_per_s'] / 1e12:.1f} TFLOP/s",
                         f"{rates['matmul_fp32_flop_per_s'] / 1e12:.1f} TFLOP/s"]])
    layers, layer_data = layer_table(device, rates, size)
    layers.notes.append("B=1. FLOPs from flop_count (2 per MAC, FFT 2.5 N log2 N, training 3x forward). Eager traffic "
                        "= bytes read + written by every aten kernel (no fusion), compared with the copy rate. "
                        "The long conv runs its FFTs in fp32 under bf16 autocast.")
    cross, notes, cross_data = crossover_table(device, size)
    return Section(f"GPU ({name})", [rate_table, layers, cross], [], notes,
                   {"device": name, "rates": rates, "layers": layer_data, "crossover": cross_data})


def run(ctx: BenchContext) -> Section:
    if not torch.cuda.is_available():
        return Section("GPU", notes=["skipped: no CUDA device here (torch.cuda.is_available() is False); run "
                                     "`python launch/bench.py --sections gpu --out DIR` on a GPU machine"])
    return run_on("cuda", QUICK if ctx.quick else GpuSizes())
