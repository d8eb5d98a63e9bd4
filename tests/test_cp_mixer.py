"""Context-parallel QKVSequenceMixer == single process: outputs, input grads, every
parameter grad (summed over the CP group), for 1-D zigzag, 2-D row blocks and 3-D frame
blocks, with causal, linear, circular and mixed boundaries; and the
communication of one layer: per-op calls and bytes, both as `count_comm` books them and as
measured at the dispatcher (`CollectiveCounter`), against the floor formula."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist

from hyena_cp import Hyena, QKVSequenceMixer
from hyena_cp.modules import norm as norm_module
from hyena_cp.ops.explicit import ExplicitFilter
from hyena_cp.ops.masks import AxisExponentialMask, GaussianMask
from hyena_cp.ops.modal import ModalFilter
from hyena_cp.ops.safari import SafariFilter
from hyena_cp.ops.siren import RandomFourierFilter, SirenFilter
from hyena_cp.modules import geometry as geometry_module
from hyena_cp.modules.geometry import Geometry
from hyena_cp.bench.layer import comm_floor_bytes
from hyena_cp.bench.measure import CollectiveCounter
from hyena_cp.parallel import count_comm, shard, unshard
from references import rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass(frozen=True)
class Case:
    dims: int
    shape: tuple  # global x shape, channels last
    kernel: int = 3
    heads: int = 4
    dtype: torch.dtype = torch.float64
    mode: str = "halo"
    cp_comm: str = "alltoall"
    cond: str | None = None
    norm: str | None = "layernorm"
    num_valid: int | None = None
    worlds: tuple = (1, 2, 4)
    boundary: str | tuple | None = None
    hyena: tuple = ()  # (key, value) pairs of further Hyena arguments
    mixer: tuple = ()  # ... and of QKVSequenceMixer arguments
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def geometry(self) -> Geometry:
        return Geometry.of(self.dims, self.boundary)


CASES = {
    "1d_k3": Case(1, (2, 48, 8)),
    "1d_k7_adaln": Case(1, (2, 48, 8), kernel=7, cond="adaln"),
    "1d_k4_fp32_film": Case(1, (2, 48, 8), kernel=4, dtype=torch.float32, cond="film"),
    "1d_k5_a2a": Case(1, (2, 48, 8), kernel=5, mode="a2a", norm="rmsnorm"),
    "1d_k1_fp32": Case(1, (1, 16, 8), kernel=1, dtype=torch.float32),
    "1d_k6_heads8": Case(1, (1, 48, 8), kernel=6, heads=8),
    "1d_p3": Case(1, (2, 36, 12), heads=6, worlds=(3,)),
    "2d_k3": Case(2, (2, 8, 5, 8)),
    "2d_k5_fp32_film": Case(2, (2, 8, 6, 8), kernel=5, dtype=torch.float32, cond="film"),
    "2d_k7_rms": Case(2, (1, 12, 7, 8), kernel=7, norm="rmsnorm"),
    "2d_k3_a2a_adaln": Case(2, (2, 8, 5, 8), mode="a2a", cond="adaln"),
    "2d_k5_padding": Case(2, (2, 8, 6, 8), kernel=5, num_valid=37),
    "2d_a2a_padding_fp32": Case(2, (2, 8, 6, 8), mode="a2a", num_valid=41, dtype=torch.float32),
    "2d_p3": Case(2, (2, 9, 4, 12), heads=6, worlds=(3,)),
    "1d_allgather": Case(1, (2, 48, 8), cp_comm="allgather"),
    "2d_allgather_fp32": Case(2, (2, 8, 5, 8), cp_comm="allgather", dtype=torch.float32),
    "1d_circular": Case(1, (2, 16, 8), boundary="circular", kernel=5),
    "1d_linear_fp32": Case(1, (1, 16, 8), boundary="linear", dtype=torch.float32),
    "2d_circular": Case(2, (2, 8, 5, 8), boundary="circular"),
    "2d_circular_x_linear_k5": Case(2, (1, 8, 6, 8), boundary=("circular", "linear"), kernel=5, norm="rmsnorm"),
    "2d_causal_zigzag": Case(2, (2, 16, 5, 8), boundary=("causal", "linear")),
    "3d_k3": Case(3, (2, 8, 3, 4, 8)),
    "3d_causal_x_circular_fp32_film": Case(3, (1, 16, 4, 3, 8), boundary=("causal", "circular", "circular"),
                                           dtype=torch.float32, cond="film"),
    "3d_circular_padding": Case(3, (1, 4, 3, 4, 8), boundary="circular", num_valid=40, worlds=(2, 4)),
    "3d_a2a_mixed": Case(3, (1, 4, 3, 3, 8), boundary=("circular", "linear", "circular"), mode="a2a", worlds=(2, 4)),
    "3d_allgather": Case(3, (1, 4, 2, 3, 8), cp_comm="allgather", worlds=(2,)),
    # the operator family: generators, masks, gates and norms
    "2d_vit_recipe": Case(2, (2, 8, 5, 8), heads=8, norm="rmsnorm", hyena=(
        ("filter", functools.partial(SirenFilter, L_cache=(8, 5))), ("mask", None), ("inner_gate", "silu"),
        ("outer_gate", "sigmoid"), ("qk_norm", "l2"), ("conv_norm", "rmsnorm"), ("norm_eps", 1e-6)),
        mixer=(("bias", False), ("norm_eps", 1e-6))),
    "2d_film_siren_circular_gauss": Case(2, (2, 8, 7, 8), boundary="circular", hyena=(
        ("filter", functools.partial(SirenFilter, L_cache=(4, 4), cond_dim=5, film_after_embedding=True,
                                     film_init="small_random", film_init_std=0.3)),
        ("mask", functools.partial(GaussianMask, grid_step=1 / 3)), ("inner_gate", "silu")),
        mixer=(("short_conv_boundary", "linear"),)),
    "3d_groupnorm_rff_padding": Case(3, (1, 8, 3, 4, 8), num_valid=80, hyena=(
        ("filter", functools.partial(RandomFourierFilter, L_cache=8, omega_0=1.0)), ("mask", AxisExponentialMask),
        ("qk_norm", "rmsnorm"), ("conv_norm", "groupnorm"), ("conv_norm_groups", 2))),
    "1d_siren_gates_no_short_conv_fp32": Case(1, (2, 32, 8), kernel=None, dtype=torch.float32, hyena=(
        ("filter", functools.partial(SirenFilter, L_cache=64, num_blocks=2, learnable_omega=True)),
        ("outer_gate", "silu"), ("inner_gate", "sigmoid"), ("skip", False))),
    # the spectral kernel path (a rank transforms the features of the full grid, then takes its groups)
    "2d_spectral_fourier_causal_x_circular": Case(2, (2, 16, 6, 8), boundary=("causal", "circular"), hyena=(
        ("mask", None), ("spectral_kernel", True))),
    "2d_spectral_film_siren_fp32": Case(2, (2, 8, 5, 8), boundary=("linear", "circular"), dtype=torch.float32, hyena=(
        ("filter", functools.partial(SirenFilter, L_cache=(4, 4), cond_dim=5, film_init="small_random",
                                     film_init_std=0.3)), ("mask", None), ("spectral_kernel", True))),
    "3d_spectral_siren_mixed": Case(3, (1, 8, 3, 4, 8), heads=8, boundary=("circular", "linear", "circular"), hyena=(
        ("filter", functools.partial(SirenFilter, L_cache=4, hidden_dim=6)), ("mask", None),
        ("spectral_kernel", True))),
    # StripedHyena 2 (Evo 2) and safari/HyenaDNA operators. The explicit FIRs run as direct convs with
    # a K-1 halo (P=4: zigzag chunks exactly K-1 long); groups are not split by CP (2 groups on 4 ranks)
    "1d_evo2_se_fir7": Case(1, (2, 48, 8), norm=None, heads=2, hyena=(
        ("filter", functools.partial(ExplicitFilter, length=7)), ("mask", None), ("skip", False)),
        mixer=(("bias", False), ("out_proj_bias", True))),
    "1d_evo2_mr_fir15_decay_fp32": Case(1, (1, 112, 8), dtype=torch.float32, norm=None, hyena=(
        ("filter", functools.partial(ExplicitFilter, length=15, decay="savanna", L_cache=112)), ("mask", None))),
    "1d_evo2_se_fir5_a2a": Case(1, (2, 48, 8), mode="a2a", hyena=(
        ("filter", functools.partial(ExplicitFilter, length=5)), ("mask", None))),
    "1d_evo2_li_modal": Case(1, (2, 48, 8), heads=8, norm=None, hyena=(
        ("filter", functools.partial(ModalFilter, state_size=4)), ("mask", None))),
    "1d_evo2_li_savanna_fp32": Case(1, (2, 48, 8), heads=8, dtype=torch.float32, hyena=(
        ("filter", functools.partial(ModalFilter, state_size=3, parametrization="savanna")), ("mask", None))),
    "1d_hyenadna_safari": Case(1, (2, 48, 8), heads=8, norm=None, hyena=(
        ("filter", functools.partial(SafariFilter, l_max=64, emb_dim=5, width=12, sin_freq=10.0, shift=0.05)),
        ("mask", None))),
}


def build(case: Case) -> tuple[QKVSequenceMixer, dict]:
    """Same mixer, input, conditioning and upstream grad on every process (seeded)."""
    torch.manual_seed(1234)
    c = case.shape[-1]
    extra = dict(case.hyena)
    if "filter" not in extra:
        extra["filter_width"] = 16
    hyena = Hyena(hidden_dim=c, num_heads=case.heads, spatial_dims=case.dims, boundary=case.boundary,
                  cp_comm=case.cp_comm, **extra)
    mixer = QKVSequenceMixer(hidden_dim=c, hyena=hyena, short_kernel_size=case.kernel, norm=case.norm,
                             conditioning=case.cond, cond_dim=5 if case.cond else None,
                             short_conv_cp=case.mode, **dict(case.mixer)).to(case.dtype)
    with torch.no_grad():  # zero-initialised parts (adaLN-Zero) would hide gradient bugs
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    data = {"x": torch.randn(case.shape, dtype=case.dtype), "grad": torch.randn(case.shape, dtype=case.dtype),
            "cond": torch.randn(case.shape[0], mixer.cond_dim, dtype=case.dtype) if mixer.cond_dim else None}
    return mixer, data


def layout(case: Case) -> str:
    return case.geometry.layout


def run_mixer(case: Case, group=None) -> dict:
    """Forward + backward on this rank's shard (the whole tensor when group is None)."""
    mixer, data = build(case)
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    x = shard(data["x"], 1, layout(case), world, rank).requires_grad_(True)
    grad = shard(data["grad"], 1, layout(case), world, rank)
    cond = None if data["cond"] is None else data["cond"].requires_grad_(True)
    with count_comm() as stats, CollectiveCounter() as wire:
        y = mixer(x, conditioning=cond, cp_group=group, num_valid_tokens=case.num_valid)
        y.backward(grad)
    return {"y": y.detach(), "dx": x.grad, "dcond": None if cond is None else cond.grad,
            "params": {n: p.grad for n, p in mixer.named_parameters()}, "bytes": stats.bytes_sent,
            "by_op": dict(stats.by_op), "calls": dict(stats.calls),
            "wire_calls": dict(wire.calls), "wire_sent": dict(wire.sent)}


