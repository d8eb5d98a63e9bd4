"""Context-parallel CCNN == single process: the output (each rank's block, put back together),
the loss (the ranks' shares added), the input gradient (summed over ranks) and EVERY parameter
gradient (summed over the CP group), for 2-D at P in {1, 2} and 3-D at P in {1, 2, 4}, with the
Hyena and the attention mixer; and the negative twins: a network whose mixers forget the group
(each rank mixes only its own block) and a 0.1 % error in one rank's gradient are caught."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from hyena_cp.models.ccnn import CCNN
from hyena_cp.ops.siren import SirenFilter
from hyena_cp.parallel import unshard
from references import rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass(frozen=True)
class Case:
    grid: tuple
    mixer: str | tuple = "hyena"  # every block, or one per block
    boundary: tuple | None = None  # of the Hyena (None: linear on every axis)
    siren: bool = False  # nvSubquadratic's recall recipe (SIREN, no mask, conv norm, gates) instead of the defaults
    dtype: torch.dtype = torch.float64
    worlds: tuple = (1, 2)
    attention_heads: int = 2  # head_dim 4 (3-D: 1 head of 8, so each axis gets a rotation pair)


CASES = {
    "2d_hyena": Case((8, 6)),
    "2d_hyena_siren_fp32": Case((8, 5), siren=True, dtype=torch.float32),
    "2d_attention": Case((8, 6), mixer="attention"),
    "3d_hyena": Case((4, 5, 6), worlds=(1, 2, 4)),
    "3d_hyena_siren": Case((4, 3, 5), siren=True, worlds=(1, 2, 4)),
    "3d_attention": Case((4, 3, 5), mixer="attention", worlds=(1, 2, 4), attention_heads=1),
    "3d_hybrid": Case((4, 3, 5), mixer=("attention", "hyena"), worlds=(1, 2, 4), attention_heads=1),
    "3d_hyena_causal_time": Case((16, 3, 4), boundary=("causal", "linear", "circular"), worlds=(1, 2, 4)),  # zigzag
}


def build(case: Case) -> tuple[CCNN, torch.Tensor, torch.Tensor]:
    """Same network, input and target on every process (seeded)."""
    torch.manual_seed(0)
    hyena = dict(num_heads=4, filter_width=8, filter_bands=2, boundary=case.boundary)
    mixer = dict(short_kernel_size=3)
    if case.siren:
        hyena = dict(num_heads=8, filter=functools.partial(SirenFilter, L_cache=case.grid, embedding_dim=8,
                                                           hidden_dim=8), mask=None, conv_norm="layernorm",
                     inner_gate="silu", outer_gate="sigmoid")
        mixer = dict(short_kernel_size=3, bias=False, norm=None, in_proj_init="small", out_proj_init="wang",
                     init_num_layers=2)
    net = CCNN(in_channels=3, out_channels=2, grid=case.grid, dim=8, depth=2, mixers=list(case.mixer)
               if isinstance(case.mixer, tuple) else case.mixer, hyena=hyena,
               mixer=mixer, attention=dict(num_heads=case.attention_heads)).to(case.dtype)
    x = torch.randn(2, *case.grid, 3, dtype=case.dtype)
    return net, x, torch.randn(2, *case.grid, 2, dtype=case.dtype)


def forget_group(net: CCNN) -> None:
    """The plausible bug of the negative twin: blocks that mix their shard as if it were the whole grid."""
    for block in net.blocks:
        block.forward = lambda x, cp_group=None, f=block.forward: f(x)


def run(case: Case, group=None, buggy: bool = False) -> dict:
    net, x, target = build(case)
    if buggy:
        forget_group(net)
    x.requires_grad_(True)
    out = net(x, cp_group=group)
    loss = (out - net.local_part(target, group)).square().sum() / target.numel()  # this rank's share
    loss.backward()
    return {"out": out.detach(), "loss": loss.detach(), "dx": x.grad,
            "params": {n: p.grad for n, p in net.named_parameters()}}


@functools.lru_cache(maxsize=None)
def reference(name: str) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the workers; tiny ops
    try:
        return run(CASES[name])
    finally:
        torch.set_num_threads(threads)


def worker_run(case: Case, buggy: bool = False) -> dict:
    return run(case, dist.group.WORLD, buggy)


def check_parity(case: Case, ref: dict, results: list[dict]) -> None:
    tol, layout = TOL[case.dtype], "zigzag" if (case.boundary or ("linear",))[0] == "causal" else "rows"
    assert rel_err(unshard([r["out"] for r in results], 1, layout), ref["out"]) < tol, "output"
    assert rel_err(sum(r["loss"] for r in results), ref["loss"]) < tol, "loss"
    assert rel_err(sum(r["dx"] for r in results), ref["dx"]) < tol, "input grad"
    for name, g_ref in ref["params"].items():
        grads = [r["params"][name] for r in results]
        assert all(g is not None for g in grads), f"a rank has no grad for {name}"
        assert rel_err(sum(grads), g_ref) < tol, f"grad of {name}"


@pytest.mark.parametrize("name,world", [(n, w) for n, c in CASES.items() for w in c.worlds])
def test_ccnn_parity(dist_run, name, world):
    case = CASES[name]
    check_parity(case, reference(name), dist_run(worker_run, world, case))


@pytest.mark.parametrize("name", ["2d_hyena", "3d_attention"])
def test_parity_check_catches_mixers_that_forget_the_group(dist_run, name):
    case = CASES[name]
    with pytest.raises(AssertionError, match="output"):
        check_parity(case, reference(name), dist_run(worker_run, 2, case, buggy=True))


def test_parity_check_catches_a_wrong_gradient(dist_run):
    case = CASES["3d_hyena"]
    results = dist_run(worker_run, 2, case)
    name = "blocks.1.mixer.hyena.filter.out.weight"
    results[1]["params"][name] = results[1]["params"][name] * 1.001
    with pytest.raises(AssertionError, match=name):
        check_parity(case, reference("3d_hyena"), results)


def test_bad_input_raises_before_any_collective(dist_run):
    case = CASES["3d_hyena"]
    errors = dist_run(_call_with, 2, case, (2, 4, 5, 6, 1), expect_error=ValueError)  # wrong C_in
    assert all("x must be the full batch [B, *S, C_in] = [B, 4, 5, 6, 3]" in str(e) for e in errors)
    errors = dist_run(_call_with, 4, Case((6, 5, 6)), (1, 6, 5, 6, 3), expect_error=ValueError)  # 6 frames, P=4
    assert all("first grid axis S0=6 must be divisible by cp_size=4" in str(e) for e in errors)


def _call_with(case: Case, shape: tuple) -> None:
    net, _, _ = build(case)
    net(torch.randn(shape, dtype=case.dtype), cp_group=dist.group.WORLD)


def test_network_keys_and_config_errors():
    with pytest.raises(ValueError, match=r"\['spatial_dims'\] are set by the network"):
        CCNN(in_channels=1, out_channels=1, grid=(8, 8), dim=8, hyena=dict(spatial_dims=2))
    with pytest.raises(ValueError, match="mixers='conv' must be one of"):
        CCNN(in_channels=1, out_channels=1, grid=(8, 8), dim=8, mixers="conv")
    with pytest.raises(ValueError, match="attention num_heads=4 must divide dim=8 into even heads of at least"):
        CCNN(in_channels=1, out_channels=1, grid=(4, 4, 4), dim=8, mixers="attention", attention=dict(num_heads=4))
    with pytest.raises(ValueError, match="attention blocks need the rows layout"):
        CCNN(in_channels=1, out_channels=1, grid=(8, 8), dim=8, depth=2, mixers=["hyena", "attention"],
             hyena=dict(boundary=("causal", "linear")), attention=dict(num_heads=2))
