"""Section ``nvsub``: our 2-D (and 3-D) layer against nvSubquadratic's torch path at a matched function.

The function is nvSubquadratic 0.2.0's ViT-5 gated Hyena recipe mixer (`recipe`: SIREN kernel per
channel, SiLU inner and Sigmoid outer gates, L2 QK-norm, RMSNorm before the long conv and at the
output, zero-padded "double" grid, 3x3 depthwise short conv, no biases). It is built by
nvSubquadratic itself, converted with `hyena_cp.interop.nvsubquadratic.convert` and loaded into ours,
so both compute the same function: the outputs and input gradients are checked to agree to float32
round-off before anything is timed. Then forward + backward of ``sum(y)``, fp32, B=1, one process,
the two layers' calls alternating (`timed_rounds`); the result is the median over rounds of
theirs / ours (> 1: ours faster). Ours with the default Fourier-MLP filter, one per channel
(``num_heads=C``), is timed in the same rounds for context (not the same function), and so is ours
with the spectral kernel path (``spectral_kernel=True``: the kernel's spectrum from the SIREN's 32
features instead of the kernel built and transformed per channel), its speed at a matched function.

nvSubquadratic is imported only here and only when installed; the project never depends on it.
Without it the section says how to install it (`INSTALL`) and measures nothing.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import hyena_cp
from hyena_cp.bench.common import BenchContext, Section, Table, fmt_bytes, threads
from hyena_cp.bench.measure import saved_for_backward
from hyena_cp.interop.nvsubquadratic import convert

__all__ = ["run", "recipe", "matched_layers", "agreement", "INSTALL", "AGREE_TOL"]

PEER, PEER_VERSION = "nvsubquadratic", "0.2.0"
# its metadata pins packages it does not import on this path (torchvision, lightning, wandb, ...)
INSTALL = "pip install --no-deps nvsubquadratic==0.2.0 einops omegaconf"
# float32 round-off of the same function computed in two orders: the FFT convs (~1e-7 x log2 of
# the grid), the norms and the gates give ~1e-6 relative; an indexing or conversion bug is O(1)
AGREE_TOL = 1e-4
TITLE = "nvSubquadratic at a matched function (one process)"
SPECTRAL = "ours, spectral kernel"


def installed() -> bool:
    return importlib.util.find_spec(PEER) is not None


def recipe(channels: int, grid: int | tuple[int, ...]) -> dict[str, Any]:
    """nvSubquadratic's ViT-5 gated Hyena mixer (``examples/vit5_imagenet/v2/*hyena*gated*``, 12 blocks)
    for a ``grid x grid`` patch grid (or a grid of the given sizes: 3-D, the same recipe on a volume) of
    ``channels`` channels, as its config node in plain data."""
    size = (grid, grid) if isinstance(grid, int) else tuple(grid)
    dims = len(size)
    init = importlib.import_module(f"{PEER}.utils.init")
    rms = {"__target__": f"{PEER}.modules.rms_norm.RMSNorm", "dim": channels, "eps": 1e-6}
    siren = {"__target__": f"{PEER}.modules.kernels_nd.SIRENKernelND", "out_dim": channels, "data_dim": dims,
             "mlp_hidden_dim": 32, "num_layers": 3, "embedding_dim": 32, "omega_0": 10.0, "L_cache": list(size),
             "use_bias": True, "hidden_omega_0": 1.0}
    conv = {"__target__": f"{PEER}.modules.ckconv_nd.CKConvND", "data_dim": dims, "hidden_dim": channels,
            "kernel_cfg": siren, "mask_cfg": {"__target__": "torch.nn.modules.linear.Identity"},
            "grid_type": "double", "fft_padding": "zero"}
    short = {"__target__": f"torch.nn.modules.conv.Conv{dims}d", "in_channels": 3 * channels, "out_channels": 3 * channels,
             "kernel_size": 3, "groups": 3 * channels, "bias": False, "padding": 1}
    hyena = {"__target__": f"{PEER}.modules.hyena_nd.Hyena", "global_conv_cfg": conv, "short_conv_cfg": short,
             "gate_nonlinear_cfg": {"__target__": "torch.nn.modules.activation.SiLU"},
             "gate_nonlinear_2_cfg": {"__target__": "torch.nn.modules.activation.Sigmoid"},
             "pixelhyena_norm_cfg": rms, "output_norm_cfg": dict(rms),
             "qk_norm_cfg": {"__target__": f"{PEER}.utils.qk_norm.L2Norm"}}
    return {"__target__": f"{PEER}.modules.sequence_mixer.QKVSequenceMixer", "hidden_dim": channels,
            "mixer_cfg": hyena, "init_method_in": init.small_init,
            "init_method_out": {"__target__": f"{PEER}.utils.init.partial_wang_init_fn_with_num_layers",
                                "num_layers": 12}}


def matched_layers(channels: int, grid: int | tuple[int, ...], seed: int = 0) -> dict[str, nn.Module]:
    """``{"nvSubquadratic": theirs, "ours": converted, "ours, spectral kernel": the same with
    ``spectral_kernel=True``, "ours, Fourier-MLP filter": context}``: theirs built by nvSubquadratic
    from `recipe`, ours from ``convert`` of the same config and its state_dict."""
    torch.manual_seed(seed)
    cfg = recipe(channels, grid)
    theirs = importlib.import_module(f"{PEER}.lazy_config").instantiate(cfg)
    ours_cfg, state = convert(cfg, theirs.state_dict())
    ours = hyena_cp.instantiate(ours_cfg)
    ours.load_state_dict(state)
    spectral = copy.deepcopy(ours)
    spectral.hyena.spectral_kernel = True
    ours_cfg.hyena.filter, ours_cfg.hyena.num_heads = None, channels  # the default generator, per channel
    fourier = hyena_cp.instantiate(ours_cfg)
    return {"nvSubquadratic": theirs, "ours": ours, SPECTRAL: spectral, "ours, Fourier-MLP filter": fourier}


def _output_and_grad(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    return y.detach(), x.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def agreement(theirs: nn.Module, ours: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Relative (norm-wise) differences of the outputs and of the input gradients; ``ValueError``
    above `AGREE_TOL` (then the two do not compute the same function and timing them means nothing)."""
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (y_t, g_t), (y_o, g_o) = _output_and_grad(theirs, x, grad), _output_and_grad(ours, x, grad)
    diffs = {"output": _rel(y_o, y_t), "input grad": _rel(g_o, g_t)}
    if max(diffs.values()) > AGREE_TOL:
        raise ValueError(f"the converted layer does not compute nvSubquadratic's function: {diffs} > {AGREE_TOL}")
    return diffs