def worker_run(case: Case) -> dict:
    return run_mixer(case, dist.group.WORLD)


def check_parity(case: Case, results: list[dict]) -> None:
    ref = run_mixer(case)
    tol = TOL[case.dtype]
    y = unshard([r["y"] for r in results], 1, layout(case))
    dx = unshard([r["dx"] for r in results], 1, layout(case))
    assert rel_err(y, ref["y"]) < tol, "output"
    assert rel_err(dx, ref["dx"]) < tol, "input grad"
    if ref["dcond"] is not None:
        assert rel_err(sum(r["dcond"] for r in results), ref["dcond"]) < tol, "conditioning grad"
    for name, g_ref in ref["params"].items():
        g = sum(r["params"][name] for r in results)  # gradients are summed over the CP group
        assert rel_err(g, g_ref) < tol, f"grad of {name}"


PARAMS = [pytest.param(name, p, id=f"{name}-P{p}") for name, case in CASES.items() for p in case.worlds]


@pytest.mark.parametrize("name,world", PARAMS)
def test_cp_mixer_parity(dist_run, name, world):
    case = CASES[name]
    check_parity(case, dist_run(worker_run, world, case))


def test_parity_test_catches_a_wrong_gradient(dist_run):
    """The comparison is not vacuous: a perturbed rank-1 gradient is caught."""
    case = CASES["1d_k3"]
    results = dist_run(worker_run, 2, case)
    results[1]["params"]["hyena.filter.out.weight"] = results[1]["params"]["hyena.filter.out.weight"] * 1.001
    with pytest.raises(AssertionError, match="filter.out.weight"):
        check_parity(case, results)


