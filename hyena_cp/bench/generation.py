"""Section ``gen``: decoding speed with the inference cache against naive recompute, and the
cache bytes each CP rank holds.

- Decode tokens/s (one process, `configs/hyena_lm_tiny.py`'s model with a longer context):
  after a prefill of ``context`` tokens, the median time of one cached decode step
  (`InferenceCache.step`: O(t * C) per Hyena layer) against one step of the naive loop that
  re-runs the full forward on the whole sequence (`generate_by_recompute`'s step: an FFT
  conv over t tokens per layer). Both stop at the logits (no sampling). Cached and naive
  steps alternate, so load from other jobs hits both alike.
- Cache bytes per rank at CP = 1, 2, 4 (gloo groups on this machine) for a hybrid "HA" model
  after a prefill: Hyena layers keep C/P channels of the ``z`` history, attention layers
  1/P of the keys and values; the target is 1/P of one process's bytes.
"""
from __future__ import annotations

import statistics
import time

import torch

from hyena_cp.bench.common import BenchContext, Section, Table, fmt_bytes, threads

__all__ = ["run", "decode_rates", "cache_bytes"]

WIDTH = dict(vocab_size=256, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4)


def _model(pattern: str, context: int):
    """The tiny LM of configs/hyena_lm_tiny.py with filters (max_len) as long as ``context``."""
    from hyena_cp.megatron import build_hyena_lm

    torch.manual_seed(0)
    hyena = dict(num_heads=4, short_kernel_size=3, filter_bands=8, filter_width=32, filter_depth=2, max_len=context)
    return build_hyena_lm(max_sequence_length=context, num_layers=len(pattern), layer_pattern=pattern,
                          hyena=hyena, **WIDTH).eval()


def decode_rates(group, contexts: list[int], steps: int, threads_used: int) -> list[dict]:
    """On a one-rank group: seconds per token, cached vs recompute, after ``context`` tokens."""
    from hyena_cp.megatron.generation import InferenceCache
    from hyena_cp.distributed.mesh import destroy_parallel, init_parallel

    groups = init_parallel(1, megatron=True)
    rows = []
    try:
        model = _model("HH", max(contexts) + steps)
        with threads(threads_used), torch.no_grad():
            for context in contexts:
                tokens = torch.randint(0, 256, (1, context + steps), generator=torch.Generator().manual_seed(0))
                cache = InferenceCache(model, batch_size=1, capacity=context + steps)
                cache.prefill(tokens[:, :context])
                cached, naive = [], []
                for i in range(steps):  # alternate, so that load from other jobs hits both alike
                    start = time.perf_counter()
                    cache.step(tokens[:, context + i:context + i + 1])
                    cached.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    model(tokens[:, :context + i + 1])[:, -1]
                    naive.append(time.perf_counter() - start)
                rows.append({"context": context, "cached_s": statistics.median(cached[1:]),
                             "naive_s": statistics.median(naive[1:])})
    finally:
        destroy_parallel(groups)
    return rows


def cache_bytes(group, context: int) -> dict[str, int]:
    """On every rank of ``group`` (CP = its size): this rank's cache bytes per layer kind after a prefill."""
    from hyena_cp.megatron.generation import InferenceCache
    from hyena_cp.modules.inference import HyenaCache
    from hyena_cp.parallel import group_rank, shard
    from hyena_cp.distributed.mesh import destroy_parallel, init_parallel

    groups = init_parallel(group.size(), megatron=True)
    try:
        model = _model("HA", context)
        tokens = torch.randint(0, 256, (1, context), generator=torch.Generator().manual_seed(0))
        cache = InferenceCache(model, batch_size=1, capacity=context)
        cache.prefill(shard(tokens, 1, "zigzag", group.size(), group_rank(groups.cp_group)))
        kinds = {"hyena": 0, "attention": 0}
        for layer in cache.layers:
            kinds["hyena" if isinstance(layer, HyenaCache) else "attention"] += layer.nbytes()
        return kinds
    finally:
        destroy_parallel(groups)


def run(ctx: BenchContext) -> Section:
    contexts, steps = ([64, 128], 3) if ctx.quick else ([1024, 4096, 16384], 9)
    bytes_context = 64 if ctx.quick else 4096
    (rates,) = ctx.pools.run(1, decode_rates, contexts, steps, ctx.threads)
    speed = Table("Decode tokens/s, one process (hidden 64, 2 Hyena layers, batch 1), after a prefill of the context",
                  ["context", "cached tok/s", "recompute tok/s", "cached / recompute"])
    for r in rates:
        r["speedup"] = r["naive_s"] / r["cached_s"]
        speed.rows.append([r["context"], f"{1 / r['cached_s']:.0f}", f"{1 / r['naive_s']:.1f}", f"{r['speedup']:.1f}x"])
    speed.notes.append(f"Medians of {steps - 1} steps after one warm-up, cached and recompute steps alternating. A "
                       "cached step is O(t * C) per Hyena layer (one dot product per channel over the z history); "
                       "recompute re-runs the FFT conv, filter MLP and every projection over all t tokens.")
    sizes = {world: ctx.pools.run(world, cache_bytes, bytes_context) for world in (1, 2, 4)}
    base = sum(sizes[1][0].values())
    memory = Table(f"Cache bytes per rank after a prefill of {bytes_context} tokens (hybrid 'HA', batch 1, fp32)",
                   ["CP", "Hyena layer / rank", "attention layer / rank", "total / rank", "x (1/P of one process)"])
    for world, ranks in sizes.items():
        worst = max(ranks, key=lambda r: sum(r.values()))
        total = sum(worst.values())
        memory.rows.append([world, fmt_bytes(worst["hyena"]), fmt_bytes(worst["attention"]), fmt_bytes(total),
                            f"{total * world / base:.3f}"])
    memory.notes.append("Largest rank shown. Hyena: the z history and short-conv inputs of C/P channels and the "
                        "filter taps of their groups; attention: the keys and values of the rank's zigzag shard "
                        "(decoded tokens are then assigned round robin).")
    return Section("Generation: cached decoding and cache memory", [speed, memory], [], [],
                   {"rates": rates, "bytes": {str(w): r for w, r in sizes.items()}})