def _step(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x.detach().requires_grad_(True)).sum().backward()
    return call


def timed(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Wall and process CPU seconds of every call, the callables alternating, after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def _ratio(times: dict, num: str, den: str, clock: str = "wall") -> float:
    """Median over rounds of ``num``'s time / ``den``'s time (> 1: ``den`` faster)."""
    return statistics.median(a / b for a, b in zip(times[num][clock], times[den][clock]))


def measure(channels: int, grid: int | tuple[int, ...], rounds: int) -> dict[str, Any]:
    """One size: agreement (ours by either kernel path), per-call times, ratios and saved-for-backward bytes."""
    size = (grid, grid) if isinstance(grid, int) else tuple(grid)
    layers = matched_layers(channels, size)
    x = torch.randn(1, *size, channels, generator=torch.Generator().manual_seed(1))
    agree = agreement(layers["nvSubquadratic"], layers["ours"], x)
    agree_spectral = agreement(layers["nvSubquadratic"], layers[SPECTRAL], x)
    agree = {name: max(agree[name], agree_spectral[name]) for name in agree}
    times = timed({name: _step(layer, x) for name, layer in layers.items()}, rounds)
    saved = {}
    for name, layer in layers.items():
        saved[name], _, y = saved_for_backward(layer, lambda: layer(x.detach().requires_grad_(True)))
        del y
    ratios = {name: {clock: _ratio(times, "nvSubquadratic", name, clock) for clock in ("wall", "cpu")}
              for name in layers if name != "nvSubquadratic"}
    ratios["spectral"] = {clock: _ratio(times, "ours", SPECTRAL, clock) for clock in ("wall", "cpu")}
    hyena = layers[SPECTRAL].hyena
    if not hyena.use_spectral(slice(0, hyena.num_heads)) or layers["ours"].hyena.use_spectral(slice(0, hyena.num_heads)):
        raise ValueError("the two kernel paths timed are not the kernel path and the spectral path")
    return {"grid": "x".join(map(str, size)), "channels": channels, "agreement": agree, "times": times,
            "ratios": ratios, "saved": saved}


def sizes(quick: bool) -> tuple[list[int | tuple[int, ...]], int, int]:
    """``(grids, channels, rounds)``."""
    return ([8], 16, 2) if quick else ([64, 128, (8, 32, 32)], 256, 7)


def _table(results: list[dict], threads_used: int) -> Table:
    table = Table("Our mixer vs nvSubquadratic's, the same function (forward + backward, fp32, B=1)",
                  ["grid", "C", "max rel. diff (out / input grad)", "ms theirs / ours / ours spectral",
                   "theirs / ours", "theirs / ours (CPU time)", "theirs / ours spectral",
                   "ours / ours spectral", "ms ours, Fourier-MLP", "theirs / ours Fourier-MLP",
                   "saved theirs / ours"])
    for r in results:
        med = {name: 1e3 * statistics.median(t["wall"]) for name, t in r["times"].items()}
        table.rows.append([r["grid"], r["channels"],
                           f"{r['agreement']['output']:.1e} / {r['agreement']['input grad']:.1e}",
                           f"{med['nvSubquadratic']:.0f} / {med['ours']:.0f} / {med[SPECTRAL]:.0f}",
                           f"{r['ratios']['ours']['wall']:.2f}", f"{r['ratios']['ours']['cpu']:.2f}",
                           f"{r['ratios'][SPECTRAL]['wall']:.2f}",
                           f"{r['ratios']['spectral']['wall']:.2f}", f"{med['ours, Fourier-MLP filter']:.0f}",
                           f"{r['ratios']['ours, Fourier-MLP filter']['wall']:.2f}",
                           f"{fmt_bytes(r['saved']['nvSubquadratic'])} / {fmt_bytes(r['saved']['ours'])}"])
    table.notes.append(
        f"nvSubquadratic {PEER_VERSION}'s ViT-5 gated Hyena mixer (SIREN kernel per channel, SiLU / Sigmoid gates, L2 "
        f"QK-norm, RMSNorm before the long conv and at the output; a 3-D grid: the same recipe with data_dim=3), converted "
        f"by hyena_cp.interop.nvsubquadratic.convert (its defaults, e.g. checkpoint_filter=True); "
        f"torch.set_num_threads({threads_used}). theirs / ours: median over rounds of the two calls' wall times, timed "
        "alternately (> 1: ours faster); CPU time: the same with process CPU seconds (all threads), less sensitive to "
        "other jobs on the machine. ours spectral: the same layer with spectral_kernel=True (the kernel's spectrum from "
        "the SIREN's features, not the kernel built and transformed per channel), timed in the same rounds; ours / ours "
        "spectral: their ratio (> 1: the spectral path faster). Fourier-MLP: ours with the default filter generator, one "
        "per channel (num_heads=C) - context, not the same function. saved: bytes autograd keeps for backward.")
    return table


def run(ctx: BenchContext) -> Section:
    if not installed():
        return Section(TITLE, notes=[f"nvSubquadratic is not installed, nothing measured; install it with: {INSTALL}"],
                       data={"installed": False})
    grids, channels, rounds = sizes(ctx.quick)
    with threads(ctx.threads):
        results = [measure(channels, grid, rounds) for grid in grids]
    section = Section(TITLE, [_table(results, ctx.threads)], data={"installed": True, "results": results})
    for r in results:
        section.notes.append(f"{r['grid']}, C={r['channels']}: ours is {r['ratios']['ours']['wall']:.2f}x "
                             f"nvSubquadratic's speed (wall time; {r['ratios']['ours']['cpu']:.2f}x in CPU time), "
                             f"computing its function to {max(r['agreement'].values()):.0e}.")
    return section