def worker_run_without_wrap(case: Case) -> dict:
    """The mixer with a halo that forgets the wrap-around of a circular first axis."""
    exchange = geometry_module.block_halo
    geometry_module.block_halo = lambda x, dim, before, after, group, wrap=False: exchange(x, dim, before, after, group)
    try:
        return run_mixer(case, dist.group.WORLD)
    finally:
        geometry_module.block_halo = exchange


@pytest.mark.parametrize("name", ["2d_circular", "1d_circular"])
def test_parity_test_catches_a_halo_without_the_wrap(dist_run, name):
    """Negative twin of the circular cases: rank 0 and rank P-1 must be neighbours."""
    case = CASES[name]
    results = dist_run(worker_run_without_wrap, 2, case)
    with pytest.raises(AssertionError, match="output"):
        check_parity(case, results)


def worker_run_with_the_first_groups_spectrum(case: Case) -> dict:
    """The spectral path with every rank taking the output layer of the FIRST groups, not its own."""
    spectrum = Hyena._spectrum
    Hyena._spectrum = lambda self, spatial, groups, cond: spectrum(self, spatial, slice(0, groups.stop - groups.start),
                                                                   cond)
    try:
        return run_mixer(case, dist.group.WORLD)
    finally:
        Hyena._spectrum = spectrum


