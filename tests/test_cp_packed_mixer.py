"""Packed sequences through the context-parallel 1-D QKVSequenceMixer (float64): the packed
forward on P ranks equals every document run ALONE in one process — outputs, input grads and
every parameter grad (summed over the CP group and over the documents) — with documents of
length 1, documents shorter than the short-conv halo, and documents straddling zigzag-chunk
and rank boundaries. Negative twins ignore the boundaries in the short conv, the long conv or
both and must fail; packing adds no communication; bad ``cu_seqlens`` raise on every rank
before any communication."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace

import pytest
import torch
import torch.distributed as dist

from hyena_cp import Hyena, QKVSequenceMixer
from hyena_cp.bench.layer import comm_floor_bytes
from hyena_cp.ops.explicit import ExplicitFilter
from hyena_cp.ops.modal import ModalFilter
from hyena_cp.ops.safari import SafariFilter
from hyena_cp.ops.packing import concat_cu_seqlens
from hyena_cp.parallel import count_comm, shard, unshard
from references import rel_err

TOL = 1e-10  # float64

# Documents of each row (token counts). Zigzag chunks are L/(2P) long: 6 at L=48, P=4, so e.g.
# row 0's 13-token document spans chunks 1..3 (ranks 1, 2, 3) and row 1's 30-token one chunks
# 0..4 (ranks 0..3, then back to 3); the 1-, 2- and 3-token documents are shorter than the
# halo K-1 = 4 of K = 5.
ROWS_48 = ((1, 5, 2, 13, 3, 24), (30, 1, 1, 16))


@dataclass(frozen=True)
class Case:
    shape: tuple = (2, 48, 8)  # global x [B, L, C]
    docs: tuple = ROWS_48
    kernel: int = 3
    heads: int = 4
    mode: str = "halo"
    cp_comm: str = "alltoall"
    norm: str | None = "layernorm"
    cond: str | None = None
    num_valid: int | None = None
    worlds: tuple = (1, 2, 4)
    hyena: tuple = ()  # (key, value) pairs of further Hyena arguments (another filter: no max_len)
    relative: bool = False  # length-relative filters (max_len=None): packing is refused
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    def cu_seqlens(self) -> torch.Tensor:
        rows = [torch.tensor([0, *torch.tensor(row).cumsum(0).tolist()]) for row in self.docs]
        return concat_cu_seqlens(rows, self.shape[1])

    def spans(self):
        """``(row, start, stop)`` of every document."""
        for row, lengths in enumerate(self.docs):
            start = 0
            for n in lengths:
                yield row, start, start + n
                start += n


CASES = {
    "k3": Case(),
    "k5_short_docs": Case(kernel=5),
    "k4_a2a_rms": Case(kernel=4, mode="a2a", norm="rmsnorm"),
    "k3_allgather": Case(cp_comm="allgather"),
    "k5_adaln_padding": Case(kernel=5, cond="adaln", num_valid=40),
    "k3_one_row_many_docs": Case(shape=(1, 32, 8), docs=((1, 1, 1, 1, 3, 1, 8, 16),)),
    "k2_p3": Case(shape=(2, 36, 12), heads=6, kernel=2, docs=((7, 1, 28), (2, 5, 29)), worlds=(3,)),
    # StripedHyena 2 and safari operators; documents shorter than the explicit filters' K-1 = 6
    "evo2_se_fir7": Case(norm=None, hyena=(("filter", functools.partial(ExplicitFilter, length=7)), ("mask", None),
                                           ("skip", False))),
    "evo2_mr_fir7_decay": Case(norm=None, hyena=(
        ("filter", functools.partial(ExplicitFilter, length=7, decay="savanna", L_cache=48, init_std=0.3)),
        ("mask", None))),
    # a longer FIR (K-1 = 11 > most documents) takes the blocked Toeplitz conv; P = 4's 6-token chunks can't hold it
    "evo2_mr_fir12_blocked": Case(norm=None, worlds=(1, 2), hyena=(
        ("filter", functools.partial(ExplicitFilter, length=12, decay="savanna", L_cache=48, init_std=0.3)),
        ("mask", None))),
    "evo2_li_modal": Case(heads=8, norm=None, hyena=(("filter", functools.partial(ModalFilter, state_size=4)),
                                                     ("mask", None))),
    "hyenadna_safari": Case(heads=8, norm=None, hyena=(
        ("filter", functools.partial(SafariFilter, l_max=48, emb_dim=5, width=12, shift=0.05)), ("mask", None))),
}


def build(case: Case) -> tuple[QKVSequenceMixer, dict]:
    """Same mixer (absolute filter positions: max_len = L, so a document alone sees the same
    filter taps), input, conditioning and upstream grad on every process (seeded)."""
    torch.manual_seed(1234)
    c = case.shape[-1]
    extra = dict(case.hyena) or {"filter_width": 16, "max_len": None if case.relative else case.shape[1]}
    hyena = Hyena(hidden_dim=c, num_heads=case.heads, cp_comm=case.cp_comm, **extra)
    mixer = QKVSequenceMixer(hidden_dim=c, hyena=hyena, short_kernel_size=case.kernel, norm=case.norm,
                             conditioning=case.cond, cond_dim=5 if case.cond else None,
                             short_conv_cp=case.mode).to(torch.float64)
    with torch.no_grad():  # zero-initialised parts (adaLN-Zero) would hide gradient bugs
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    data = {"x": torch.randn(case.shape, dtype=torch.float64), "grad": torch.randn(case.shape, dtype=torch.float64),
            "cond": torch.randn(case.shape[0], 5, dtype=torch.float64) if case.cond else None}
    return mixer, data


def ignore_boundaries(twin: str | None):
    """Negative twins: patch the mixer so that the short conv ("short"), the long conv
    ("long") or both ("both") no longer see the documents; returns an undo function."""
    undo = []
    if twin in ("short", "both"):
        original = QKVSequenceMixer._document_positions
        QKVSequenceMixer._document_positions = lambda self, *args: None
        undo.append(lambda: setattr(QKVSequenceMixer, "_document_positions", original))
    if twin in ("long", "both"):
        long_conv = Hyena.long_conv
        Hyena.long_conv = lambda self, z, channels, cu_seqlens=None, conditioning=None: \
            long_conv(self, z, channels, None, conditioning)
        undo.append(lambda: setattr(Hyena, "long_conv", long_conv))
    if twin == "fir":  # an explicit filter's direct conv, on shards or whole sequences
        fir_conv = Hyena.fir_conv
        Hyena.fir_conv = lambda self, z, channels, cp_group, cu_seqlens=None: fir_conv(self, z, channels, cp_group)
        undo.append(lambda: setattr(Hyena, "fir_conv", fir_conv))
    return lambda: [fn() for fn in undo]


def worker_packed(case: Case, twin: str | None = None) -> dict:
    """This rank's zigzag shard of the packed batch through the CP mixer, forward + backward."""
    group = dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mixer, data = build(case)
    x = shard(data["x"], 1, "zigzag", world, rank).requires_grad_(True)
    cond = None if data["cond"] is None else data["cond"].requires_grad_(True)
    undo = ignore_boundaries(twin)
    try:
        with count_comm() as stats:
            y = mixer(x, conditioning=cond, cp_group=group, num_valid_tokens=case.num_valid,
                      cu_seqlens=case.cu_seqlens())
            y.backward(shard(data["grad"], 1, "zigzag", world, rank))
    finally:
        undo()  # the worker process is reused by later tests
    return {"y": y.detach(), "dx": x.grad, "dcond": None if cond is None else cond.grad,
            "params": {n: p.grad for n, p in mixer.named_parameters()}, "bytes": stats.bytes_sent}


