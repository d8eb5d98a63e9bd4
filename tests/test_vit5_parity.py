"""Context-parallel ViT-5 networks == single process: logits (on every rank), loss, image
gradients and EVERY parameter gradient (summed over the CP group), for P in {1, 2, 4}.

Each rank's loss is its share ``cross_entropy(logits) / P`` (what the training loop does), so
the gradients summed over the group must equal the single-process gradients."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hyena_cp import ViT5ClassificationNet, ViT5HierarchicalClassificationNet
from references import rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass(frozen=True)
class Case:
    hierarchical: bool
    img: int
    patch: int
    mixers: tuple = ("hyena", "hyena")
    class_token: bool = True
    registers: int = 4
    pool: str = "cls"
    dtype: torch.dtype = torch.float64
    drop_path: float = 0.0
    noisy_padding: bool = False  # overwrite every padded position before every block


CASES = {
    # 4x4 grid + 2 register rows (5 extras on a width-4 grid); P=4 pads 6 -> 8 rows
    "iso_cls_r4": Case(False, 16, 4),
    "iso_mean_no_cls_r0": Case(False, 16, 4, class_token=False, registers=0, pool="mean"),
    "iso_mean_cls_r0": Case(False, 16, 4, registers=0, pool="mean"),
    "iso_hybrid_fp32": Case(False, 24, 4, mixers=("hyena", "attention"), dtype=torch.float32),
    "iso_attention_padding_noise": Case(False, 24, 4, mixers=("attention", "attention"), noisy_padding=True),
    # 8x8 -> 4x4 -> 2x2; at width 2 the 5 extras take 3 register rows
    "hier_cls_r4": Case(True, 16, 2, mixers=("hyena", "hyena", "hyena")),
    "hier_cls_r0": Case(True, 16, 2, mixers=("hyena", "hyena", "hyena"), registers=0),
    # 10x10 -> 5x5 -> 3x3 (the odd 5x5 grid is zero-padded to 6x6 before merging)
    "hier_odd_mean_no_cls_r0": Case(True, 20, 2, mixers=("hyena", "hyena", "hyena"), class_token=False,
                                    registers=0, pool="mean"),
    "hier_odd_hybrid_fp32": Case(True, 20, 2, mixers=("hyena", "attention", "attention"), dtype=torch.float32),
    "hier_drop_path_noise": Case(True, 20, 2, mixers=("hyena", "attention", "hyena"), pool="mean",
                                 drop_path=0.3, noisy_padding=True),
}


def build(case: Case) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Same network, images and labels on every process (seeded)."""
    torch.manual_seed(0)
    common = dict(img_size=case.img, patch_size=case.patch, in_chans=3, num_classes=7, class_token=case.class_token,
                  num_registers=case.registers, pool=case.pool, drop_path_rate=case.drop_path,
                  hyena=dict(num_heads=4, filter_width=8, filter_bands=2), mixer=dict(short_kernel_size=3))
    if case.hierarchical:
        net = ViT5HierarchicalClassificationNet(embed_dim=16, depths=(1, 1, 1), num_heads=(2, 2, 4),
                                                mixers=case.mixers, **common)
    else:
        net = ViT5ClassificationNet(embed_dim=16, depth=2, num_heads=2, mixers=list(case.mixers), **common)
    net = net.to(case.dtype)
    with torch.no_grad():  # LayerScale 1e-4 and tiny CLS/registers would hide gradient bugs
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    images = torch.randn(3, 3, case.img, case.img, dtype=case.dtype)
    return net, images, torch.randint(0, 7, (3,))


def add_padding_noise(net, world: int, rank: int) -> None:
    """Before every block, fill this rank's padded positions with large random values."""
    gen = torch.Generator().manual_seed(99 + rank)  # never touches the default generator
    for layout, blocks in zip(net.layouts(world), net.stages):
        def fill(module, args, layout=layout):
            x = args[0].clone()
            positions = rank * layout.local_tokens + torch.arange(x.shape[1])
            pad = positions >= layout.grid.num_valid
            x[:, pad] = 100 * torch.randn(x[:, pad].shape, generator=gen, dtype=x.dtype)
            return (x,)
        for block in blocks:
            block.register_forward_pre_hook(fill)


def run(case: Case, group=None) -> dict:
    net, images, labels = build(case)
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    if case.noisy_padding:
        add_padding_noise(net, world, rank)
    images.requires_grad_(True)
    torch.manual_seed(7)  # stochastic depth: the same draws on every rank and in the reference
    logits = net(images, cp_group=group)
    loss = F.cross_entropy(logits, labels) / world  # this rank's share
    loss.backward()
    return {"logits": logits.detach(), "loss": loss.detach(), "dimages": images.grad,
            "params": {n: p.grad for n, p in net.named_parameters()}}


def single_process(case: Case) -> dict:
    # One thread, like the workers: these ops are tiny, and on a loaded 2-core machine
    # OpenMP's second thread only spins (seconds instead of tens of milliseconds).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(case)
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def reference(name: str) -> dict:
    return single_process(CASES[name])


def worker_run(case: Case) -> dict:
    return run(case, dist.group.WORLD)


def check_parity(case: Case, ref: dict, results: list[dict]) -> None:
    tol = TOL[case.dtype]
    for rank, r in enumerate(results):
        assert rel_err(r["logits"], ref["logits"]) < tol, f"logits on rank {rank}"
    assert rel_err(sum(r["loss"] for r in results), ref["loss"]) < tol, "loss"
    assert rel_err(sum(r["dimages"] for r in results), ref["dimages"]) < tol, "image grad"
    for name, g_ref in ref["params"].items():
        grads = [r["params"][name] for r in results]
        assert all(g is not None for g in grads), f"a rank has no grad for {name}"
        assert rel_err(sum(grads), g_ref) < tol, f"grad of {name}"


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_network_parity(dist_run, name, world):
    case = CASES[name]
    check_parity(case, reference(name), dist_run(worker_run, world, case))


def test_parity_check_catches_a_wrong_gradient(dist_run):
    """Not vacuous: scaling one rank's share of one parameter gradient is caught."""
    results = dist_run(worker_run, 2, CASES["hier_cls_r4"])
    name = "merges.0.reduction.weight"
    results[1]["params"][name] = results[1]["params"][name] * 1.001
    with pytest.raises(AssertionError, match=name):
        check_parity(CASES["hier_cls_r4"], reference("hier_cls_r4"), results)


def test_reference_sees_the_padding_noise_and_drop_path():
    """The noisy-padding and drop-path cases really change something the network could see."""
    noisy, quiet = reference("hier_drop_path_noise"), single_process(Case(True, 20, 2, mixers=("hyena", "attention", "hyena"),
                                                                pool="mean", drop_path=0.3))
    torch.testing.assert_close(noisy["logits"], quiet["logits"], rtol=0, atol=1e-12)  # padding never leaks
    no_drop = single_process(Case(True, 20, 2, mixers=("hyena", "attention", "hyena"), pool="mean"))
    assert not torch.allclose(quiet["logits"], no_drop["logits"])  # stochastic depth was active