def test_parity_test_catches_a_spectrum_of_the_wrong_groups(dist_run):
    """Negative twin of the spectral cases: a rank's spectrum must be of its own channel block's groups."""
    case = CASES["2d_spectral_fourier_causal_x_circular"]
    results = dist_run(worker_run_with_the_first_groups_spectrum, 2, case)
    with pytest.raises(AssertionError, match="output"):
        check_parity(case, results)


def worker_run_with_shard_statistics(case: Case) -> dict:
    """The mixer with a position group norm that forgets the CP all-reduce (statistics per shard)."""
    reduce = norm_module.all_reduce_sum
    norm_module.all_reduce_sum = lambda t, group: t
    try:
        return run_mixer(case, dist.group.WORLD)
    finally:
        norm_module.all_reduce_sum = reduce


def test_parity_test_catches_a_group_norm_with_shard_statistics(dist_run):
    """Negative twin of the position group norm: statistics must span every rank's positions."""
    case = CASES["3d_groupnorm_rff_padding"]
    with pytest.raises(AssertionError, match="output"):
        check_parity(case, dist_run(worker_run_with_shard_statistics, 2, case))


def worker_run_without_fir_halo(case: Case) -> dict:
    """The mixer with an explicit filter whose direct conv gets zeros instead of the halo (the
    short conv keeps its own)."""
    halo = geometry_module.causal_halo_1d
    geometry_module.causal_halo_1d = lambda x, n, group: halo(x, n, group) if n < 6 else \
        torch.zeros(*x.shape[:-1], 2, n, dtype=x.dtype)
    try:
        return run_mixer(case, dist.group.WORLD)
    finally:
        geometry_module.causal_halo_1d = halo