def documents_alone(case: Case) -> dict:
    """The reference: one process, each document through the mixer on its own."""
    mixer, data = build(case)
    x = data["x"].clone().requires_grad_(True)
    cond = None if data["cond"] is None else data["cond"].requires_grad_(True)
    y = torch.zeros_like(data["x"])
    for row, a, b in case.spans():
        valid = None if case.num_valid is None else max(0, min(b - a, case.num_valid - a))
        piece = mixer(x[row:row + 1, a:b], conditioning=None if cond is None else cond[row:row + 1],
                      num_valid_tokens=valid)
        piece.backward(data["grad"][row:row + 1, a:b])
        y[row:row + 1, a:b] = piece.detach()
    return {"y": y, "dx": x.grad, "dcond": None if cond is None else cond.grad,
            "params": {n: p.grad for n, p in mixer.named_parameters()}}


def parity_errors(case: Case, results: list[dict]) -> dict[str, float]:
    ref = documents_alone(case)
    errors = {"output": rel_err(unshard([r["y"] for r in results], 1, "zigzag"), ref["y"]),
              "input grad": rel_err(unshard([r["dx"] for r in results], 1, "zigzag"), ref["dx"])}
    if ref["dcond"] is not None:
        errors["conditioning grad"] = rel_err(sum(r["dcond"] for r in results), ref["dcond"])
    for name, g_ref in ref["params"].items():
        assert g_ref.norm() > 0, f"reference grad of {name} is zero: the comparison would be vacuous"
        errors[f"grad of {name}"] = rel_err(sum(r["params"][name] for r in results), g_ref)
    return errors


