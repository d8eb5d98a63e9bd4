"""Section ``striped``: the StripedHyena 2 (Evo 2) and HyenaDNA operators and models.

- Layer forward + backward on CPU, one process: the mixer with each filter — Hyena-SE (explicit
  FIR, K=7, direct conv), Hyena-MR (K=128, direct conv), Hyena-LI (modal, S=16, FFT), HyenaDNA's
  safari filter (FFT) and the original Hyena filter (FFT) — at the same width and length.
- The kernels' two forms side by side: direct convs as shifted taps vs blocked Toeplitz matmuls,
  the modal filter with one exponential per position vs factored exponentials.
- Decode tokens/s of a small Evo 2-shaped model (SE, MR, LI, and attention) after a prefill, the
  cached step (SE/MR: the last K-1 values of z; LI: the modal recurrence) against recomputing the
  whole sequence; and without attention, whose KV cache is the only part that grows.
- Embedding throughput (`hyena_cp.megatron.embeddings.hidden_states`) at CP = 1 and 2.
- Memory per rank of a 1B-shaped Evo 2 (Evo 2 1B's widths and layer pattern) at 1M tokens, from a
  byte model: bytes each layer saves for backward are MEASURED per rank at CP = 2 on two lengths
  (`measure.saved_for_backward`), fitted as ``D * (a * L / P + c)`` per layer kind (``c``: the halos;
  checked against one process and a wider model), and extrapolated; attention layers are counted as
  a flash kernel would store them (CPU SDPA stores the L x L scores); parameters, gradients and AdamW
  state are 16 bytes per parameter, sharded over the CP ranks by FSDP. With a GPU, the same per-layer
  bytes measured there, one process, against the model (`gpu_check`).
"""
from __future__ import annotations

import functools
import statistics
import time

import torch

from hyena_cp.bench.common import BenchContext, Section, Table, fmt_bytes, median_time, threads

__all__ = ["run", "layer_times", "kernel_forms", "decode_rates", "embed_rates", "layer_bytes", "evo2_1b_memory", "EVO2_1B"]

# Evo 2 1B (evo2-1b-8k.yml): hidden 1920, inner 5120, 25 layers, SE/MR groups 128, 15 heads, 16 poles
EVO2_1B = dict(hidden=1920, ffn=5120, vocab=512, groups=128, heads=15, state=16, pattern="SDHASDHSDHASDHSDHASDHSDHA")