def test_parity_test_catches_an_explicit_filter_without_its_halo(dist_run):
    """Negative twin of the explicit FIR under CP: the K-1 tokens before each chunk are needed."""
    case = CASES["1d_evo2_se_fir7"]
    with pytest.raises(AssertionError, match="output"):
        check_parity(case, dist_run(worker_run_without_fir_halo, 2, case))


# ------------------------------------------------------------------ bytes sent
def fir_length(case: Case) -> int | None:
    return build(case)[0].hyena.fir_length


def predicted_bytes(case: Case, world: int, rank: int) -> int:
    """4 AllToAlls of B*(L/P)*C*(P-1)/P elements (2 forward, 2 backward) + the halos (forward
    values, backward gradients) of 3C channels: the one formula the benchmarks report too.
    An explicit filter: its K-1 halo of the C channels of z instead of the AllToAlls."""
    return comm_floor_bytes(case.shape, case.kernel, world, rank, torch.finfo(case.dtype).bits // 8, case.geometry,
                            fir_length=fir_length(case))


def predicted_calls(case: Case, world: int, rank: int) -> dict[str, int]:
    """Exactly 4 AllToAlls (z forward and back, then their adjoints) and one point-to-point
    send per halo neighbour, forward (values) and backward (gradients); nothing else. An
    explicit filter: no AllToAll, a second halo exchange (of z) instead."""
    peers, _, _ = case.geometry.halo_traffic(case.kernel, world, rank)
    if fir_length(case) is not None:
        return {"p2p": 4 * peers} if peers else {}
    return {"all_to_all": 4, **({"p2p": 2 * peers} if peers else {})}


def predicted_wire_calls(case: Case, world: int, rank: int) -> dict[str, int]:
    """The c10d ops behind `predicted_calls`: each halo send has its matching receive (a rank
    receives from the neighbours it sends to), plus the one all-gather of the cross-rank
    agreement check (control traffic, `hyena_cp.parallel.agreement`) in forward."""
    calls = predicted_calls(case, world, rank)
    p2p, a2a = calls.pop("p2p", 0), calls.pop("all_to_all", 0)
    return {**({"alltoall_base_": a2a} if a2a else {}), **({"send": p2p, "recv_": p2p} if p2p else {}),
            "_allgather_base_": 1, **calls}


@pytest.mark.parametrize("name", ["1d_k3", "1d_k7_adaln", "2d_k3", "2d_k5_fp32_film", "2d_circular", "2d_causal_zigzag",
                                  "3d_k3", "3d_causal_x_circular_fp32_film", "1d_evo2_se_fir7",
                                  "1d_evo2_mr_fir15_decay_fp32", "1d_evo2_li_modal", "1d_hyenadna_safari"])
@pytest.mark.parametrize("world", [2, 4])
def test_bytes_sent_equal_the_floor(dist_run, name, world):
    case = CASES[name]
    results = dist_run(worker_run, world, case)
    for rank, r in enumerate(results):
        assert r["bytes"] == predicted_bytes(case, world, rank), (rank, r["by_op"])
        assert r["calls"] == predicted_calls(case, world, rank), (rank, r["calls"])
        # measured at the dispatcher: the same ops and bytes reach torch.distributed, nothing else
        assert r["wire_calls"] == predicted_wire_calls(case, world, rank), (rank, r["wire_calls"])
        data = r["wire_sent"].get("alltoall_base_", 0) + r["wire_sent"].get("send", 0)
        assert data == predicted_bytes(case, world, rank), (rank, r["wire_sent"])
        assert r["wire_sent"].get("alltoall_base_", 0) == r["by_op"].get("all_to_all", 0)


def test_a2a_mode_sends_twice_the_alltoall_bytes(dist_run):
    halo_case, a2a_case = CASES["1d_k3"], Case(1, (2, 48, 8), mode="a2a")
    halo = dist_run(worker_run, 2, halo_case)
    a2a = dist_run(worker_run, 2, a2a_case)
    assert a2a[0]["by_op"]["all_to_all"] == 2 * halo[0]["by_op"]["all_to_all"]