PARAMS = [pytest.param(name, p, id=f"{name}-P{p}") for name, case in CASES.items() for p in case.worlds]


@pytest.mark.parametrize("name,world", PARAMS)
def test_packed_mixer_equals_each_document_alone(dist_run, name, world):
    case = CASES[name]
    errors = parity_errors(case, dist_run(worker_packed, world, case))
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, bad


@pytest.mark.parametrize("twin", ["both", "short", "long"])
@pytest.mark.parametrize("world", [1, 4])
def test_ignoring_the_boundaries_fails(dist_run, world, twin):
    """Each piece's boundary handling is needed: drop it from the short conv, the long conv or
    both and the comparison must fail by far."""
    case = CASES["k5_short_docs"]
    errors = parity_errors(case, dist_run(worker_packed, world, case, twin))
    assert errors["output"] > 1e-3 and errors["input grad"] > 1e-3, errors


@pytest.mark.parametrize("world", [1, 4])
def test_explicit_filter_ignoring_the_boundaries_fails(dist_run, world):
    """The explicit filter's direct conv must stop at document starts, halo taps included."""
    case = CASES["evo2_se_fir7"]
    errors = parity_errors(case, dist_run(worker_packed, world, case, "fir"))
    assert errors["output"] > 1e-3 and errors["input grad"] > 1e-3, errors


@pytest.mark.parametrize("world", [2, 4])
def test_packing_adds_no_communication(dist_run, world):
    case = CASES["k5_short_docs"]
    results = dist_run(worker_packed, world, case)
    for rank, r in enumerate(results):
        assert r["bytes"] == comm_floor_bytes(case.shape, case.kernel, world, rank, 8), rank


# --------------------------------------------------------------- bad input
def worker_bad(shape: tuple, cu_seqlens, spatial_dims: int = 1) -> None:
    torch.manual_seed(0)
    hyena = Hyena(hidden_dim=shape[-1], num_heads=4, spatial_dims=spatial_dims)
    mixer = QKVSequenceMixer(hidden_dim=shape[-1], hyena=hyena)
    mixer(torch.randn(shape), cp_group=dist.group.WORLD, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("local_shape,cu,dims,match", [
    ((2, 8, 8), torch.tensor([0, 5, 16]), 1, "end at the global token count B\\*L=32"),
    ((2, 8, 8), torch.tensor([0, 5, 20, 32]), 1, "must contain every row end b\\*L \\(L=16\\)"),
    ((1, 8, 8), torch.tensor([0, 9, 5, 16]), 1, "non-decreasing"),
    ((1, 8, 8), torch.tensor([0.0, 16.0]), 1, "integer tensor"),
    ((1, 2, 4, 8), torch.tensor([0, 16]), 2, "cu_seqlens \\(packed sequences\\) is for a causal 1-D Hyena"),
    ((2, 8, 8), torch.tensor([0, 5, 16, 32]), 1, "need Hyena filters with absolute positions, but max_len=None"),
])
def test_bad_cu_seqlens_raise_on_every_rank_before_communicating(dist_run, local_shape, cu, dims, match):
    errors = dist_run(worker_bad, 2, local_shape, cu, dims, expect_error=ValueError)
    assert len(errors) == 2 and all(re.search(match, str(e)) for e in errors), errors


def test_relative_filters_would_give_a_document_the_packed_rows_filter(monkeypatch):
    """Why packing refuses max_len=None: without the refusal, a packed document does not equal
    that document alone (its filter is normalised by the packed length, not its own)."""
    case = replace(CASES["k3"], relative=True)
    monkeypatch.setattr(Hyena, "check_packed_filter", lambda *args: None)
    mixer, data = build(case)
    packed = mixer(data["x"], cu_seqlens=case.cu_seqlens())
    assert rel_err(packed.detach(), documents_alone(case)["y"]) > 1e-3


def test_relative_filters_with_one_document_per_row_are_the_unpacked_mixer():
    mixer, data = build(replace(CASES["k3"], relative=True))
    rows = torch.tensor([0, 48, 96])  # the two rows are the documents
    assert torch.equal(mixer(data["x"], cu_seqlens=rows), mixer(data["x"]))
