"""launch/bench.py: the --quick smoke run of every section (byte counts asserted exactly
against the floor and, for generation caches, against 1/P; timings never asserted), 1-D, 2-D and
3-D layers (3-D also causal time x circular space), the nvSubquadratic section with and without
the peer installed, the GPU section's code on CPU, and the measurement helpers on cases small
enough to count by hand."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from hyena_cp.bench import gpu
from hyena_cp.bench.layer import CAUSAL_TIME, comm_floor_bytes
from hyena_cp.bench.measure import TrafficCounter, peak_memory, saved_for_backward, timed_rounds
from hyena_cp.bench.ranks import RankFailure, RankPools
from hyena_cp.bench.scaling import crossover, extrapolate
from hyena_cp.modules.geometry import Geometry

ROOT = Path(__file__).resolve().parent.parent


def _bench_launcher():
    spec = importlib.util.spec_from_file_location("bench_launcher", ROOT / "launch" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_main():
    return _bench_launcher().main


def test_out_defaults_to_a_folder_of_its_own_for_quick_and_full_runs():
    parse = _bench_launcher().parse_args
    assert parse(["--quick"]).out == Path("outputs/bench_quick")
    assert parse([]).out == Path("outputs/bench")
    assert parse(["--quick", "--out", "x"]).out == Path("x")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    sections = _bench_main()(["--quick", "--out", str(out)])
    return out, {s.title: s for s in sections}


def test_quick_run_writes_every_section(quick_run):
    out, sections = quick_run
    text = (out / "bench.md").read_text()
    for title in ("Communication per rank", "Activation memory per rank", "Hyena vs attention (one process)",
                  "CP efficiency (CPU)", "Generation: cached decoding and cache memory"):
        assert f"## {title}" in text
    for plot in ("comm_bytes.png", "memory_per_rank.png", "scaling_1d.png", "scaling_2d.png", "scaling_3d.png"):
        assert (out / plot).stat().st_size > 0
    assert set(json.loads((out / "bench.json").read_text())) == set(sections)
    if not torch.cuda.is_available():
        assert any("skipped: no CUDA" in n for n in sections["GPU"].notes)


def test_quick_run_default_mode_sends_exactly_the_floor(quick_run):
    """The MEASURED bytes (c10d ops at the dispatcher) equal the floor formula, in exactly 4
    AllToAlls and one halo send (and receive) per neighbour forward and backward."""
    rows = quick_run[1]["Communication per rank"].data["rows"]
    default = [r for r in rows if r["mode"].startswith("default")]
    assert {(r["layer"], r["world"]) for r in default} == {(r["layer"], w) for r in default for w in (2, 4)}
    assert {len(r["shape"]) - 2 for r in default} == {1, 2, 3}
    assert any(tuple(r["boundaries"]) == CAUSAL_TIME for r in default)
    for r in default:
        world, geometry = r["world"], Geometry(tuple(r["boundaries"]))
        for rank in range(world):
            floor = comm_floor_bytes(tuple(r["shape"]), r["kernel"], world, rank, 4, geometry)
            assert r["measured"][rank] == floor, r
            p2p = 2 * geometry.halo_traffic(r["kernel"], world, rank)[0]  # one send and receive per peer and pass
            assert r["calls"][rank] == {"alltoall_base_": 4, "send": p2p, "recv_": p2p}, r
            assert r["counted_calls"][rank] == {"all_to_all": 4, "p2p": p2p}, r


def test_quick_run_floor_of_the_wrong_geometry_does_not_match(quick_run):
    """Negative twin: the causal video's measured bytes are NOT the floor of a linear volume of the same
    shape (its zigzag chunks exchange K-1 frames with each peer, rows blocks K//2), so the geometry the
    floor is computed for matters and the check above can fail."""
    rows = quick_run[1]["Communication per rank"].data["rows"]
    video = [r for r in rows if r["mode"].startswith("default") and tuple(r["boundaries"]) == CAUSAL_TIME]
    assert video
    for r in video:
        wrong = [comm_floor_bytes(tuple(r["shape"]), r["kernel"], r["world"], rank, 4) for rank in range(r["world"])]
        assert wrong != r["measured"], r


def test_quick_run_booked_bytes_equal_the_measured_ones(quick_run):
    """`count_comm`'s booking (what the unit tests assert) agrees with the dispatcher in every mode."""
    rows = quick_run[1]["Communication per rank"].data["rows"]
    assert {r["mode"].split(" ")[0] for r in rows} >= {"default", "q,k,v", "all-gather"}
    for r in rows:
        assert r["counted"] == r["measured"], r


def test_quick_run_comparison_modes_bytes(quick_run):
    """q,k,v swapping: 2x the AllToAll bytes of z, no halos; all-gather of z: P/2 x the
    AllToAll bytes (one all-gather forward, one reduce-scatter backward) plus the halos."""
    rows = quick_run[1]["Communication per rank"].data["rows"]
    for r in rows:
        world, shape = r["world"], tuple(r["shape"])
        tokens_local = math.prod(shape[1:-1]) // world
        a2a = 4 * shape[0] * tokens_local * shape[-1] * (world - 1) // world * 4  # float32 bytes
        halo = [f - a2a for f in r["floor"]]
        if "a2a" in r["mode"]:
            assert r["measured"] == [2 * a2a] * world, r
        elif "allgather" in r["mode"]:
            assert r["measured"] == [world * a2a // 2 + h for h in halo], r


def test_quick_run_memory_per_rank_meets_the_target(quick_run):
    """Byte counts are deterministic: the default layer's saved bytes per rank are within
    1.15/P of P=1, and with the filter MLP stored so is everything but the filter."""
    layers = quick_run[1]["Activation memory per rank"].data["layers"]
    assert any("ViT-5-Hyena tiny" in label for label in layers)
    assert any(label.count("x") == 2 and "stored" not in label for label in layers)  # a 3-D volume
    assert any("causal x circular x circular" in label for label in layers)  # causal time x periodic space
    for label, per_world in layers.items():
        if "ViT" in label:  # the nets also pad grid rows to a multiple of P
            continue
        base = per_world[1][0]
        base_rest = base["saved"] - base["parts"].get("hyena.filter", 0)
        for world, ranks in per_world.items():
            for r in ranks:
                assert r["saved"] - r["parts"].get("hyena.filter", 0) <= 1.15 * base_rest / world, (label, world)
                if "stored" not in label:  # the default recomputes the filter MLP in backward
                    assert r["parts"].get("hyena.filter", 0) == 0 and r["saved"] <= 1.15 * base["saved"] / world


def test_quick_run_fsdp_shards_params_grads_and_adamw(quick_run):
    """Byte counts are deterministic: FSDP2 holds <= 1.1/P of one process's parameters, gradients
    and AdamW state per rank; the replicated layout (ddp) holds all of it on every rank."""
    results = quick_run[1]["Parameter, gradient and optimizer memory per rank"].data["results"]
    assert any("LM" in label for label in results) and any("ViT" in label for label in results)
    for label, per_mode in results.items():
        base = per_mode["fsdp"][1]["local"]
        assert base == per_mode["fsdp"][1]["replicated"]  # one process: nothing sharded
        for world, r in per_mode["fsdp"].items():
            for key in ("params", "grads", "optimizer", "total"):
                assert r["local"][key] <= 1.1 * base[key] / world, (label, world, key)
            assert per_mode["ddp"][world]["local"] == base and r["replicated"] == base, (label, world)


def test_quick_run_generation_cache_bytes_are_one_over_p(quick_run):
    """Exactly 1/P per rank (deterministic byte counts; timings only need to exist)."""
    data = quick_run[1]["Generation: cached decoding and cache memory"].data
    base = sum(data["bytes"]["1"][0].values())
    assert set(data["bytes"]) == {"1", "2", "4"} and base > 0
    for world, ranks in data["bytes"].items():
        assert len(ranks) == int(world) and all(sum(r.values()) * int(world) == base for r in ranks), (world, ranks)
    assert all(r["cached_s"] > 0 and r["naive_s"] > 0 for r in data["rates"])


def test_quick_run_packing_section_times_every_document_count(quick_run):
    """Timings are never asserted: the section measured each count, as a ratio to the unpacked layer."""
    from hyena_cp.bench import packing

    section = quick_run[1]["Packed sequences (one process)"]
    rows = section.data["rows"]
    assert [r["documents"] for r in rows] == [1, 4]
    assert all(r["ratio"] > 0 and r["seconds"] > 0 and r["median_ratio"] > 0 for r in rows)
    assert all(len(r["times"]) == 2 and r["seconds"] == min(r["times"]) for r in rows)  # every round ran
    cu = packing.random_cu_seqlens(256, 4, seed=4)
    assert cu[0] == 0 and cu[-1] == 256 and len(cu) == 5 and (cu.diff() > 0).all()


def test_timed_rounds_caps_slow_warmups_only_when_asked():
    fns = {"a": lambda: None, "b": lambda: None}
    times, peaks = timed_rounds(fns, repeats=5, slow_s=-1.0)  # every warm-up counts as slow
    assert [len(t) for t in times.values()] == [3, 3] and set(peaks) == {"a", "b"}
    times, _ = timed_rounds(fns, repeats=5, slow_s=float("inf"))  # the packing section's choice
    assert [len(t) for t in times.values()] == [5, 5]


def test_gpu_section_code_paths_on_cpu():
    tiny = gpu.GpuSizes(copy_bytes=2**14, matmul_n=16, repeats=1, channels=8, heads=2, layers=((16,), (4, 4)),
                        lengths=(16, 32), batches=(1,))
    section = gpu.run_on("cpu", tiny)
    rates, layers, cross = section.tables
    assert all(v > 0 for v in section.data["rates"].values())
    assert len(layers.rows) == len(tiny.layers) * len(gpu.MODES) * 2  # fwd and fwd+bwd
    assert all(r["flop"] > 0 and r["bytes"] > 0 for r in section.data["layers"])
    assert len(cross.rows) == len(tiny.lengths) and "crossover" in section.notes[0]


def test_saved_for_backward_counts_each_storage_once_without_parameters():
    lin = nn.Linear(4, 6, bias=False)
    x = torch.randn(3, 4, requires_grad=True)

    def forward():
        q, k = lin(x).chunk(2, dim=-1)  # views of one [3, 6] storage
        return torch.sin(q) * torch.sin(k)

    total, parts, _ = saved_for_backward(lin, forward)
    # x (saved by the linear, attributed to it), the [3, 6] output once (q, k are its views),
    # sin(q) and sin(k) saved by the product; the weight is a parameter and not counted.
    assert parts == {"(mixer ops)": 3 * 4 * 4, "(outside)": (3 * 6 + 2 * 3 * 3) * 4}
    assert total == sum(parts.values())


def test_traffic_counter_counts_reads_and_writes_not_views():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with TrafficCounter() as counter:
        c = (a + b).t()
        c.sum()
    assert counter.bytes == 3 * a.nbytes + (a.nbytes + 4)  # add: 2 reads + 1 write; sum: read + scalar


def test_peak_memory_cpu_tracks_live_allocations():
    def step():
        a = torch.ones(2**18)  # 1 MiB of float32
        b = a + 1  # a and b live together: 2 MiB
        del a
        return b + 1  # b and b + 1: 2 MiB again, not 3

    peak = peak_memory(step)
    assert 2 * 2**20 <= peak < 2 * 2**20 + 4096


def test_crossover_interpolates_in_log_space():
    assert crossover([1000, 4000], [0.5, 2.0]) == "~2000"
    assert crossover([1000, 2000], [1.5, 3.0]).startswith("<= 1000")
    assert crossover([1000, 2000], [0.2, 0.5]).startswith("> 2000")


def _fail_on_rank_one(group) -> int:
    if group.rank() == 1:
        raise ValueError("planted failure")
    return group.rank()


def _rank_of(group) -> int:
    return group.rank()


def test_rank_pool_reports_a_failing_rank_and_recovers():
    with RankPools() as pools:
        with pytest.raises(RankFailure, match="planted failure"):
            pools.run(2, _fail_on_rank_one)
        assert pools.run(2, _rank_of) == [0, 1]


def test_reference_hyena_long_conv_equals_a_direct_causal_conv():
    from hyena_cp.bench.reference_hyena import fft_long_conv

    gen = torch.Generator().manual_seed(0)
    u, h, bias = (torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((2, 3, 17), (3, 17), (3,)))
    # y[t] = sum_{s <= t} h[s] u[t - s] + bias u[t], summed tap by tap
    direct = bias[:, None] * u
    for s in range(u.shape[-1]):
        direct[..., s:] += h[:, s, None] * u[..., :u.shape[-1] - s]
    torch.testing.assert_close(fft_long_conv(u, h, bias), direct, rtol=0, atol=1e-12)
    assert fft_long_conv(u.bfloat16(), h, bias).dtype == torch.bfloat16  # computed in fp32, returned in u's dtype


@pytest.mark.parametrize("order", [2, 3])
def test_reference_hyena_layer_is_causal(order):
    """Changing the inputs after t leaves every output up to t unchanged (float64: exactly, up to
    FFT rounding), and does change the later outputs."""
    from hyena_cp.bench.reference_hyena import ReferenceHyenaLayer

    torch.manual_seed(0)
    layer = ReferenceHyenaLayer(8, 32, order=order, filter_order=16).double()
    x = torch.randn(2, 32, 8, dtype=torch.float64)
    t = 12
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn(2, 32 - t - 1, 8, dtype=torch.float64)
    y, y2 = layer(x), layer(x2)
    assert y.shape == x.shape
    torch.testing.assert_close(y2[:, :t + 1], y[:, :t + 1], rtol=0, atol=1e-12)
    assert (y2[:, t + 1:] - y[:, t + 1:]).abs().amin(dim=-1).gt(1e-6).all()
    with pytest.raises(ValueError, match="l_max"):
        layer(torch.randn(1, 33, 8, dtype=torch.float64))


def test_speed_section_quick(tmp_path):
    """The speed section at quick sizes (compiled with aot_eager): every peer timed at every
    length, every ratio computed; timings are never asserted."""
    from hyena_cp.bench import BenchContext, speed

    section = speed.run(BenchContext(out=tmp_path, quick=True, threads=1, pools=None))
    ratios, times = section.tables
    assert [row[0] for row in ratios.rows] == [label for label, *_ in speed.RATIOS]
    assert [row[0] for row in times.rows] == list(speed.PEERS)
    lengths = section.data["lengths"]
    assert len(lengths) == 1 and len(ratios.columns) == len(lengths) + 2
    for r in section.data["results"]:
        assert set(r["times"]) == set(speed.PEERS)  # quick lengths are below SDPA_BF16_MAX_LEN
        assert all(len(t) == 2 and min(t) > 0 for t in r["times"].values())
        assert set(r["compile_s"]) == {"fp32", "bf16"} and r["compiled_rel_diff"] < 1e-5
    assert all(v > 0 for values in section.data["ratios"].values() for v in values)
    assert any(n.startswith(f"Targets at L={lengths[-1]}") for n in section.notes)
    assert any("ours compiled fp32:" in n for n in section.notes)


def test_quick_run_striped_section(quick_run):
    """StripedHyena 2: SE/MR/LI decode states do not grow with the context; the byte model's fit
    predicts held-out measurements; optimizer state is 16 bytes per parameter over the CP ranks."""
    section = quick_run[1]["StripedHyena 2 and HyenaDNA operators"]
    fixed = [r["cache_bytes"] for r in section.data["decode"] if r["pattern"] == "SDH"]
    assert len(fixed) >= 2 and len(set(fixed)) == 1
    assert section.data["fit_check"] < 0.1
    for row in section.data["memory"]:
        assert row["states"] == 16 * row["params"] // row["cp"]


def test_byte_model_gpu_check_code_path_on_cpu():
    """The GPU check of the byte model (run where CUDA is present), on the CPU at a tiny size: a row per
    layer kind and length, each with bytes measured and a model figure."""
    from types import SimpleNamespace

    from hyena_cp.bench.striped import gpu_check
    with RankPools() as pools:
        table, rows = gpu_check(SimpleNamespace(pools=pools), {k: (100.0, 0.0) for k in "SDHA"}, 32, [256], "cpu")
    assert [r["layer"] for r in rows] == ["S", "D", "H", "A", "core attention"] and len(table.rows) == 5
    assert all(r["measured"] > 0 and r["model"] > 0 for r in rows)


def worker_parameter_count() -> tuple[int, int]:
    import copy

    from megatron.core import parallel_state

    from hyena_cp import instantiate
    from hyena_cp.bench.striped import _parameters
    from hyena_cp.interop import evo2
    from striped_references import EVO2_TINY, random_evo2_checkpoint

    parallel_state.initialize_model_parallel()
    try:
        cfg, _ = evo2.convert(EVO2_TINY, random_evo2_checkpoint(EVO2_TINY))
        model = instantiate(copy.deepcopy(cfg))
        shape = dict(hidden=8, ffn=12, vocab=64, groups=4, heads=2, state=4, pattern=cfg["layer_pattern"])
        return sum(p.numel() for p in model.parameters()), _parameters(shape)
    finally:
        parallel_state.destroy_model_parallel()


def test_byte_model_counts_the_parameters_of_a_converted_evo2(dist_run):
    counted, formula = dist_run(worker_parameter_count, 1)[0]
    assert counted == formula


def test_quick_run_scaling_has_the_3d_volume_with_attention_extrapolated(quick_run):
    data = quick_run[1]["Hyena vs attention (one process)"].data["3d"]
    vol = data["volume"]
    assert vol["tokens"] > data["tokens"][-1] and vol["hyena"]["fb_s"] > 0
    assert vol["attention_extrapolated"]["fb_s"] == pytest.approx(
        data["results"][-1]["attention"]["fb_s"] * (vol["tokens"] / data["tokens"][-1]) ** 2)
    table = quick_run[1]["Hyena vs attention (one process)"].tables[-1]
    assert "extrapolated" in table.rows[-1][0] and table.rows[-1][3].startswith("~")


def test_extrapolate_is_quadratic_from_the_largest_size():
    seconds, slope = extrapolate([1000, 2000], [1.0, 4.0], 8000)
    assert seconds == pytest.approx(64.0) and slope == pytest.approx(2.0)
    assert extrapolate([1000, 2000], [1.0, 2.0], 4000)[1] == pytest.approx(1.0)


def test_quick_run_nvsub_section_says_how_to_install_the_peer_when_missing(quick_run):
    from hyena_cp.bench import peer

    section = quick_run[1][peer.TITLE]
    if peer.installed():
        assert section.data["installed"] and section.data["results"]
        return
    assert section.data == {"installed": False} and not section.tables
    assert any("pip install --no-deps nvsubquadratic==0.2.0" in n for n in section.notes)


def test_nvsub_section_without_the_peer_measures_nothing(tmp_path, monkeypatch):
    from hyena_cp.bench import BenchContext, peer

    monkeypatch.setattr(peer, "installed", lambda: False)
    section = peer.run(BenchContext(out=tmp_path, quick=True, threads=1, pools=None))
    assert not section.tables and len(section.notes) == 1 and peer.INSTALL in section.notes[0]


def test_nvsub_section_quick_with_the_peer(tmp_path):
    """With nvSubquadratic installed: the converted layer computes its function (asserted inside,
    to float32 round-off) and every ratio is measured; timings are never asserted."""
    pytest.importorskip("nvsubquadratic")
    from hyena_cp.bench import BenchContext, peer

    section = peer.run(BenchContext(out=tmp_path, quick=True, threads=1, pools=None))
    (r,) = section.data["results"]
    assert max(r["agreement"].values()) < peer.AGREE_TOL
    assert all(v > 0 for ratios in r["ratios"].values() for v in ratios.values())
    assert all(len(t["wall"]) == peer.sizes(True)[2] for t in r["times"].values())


def test_nvsub_agreement_check_fails_on_a_different_function():
    """Negative twin of the agreement check: a perturbed weight in ours is caught before timing."""
    pytest.importorskip("nvsubquadratic")
    from hyena_cp.bench import peer

    layers = peer.matched_layers(16, 8)
    x = torch.randn(1, 8, 8, 16)
    assert max(peer.agreement(layers["nvSubquadratic"], layers["ours"], x).values()) < peer.AGREE_TOL
    with torch.no_grad():
        layers["ours"].hyena.skip.mul_(1.5)
    with pytest.raises(ValueError, match="does not compute"):
        peer.agreement(layers["nvSubquadratic"], layers["ours"], x)