@pytest.mark.parametrize("world", [2, 4])
def test_allgather_baseline_bytes(dist_run, world):
    # One all-gather of z forward + one reduce-scatter backward, (P-1)/P * P = P times one
    # AllToAll each, against the default's 4 AllToAlls: P/2 times the bytes in total (and
    # P times the long-conv compute and memory per rank).
    a2a = dist_run(worker_run, world, CASES["1d_k3"])
    gather = dist_run(worker_run, world, CASES["1d_allgather"])
    ops = gather[0]["by_op"]
    assert 2 * (ops["all_gather"] + ops["reduce_scatter"]) == world * a2a[0]["by_op"]["all_to_all"]


# --------------------------------------------------------------- bad input
def worker_bad(case: Case, shape: tuple) -> None:
    mixer, _ = build(case)
    x = torch.randn(shape, dtype=case.dtype)
    mixer(x, cp_group=dist.group.WORLD)


@pytest.mark.parametrize("case,local_shape,match", [
    (Case(1, (1, 12, 8)), (1, 3, 8), "divisible by 2\\*cp_size"),  # L % 2P
    (Case(1, (1, 12, 8), kernel=5), (1, 4, 8), "shorter than the short-conv halo"),
    (Case(2, (1, 4, 4, 8), kernel=5), (1, 1, 4, 8), "fewer than the short-conv halo"),
    (Case(1, (1, 12, 8), heads=2), (1, 6, 8), "num_heads=2"),
    (Case(2, (1, 4, 4, 8)), (1, 2, 8), "\\[B, H, W, C\\]"),  # wrong layout/rank
    (Case(1, (1, 40, 8), hyena=(("filter", functools.partial(ExplicitFilter, length=7)), ("mask", None))),
     (1, 10, 8), "zigzag chunk length L/\\(2\\*cp_size\\)=40/8=5 is shorter than the halo K-1=6"),
])
def test_bad_input_raises_on_every_rank_before_communicating(dist_run, case, local_shape, match):
    world = 4
    errors = dist_run(worker_bad, world, case, local_shape, expect_error=ValueError)
    assert len(errors) == world
    for e in errors:
        assert isinstance(e, ValueError)
        assert re.search(match, str(e)), str(e)


def worker_bad_kwargs(case: Case, local_shape: tuple, kwargs: dict) -> None:
    mixer, _ = build(case)
    x = torch.randn(local_shape, dtype=case.dtype)
    mixer(x, cp_group=dist.group.WORLD, **kwargs)


@pytest.mark.parametrize("case,kwargs,match", [
    # the mixer is built with cond_dim=5: a [B, 3] conditioning used to fail in a matmul after the AllToAlls
    (Case(1, (2, 16, 8), cond="film"), dict(conditioning=torch.randn(2, 3, dtype=torch.float64)),
     "conditioning must be \\[B, cond_dim\\] = \\[2, 5\\]"),
    (Case(2, (2, 4, 4, 8), cond="adaln"), dict(conditioning=torch.randn(1, 5, dtype=torch.float64)), "B from x"),
    (Case(1, (2, 16, 8)), dict(num_valid_tokens=-1), "num_valid_tokens=-1 must be None"),  # used to mask everything
    (Case(2, (2, 4, 4, 8)), dict(num_valid_tokens=17), "an int in \\[0, 16\\]"),
    (Case(1, (2, 16, 8)), dict(cu_seqlens=torch.tensor([0, 3, 40])), "end at the global token count B\\*L=32"),
])
def test_bad_kwargs_raise_on_every_rank_before_communicating(dist_run, case, kwargs, match):
    world = 2
    local = (case.shape[0], case.shape[1] // world, *case.shape[2:])
    errors = dist_run(worker_bad_kwargs, world, case, local, kwargs, expect_error=ValueError)
    assert len({str(e) for e in errors}) == 1 and re.search(match, str(errors[0])), errors


def test_hidden_dim_not_divisible_by_world(dist_run):
    case = Case(2, (1, 6, 4, 6), heads=3)
    errors = dist_run(worker_bad, 2, case, (1, 3, 4, 6), expect_error=ValueError)
    assert all("hidden_dim=6" in str(e) or "num_heads=3" in str(e) for e in errors)