def _filters(channels: int, length: int) -> dict[str, dict]:
    from hyena_cp.ops.explicit import ExplicitFilter
    from hyena_cp.ops.modal import ModalFilter
    from hyena_cp.ops.safari import SafariFilter

    groups = max(1, channels // 16)
    return {
        "SE: explicit FIR K=7 (direct)": dict(num_heads=groups, filter=functools.partial(ExplicitFilter, length=7),
                                             mask=None, skip=False),
        "MR: explicit FIR K=128 (direct)": dict(num_heads=groups, filter=functools.partial(ExplicitFilter, length=128),
                                               mask=None),
        "LI: modal S=16 (FFT)": dict(num_heads=channels, filter=functools.partial(ModalFilter, state_size=16),
                                     mask=None),
        "HyenaDNA: safari (FFT)": dict(num_heads=channels, mask=None, filter=functools.partial(
            SafariFilter, l_max=length, emb_dim=5, width=64, sin_freq=10.0, shift=0.05)),
        "Hyena: Fourier MLP (FFT)": dict(num_heads=8, filter_width=64, max_len=length),
    }


def layer_times(group, channels: int, length: int, repeats: int, threads_used: int) -> list[dict]:
    """One process: median seconds of one mixer forward + backward per filter (fp32, batch 1)."""
    from hyena_cp import Hyena, QKVSequenceMixer
    from hyena_cp.bench.layer import fwd_bwd

    rows = []
    with threads(threads_used):
        for name, kwargs in _filters(channels, length).items():
            torch.manual_seed(0)
            layer = QKVSequenceMixer(hidden_dim=channels, hyena=Hyena(hidden_dim=channels, **kwargs), norm=None)
            x = torch.randn(1, length, channels, requires_grad=True)
            seconds = median_time(lambda: fwd_bwd(layer, x), repeats=repeats)
            rows.append({"operator": name, "seconds": seconds, "flops": layer.flop_count(length)})
    return rows


def kernel_forms(group, channels: int, length: int, repeats: int, threads_used: int) -> list[dict]:
    """One process: median seconds of forward + backward of each operator's kernel in two forms, side
    by side: the direct causal conv of K taps as K shifted multiply-adds against blocked Toeplitz
    matmuls (`hyena_cp.ops.toeplitz_conv`), and the modal filter with one exponential per position
    against the factored exponentials (`hyena_cp.ops.modal`)."""
    from hyena_cp.ops import short_conv, toeplitz_conv
    from hyena_cp.ops.modal import modal_kernel

    def fir(forward, backward, kernel):
        x, weight = torch.randn(1, channels, length), torch.randn(channels, kernel)
        left = torch.randn(1, channels, kernel - 1)

        def step():
            y = forward(x, weight, None, left)
            backward(torch.ones_like(y), x, weight, left, True, True, True)
        return step

    def per_position(poles, residues):
        t = torch.arange(length, dtype=poles.dtype)
        return torch.einsum("gs,gsn->gn", residues, torch.exp(poles[:, :, None] * t))

    def modal(build):
        poles = (-torch.rand(channels, 16) * 0.1).requires_grad_()
        residues = torch.randn(channels, 16, requires_grad=True)
        return lambda: build(poles, residues).sum().backward()

    forms = [(f"direct conv, K={k}", "shifted taps", fir(short_conv._shifted_conv, short_conv._shifted_conv_backward, k),
              "blocked Toeplitz", fir(toeplitz_conv.blocked_causal_conv1d,
                                      toeplitz_conv.blocked_causal_conv1d_backward, k)) for k in (7, 16, 128)]
    forms.append(("modal filter, S=16", "exp per position", modal(per_position),
                  "factored exp", modal(lambda p, r: modal_kernel(p, r, length))))
    rows = []
    with threads(threads_used):
        for kernel, base_name, base, new_name, new in forms:
            times = {}
            for _ in range(2):  # alternating rounds, so load from other jobs hits both alike
                for name, fn in ((base_name, base), (new_name, new)):
                    times.setdefault(name, []).append(median_time(fn, repeats=repeats))
            rows.append({"kernel": kernel, "baseline": base_name, "baseline_s": min(times[base_name]),
                         "form": new_name, "form_s": min(times[new_name])})
    return rows


def _evo2_model(pattern: str, context: int, hidden: int = 64):
    """An Evo 2-shaped LM (Evo 2's operators and block, small widths)."""
    from hyena_cp.megatron import build_hyena_lm

    common = dict(short_kernel_size=3, bias=False, out_proj_bias=True)
    layers = {"S": dict(num_heads=hidden // 4, filter="explicit", filter_options={"length": 7}, skip=False, **common),
              "D": dict(num_heads=hidden // 4, filter="explicit", filter_options={"length": 128}, **common),
              "H": dict(num_heads=hidden, filter="modal", filter_options={"state_size": 16}, **common)}
    torch.manual_seed(0)
    return build_hyena_lm(vocab_size=512, max_sequence_length=context, num_layers=len(pattern), hidden_size=hidden,
                          ffn_hidden_size=8 * hidden // 3, num_attention_heads=4, layer_pattern=pattern,
                          hyena_layers={s: c for s, c in layers.items() if s in pattern}, block="evo2",
                          tie_embeddings=True,
                          config_overrides={"add_bias_linear": True, "add_qkv_bias": False}).eval()


def decode_rates(group, patterns: list[str], contexts: list[int], steps: int, threads_used: int) -> list[dict]:
    """One process: seconds per token, cached step vs full recompute, after ``context`` tokens."""
    from hyena_cp.megatron.generation import InferenceCache
    from hyena_cp.distributed.mesh import destroy_parallel, init_parallel

    groups = init_parallel(1, megatron=True)
    rows = []
    try:
        with threads(threads_used), torch.no_grad():
            for pattern in patterns:
                model = _evo2_model(pattern, max(contexts) + steps)
                for context in contexts:
                    tokens = torch.randint(0, 256, (1, context + steps), generator=torch.Generator().manual_seed(0))
                    cache = InferenceCache(model, batch_size=1, capacity=context + steps)
                    cache.prefill(tokens[:, :context])
                    cached, naive = [], []
                    for i in range(steps):  # alternating, so load from other jobs hits both alike
                        start = time.perf_counter()
                        cache.step(tokens[:, context + i:context + i + 1])
                        cached.append(time.perf_counter() - start)
                        start = time.perf_counter()
                        model(tokens[:, :context + i + 1])
                        naive.append(time.perf_counter() - start)
                    rows.append({"pattern": pattern, "context": context, "cached_s": statistics.median(cached[1:]),
                                 "naive_s": statistics.median(naive[1:]), "cache_bytes": cache.nbytes()})
    finally:
        destroy_parallel(groups)
    return rows


def embed_rates(group, length: int, repeats: int, hidden: int = 64) -> dict:
    """On every rank of ``group`` (CP = its size): seconds to embed one sequence of ``length`` tokens."""
    from hyena_cp.megatron.embeddings import hidden_states
    from hyena_cp.distributed.mesh import destroy_parallel, init_parallel

    groups = init_parallel(group.size(), megatron=True)
    try:
        model = _evo2_model("SDHA", length, hidden)
        ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))
        with threads(1):
            seconds = median_time(lambda: hidden_states(model, ids, [-1], "mean"), repeats=repeats)
        return {"seconds": seconds}
    finally:
        destroy_parallel(groups)


def layer_bytes(group, hidden: int, length: int, device: str = "cpu") -> dict[str, int]:
    """On every rank (CP = the group's size): bytes saved for backward per layer of an "SDHA" model,
    by layer kind (the attention layer without its core attention: counted analytically), with the
    model and tokens on ``device`` (one process on a GPU: `gpu_check`)."""
    from hyena_cp.bench.measure import saved_for_backward
    from hyena_cp.parallel import group_rank, shard
    from hyena_cp.distributed.mesh import destroy_parallel, init_parallel

    groups = init_parallel(group.size(), megatron=True)
    try:
        model = _evo2_model("SDHA", length, hidden).train().to(device)
        ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
        local = shard(ids, 1, "zigzag", group.size(), group_rank(groups.cp_group))

        def label(name: str) -> str:
            parts = name.split(".")
            if name.startswith("decoder.layers.") and len(parts) > 2:
                core = ".core_attention" in name
                return "core attention" if core else "SDHA"[int(parts[2])]
            return "other"

        _, parts, out = saved_for_backward(model, lambda: model(local, local), label)
        del out
        return parts
    finally:
        destroy_parallel(groups)


def _fit(at_length: dict[str, int], at_double: dict[str, int], hidden: int, length: int) -> dict[str, tuple[float, float]]:
    """Per layer kind, from CP=2 at L and 2L: bytes per rank = D * (a * L / P + c) — ``a`` per token and
    channel, ``c`` per channel for the halos (constant in L; none in one process)."""
    fits = {}
    for kind in "SDHA":
        a = 2 * (at_double[kind] - at_length[kind]) / (hidden * length)
        fits[kind] = (a, at_length[kind] / hidden - a * length / 2)
    return fits


def _predict(fit: tuple[float, float], hidden: int, length: int, world: int) -> float:
    return hidden * (fit[0] * length / world + (fit[1] if world > 1 else 0.0))


def _parameters(shape: dict) -> int:
    """Parameters of an Evo 2 of ``shape`` (tied embedding; SE/MR/LI/attention layers, Evo 2's biases)."""
    d, f = shape["hidden"], shape["ffn"]
    block = 2 * d + 3 * d * f  # two norms, gated MLP
    hyena = 3 * d * d + 9 * d + d * d + d  # in_proj, short conv, out_proj + bias
    per_kind = {"S": hyena + shape["groups"] * 7, "D": hyena + shape["groups"] * 128 + d,
                "H": hyena + 2 * d * shape["state"] + d, "A": 4 * d * d + d}
    return shape["vocab"] * d + d + sum(block + per_kind[k] for k in shape["pattern"])


def gpu_check(ctx: BenchContext, fits: dict[str, tuple[float, float]], hidden: int, lengths: list[int],
              device: str = "cuda") -> tuple[Table, list[dict]]:
    """The byte model against a GPU: bytes saved for backward per layer kind of the same model, one
    process on ``device`` (CUDA: flash attention), measured and predicted from the CPU fit."""
    table = Table(f"Byte model against one GPU (SDHA, hidden {hidden}, one process, fp32)",
                  ["L", "layer", "measured", "byte model", "measured / model"])
    rows = []
    for length in lengths:
        (got,) = ctx.pools.run(1, layer_bytes, hidden, length, device)
        flash = 4 * 4 * length * hidden  # a flash kernel in one process keeps q, k, v and its output (+ the lse)
        for kind, model in [*((k, _predict(fits[k], hidden, length, 1)) for k in "SDHA"), ("core attention", flash)]:
            rows.append({"length": length, "layer": kind, "measured": got.get(kind, 0), "model": model})
            table.rows.append([length, kind, fmt_bytes(got.get(kind, 0)), fmt_bytes(model),
                               f"{got.get(kind, 0) / model:.2f}"])
    table.notes.append("Measured with `measure.saved_for_backward` on the device (what autograd keeps, by layer); "
                       "the model's core-attention term is a flash kernel's q, k, v and output at 4 bytes.")
    return table, rows


def evo2_1b_memory(fits: dict[str, tuple[float, float]], worlds: list[int], length: int = 2 ** 20) -> list[dict]:
    """Per-rank bytes of training an Evo 2 1B-shaped model on one ``length``-token sequence (fp32)."""
    shape, itemsize = EVO2_1B, 4
    d = shape["hidden"]
    params = _parameters(shape)
    rows = []
    for world in worlds:
        activations = sum(_predict(fits[k], d, length, world) for k in shape["pattern"])
        # flash attention stores q, k, v, the output and the log-sum-exp of its shard, and the gathered K and V
        flash = shape["pattern"].count("A") * itemsize * (4 * length // world * d + 2 * length * d)
        states = 16 * params // world  # fp32 parameters, gradients, AdamW moments; FSDP over the CP ranks
        rows.append({"cp": world, "activations": activations + flash, "attention_core": flash, "states": states,
                     "total": activations + flash + states, "params": params})
    return rows


def run(ctx: BenchContext) -> Section:
    channels, length, repeats = (32, 512, 2) if ctx.quick else (256, 16384, 5)
    (times,) = ctx.pools.run(1, layer_times, channels, length, repeats, ctx.threads)
    base = next(r["seconds"] for r in times if r["operator"].startswith("Hyena:"))
    layers = Table(f"Layer forward + backward, one process (fp32, B=1, C={channels}, L={length})",
                   ["operator", "ms", "x Hyena (Fourier)", "forward GFLOP"])
    for r in times:
        layers.rows.append([r["operator"], f"{1e3 * r['seconds']:.1f}", f"{r['seconds'] / base:.2f}",
                            f"{r['flops'] / 3 / 1e9:.3f}"])
    layers.notes.append("SE/MR: C/16 filter groups, a direct causal conv of K taps (no FFT, no AllToAll under CP: "
                        "SE as K shifted multiply-adds, MR as blocked Toeplitz matmuls); LI and safari: one filter per "
                        "channel, FFT conv of 2L points.")
    (forms,) = ctx.pools.run(1, kernel_forms, channels, length, repeats, ctx.threads)
    kernels = Table(f"Kernel forms, forward + backward, one process (fp32, C={channels}, L={length})",
                    ["kernel", "baseline", "ms", "form used", "ms", "speed-up"])
    for r in forms:
        kernels.rows.append([r["kernel"], r["baseline"], f"{1e3 * r['baseline_s']:.1f}", r["form"],
                             f"{1e3 * r['form_s']:.1f}", f"{r['baseline_s'] / r['form_s']:.2f}x"])
    kernels.notes.append("The operators use the right-hand form: blocked Toeplitz matmuls from K >= 8 taps (SE, K=7, "
                         "keeps the shifted taps), the factored exponentials exp(λkm)exp(λn) for every modal filter.")
    contexts, steps = ([64, 160], 3) if ctx.quick else ([1024, 4096, 16384], 9)
    (rates,) = ctx.pools.run(1, decode_rates, ["SDH", "SDHA"], contexts, steps, ctx.threads)
    decode = Table("Decode tokens/s after a prefill of the context, one process (hidden 64, batch 1)",
                   ["layers", "context", "cached tok/s", "recompute tok/s", "cached / recompute", "cache bytes"])
    for r in rates:
        decode.rows.append([r["pattern"], r["context"], f"{1 / r['cached_s']:.0f}", f"{1 / r['naive_s']:.1f}",
                            f"{r['naive_s'] / r['cached_s']:.1f}x", fmt_bytes(r["cache_bytes"])])
    decode.notes.append("SE and MR keep the last K-1 values of z, LI its modal state (16 per channel): their step "
                        "costs the same at every context; only attention's KV cache grows (the SDHA rows).")
    embed_length, embed_hidden = (1024, 64) if ctx.quick else (16384, 256)
    embeds = {world: ctx.pools.run(world, embed_rates, embed_length, max(2, repeats // 2), embed_hidden)
              for world in (1, 2)}
    embedding = Table(f"Embedding throughput (Evo 2-shaped SDHA, hidden {embed_hidden}, one sequence of {embed_length} "
                      f"tokens)",
                      ["CP", "tokens/s", "x CP=1"])
    for world, ranks in embeds.items():
        seconds = max(r["seconds"] for r in ranks)
        embedding.rows.append([world, f"{embed_length / seconds:.0f}", f"{embeds[1][0]['seconds'] / seconds:.2f}"])
    embedding.notes.append("Each rank one thread (CP=2 uses the 2 cores CP=1 leaves half idle); mean-pooled final "
                           "norm output; the sequence is padded to what the CP group shards and cut back. The "
                           "attention layer's all-gathered keys and its c x (i+1)c scores per zigzag chunk i keep "
                           "CP=2 below 2x.")
    hidden, fit_len = (32, 512) if ctx.quick else (64, 2048)
    fits = _fit(ctx.pools.run(2, layer_bytes, hidden, fit_len)[0], ctx.pools.run(2, layer_bytes, hidden, 2 * fit_len)[0],
                hidden, fit_len)
    checks = {(1, hidden): ctx.pools.run(1, layer_bytes, hidden, fit_len)[0],  # one process: no halo
              (2, 2 * hidden): ctx.pools.run(2, layer_bytes, 2 * hidden, fit_len)[0]}
    worst = max(abs(_predict(fits[k], width, fit_len, world) / got[k] - 1)
                for (world, width), got in checks.items() for k in "SDHA")
    memory = Table("Evo 2 1B-shaped model (hidden 1920, inner 5120, 25 layers SDHA..., fp32) at 1M tokens: "
                   "memory per rank, byte model",
                   ["CP", "activations", "of which attention cores", "params + grads + AdamW", "total"])
    for r in evo2_1b_memory(fits, [8, 16, 32, 64]):
        memory.rows.append([r["cp"], fmt_bytes(r["activations"]), fmt_bytes(r["attention_core"]),
                            fmt_bytes(r["states"]), fmt_bytes(r["total"])])
    memory.notes.append(f"Saved-for-backward bytes measured per rank at CP=2 (hidden {hidden}, L={fit_len} and "
                        f"{2 * fit_len}) and fitted as D*(a*L/P + c) per layer kind (c: the halos); the fit predicts one "
                        f"process and a 2x wider model within {100 * worst:.1f}%. Attention's core counted as a flash "
                        "kernel at 1M tokens (its shard's q, k, v, output, plus the all-gathered K and V); fp32 "
                        "(bf16 halves most of it). Measure it on a GPU for the real figure.")
    tables, on_gpu = [layers, kernels, decode, embedding, memory], []
    if torch.cuda.is_available() and not ctx.quick:
        table, on_gpu = gpu_check(ctx, fits, 256, [16384, 65536])
        tables.append(table)
    else:
        memory.notes.append("No CUDA device: on one, this section also measures the byte model against the GPU.")
    data = {"layers": times, "kernel_forms": forms, "gpu_check": on_gpu, "decode": rates, "embed": {str(w): r for w, r in embeds.items()},
            "fits": {k: list(v) for k, v in fits.items()}, "fit_check": worst,
            "memory": evo2_1b_memory(fits, [8, 16, 32, 64])}
    return Section("StripedHyena 2 and HyenaDNA operators", tables, [], [], data)
