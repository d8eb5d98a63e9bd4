"""Section 1: bytes each rank sends for one mixer layer forward + backward, MEASURED at the
dispatcher (`CollectiveCounter`: every c10d op and the tensors it gets) and booked by
`hyena_cp.parallel.count_comm`, against the floor formula (4 AllToAlls of z + halos,
`comm_floor_bytes`) and the two comparison modes (q, k, v swapped separately; all-gather of z)."""
from __future__ import annotations

import dataclasses

from hyena_cp.bench.common import BenchContext, Section, Table, fmt_bytes
from hyena_cp.bench.layer import (CAUSAL_TIME, LayerSpec, build_layer, comm_floor_bytes, fwd_bwd, local_input,
                                  ring_attention_bytes)
from hyena_cp.bench.measure import CollectiveCounter
from hyena_cp.bench.report import bar_plot
from hyena_cp.parallel import agreed, count_comm

__all__ = ["run", "MODES", "layer_specs"]

# label -> LayerSpec fields of the mode
MODES = {
    "default (halo + AllToAll of z)": {},
    "q,k,v swapped (short_conv_cp='a2a')": {"short_conv_cp": "a2a"},
    "all-gather of z (cp_comm='allgather')": {"cp_comm": "allgather"},
}
WORLDS = (2, 4)
ITEMSIZE = 4  # float32


def layer_specs(quick: bool) -> list[LayerSpec]:
    """1-D, 2-D and 3-D layers (3-D: linear, and causal time x circular space); byte counts are
    exact at any size, the full run uses D=256."""
    if quick:
        return [LayerSpec((64,), channels=16, heads=4), LayerSpec((8, 4), channels=16, heads=4),
                LayerSpec((8, 4, 4), channels=16, heads=4), LayerSpec((16, 4, 4), channels=16, heads=4,
                                                                       boundary=CAUSAL_TIME)]
    return [LayerSpec((4096,)), LayerSpec((64, 64)), LayerSpec((16, 32, 32)),
            LayerSpec((16, 32, 32), boundary=CAUSAL_TIME)]


def rank_bytes(group, spec: LayerSpec) -> dict:
    """On one rank, one forward + backward of ``spec``: ``bytes`` / ``by_op`` / ``calls`` measured
    at the dispatcher (c10d op names), ``counted`` / ``counted_calls`` as `count_comm` books them.
    The cross-rank agreement check is skipped (`agreed`, as inside the ViT nets): one all-gather
    of < 1 KiB of control traffic per forward, not part of the layer's data."""
    layer = build_layer(spec)
    x = local_input(spec, group)
    with agreed(group), count_comm() as stats, CollectiveCounter() as wire:
        fwd_bwd(layer, x, group)
    return {"bytes": sum(wire.sent.values()), "by_op": dict(wire.sent), "calls": dict(wire.calls),
            "counted": stats.bytes_sent, "counted_calls": dict(stats.calls)}


def _row(spec: LayerSpec, world: int, mode: str, measured: list[dict], floor: list[int]) -> list:
    per_rank = [m["bytes"] for m in measured]
    ops: dict[str, int] = {}
    for m in measured:
        for op, n in m["by_op"].items():
            ops[op] = max(ops.get(op, 0), n)
    return [spec.label(), world, mode, fmt_bytes(max(per_rank)), fmt_bytes(max(floor)),
            f"{sum(per_rank) / sum(floor):.2f}", ", ".join(f"{op} {fmt_bytes(n)}" for op, n in sorted(ops.items()))]


def run(ctx: BenchContext) -> Section:
    table = Table("Bytes sent per rank, one layer forward + backward (float32)",
                  ["layer", "P", "mode", "bytes/rank (max)", "floor/rank (max)", "measured/floor", "by op (max rank)"])
    data, ratios, groups = [], {mode: [] for mode in MODES}, []
    for base in layer_specs(ctx.quick):
        for world in WORLDS:
            floor = [comm_floor_bytes(base.shape, base.kernel, world, r, ITEMSIZE, base.geometry) for r in range(world)]
            groups.append(f"{base.kind()} P={world}")
            for mode, fields in MODES.items():
                spec = dataclasses.replace(base, **fields)
                measured = ctx.pools.run(world, rank_bytes, spec)
                table.rows.append(_row(spec, world, mode, measured, floor))
                ratios[mode].append(sum(m["bytes"] for m in measured) / sum(floor))
                data.append({"layer": spec.label(), "shape": list(base.shape), "kernel": base.kernel, "world": world,
                             "boundaries": list(base.geometry.boundaries),
                             "mode": mode, "measured": [m["bytes"] for m in measured], "floor": floor,
                             "calls": [m["calls"] for m in measured], "counted": [m["counted"] for m in measured],
                             "counted_calls": [m["counted_calls"] for m in measured]})
            ring = ring_attention_bytes(base.shape, world, ITEMSIZE)
            table.rows.append([base.label(), world, "ring attention (analytic, K/V + grads, not run)", fmt_bytes(ring),
                               fmt_bytes(max(floor)), f"{ring / max(floor):.2f}", "p2p"])
    b, c = layer_specs(ctx.quick)[0].batch, layer_specs(ctx.quick)[0].channels
    table.notes.append(f"B={b}, C={c}, K=3; floor = 4 AllToAlls of B*(tokens/P)*C*(P-1)/P elements + short-conv "
                       "halos of 3C channels (forward values, backward gradients), a formula. Measured: the bytes each rank "
                       "hands to torch.distributed for other ranks, from the tensors of every c10d op seen at the "
                       "dispatcher (AllToAll: the blocks for other ranks; sends; ring all-gather / reduce-scatter), "
                       "not the backend's wire protocol. measured/floor is the sum over ranks of the measured bytes "
                       "over the sum of the floors; `count_comm`'s own booking is checked equal to it in "
                       "tests/test_bench.py.")
    plot = bar_plot(ctx.out / "comm_bytes.png", "Bytes per rank relative to the floor", "measured / floor", groups,
                    ratios)
    notes = [f"{mode}: measured/floor {min(r):.2f} to {max(r):.2f} over the layers and P above."
             for mode, r in ratios.items()]
    notes.append("The all-gather baseline also repeats the long conv of all C channels on every rank (P x the work).")
    return Section("Communication per rank", [table], [plot], notes, {"rows": data})
