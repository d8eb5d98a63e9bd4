"""Every vision config file builds: the large ones on the meta device (shapes, parameter
counts and FLOPs, no compute), the tiny ones for real with a forward pass."""
from __future__ import annotations

import pathlib

import pytest
import torch

from hyena_cp import LazyConfig, ViT5HyenaAdapter, instantiate
from hyena_cp.models.attention import Attention2d

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
# name: (params in millions, forward GMACs at 224 px), with a few percent of slack
LARGE = {
    "vit5_hyena_s": (22.3, 4.71),  # ViT-5-S: ~22M, 4.7 GMACs
    "vit5_hyena_b": (87.0, 18.28),  # ViT-5-B: ~87M, 17.9 GMACs
    "vit5_hier_tiny": (29.1, 5.11),  # Swin-T: 28M, 4.5 GMACs
    "vit5_hier_s": (50.6, 9.76),  # Swin-S: 50M, 8.7 GMACs
}
TINY = ["vit5_hyena_tiny", "vit5_hyena_tiny_hybrid"]


def test_every_vision_config_is_tested():
    assert {p.stem for p in CONFIGS.glob("vit5_*.py")} == set(LARGE) | set(TINY)


@pytest.mark.parametrize("name", list(LARGE))
def test_large_configs_on_meta_device(name):
    cfg = LazyConfig.load(CONFIGS / f"{name}.py")
    with torch.device("meta"):
        net = instantiate(cfg.model)
    params, gmacs = LARGE[name]
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(params, rel=0.01)
    assert net.flop_count(inference=True) / 2e9 == pytest.approx(gmacs, rel=0.01)
    assert [g.grid_w for g in net.grids] == [224 // cfg.model.patch_size // 2**s for s in range(len(net.grids))]


@pytest.mark.parametrize("name", TINY)
def test_tiny_configs_run(name):
    torch.manual_seed(0)
    net = instantiate(LazyConfig.load(CONFIGS / f"{name}.py").model)
    logits = net(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_hybrid_switch_is_one_line_and_training_fields_are_settable():
    cfg = LazyConfig.load(CONFIGS / "vit5_hyena_tiny.py")
    cfg.model.mixers = ["hyena", "attention", "attention", "hyena"]
    cfg.model.update(img_size=16, patch_size=2, in_chans=3, num_classes=4)  # what a derived training config edits
    net = instantiate(cfg.model)
    kinds = [type(b.mixer) for b in net.stages[0]]
    assert kinds == [ViT5HyenaAdapter, Attention2d, Attention2d, ViT5HyenaAdapter]
    assert net(torch.randn(1, 3, 16, 16)).shape == (1, 4)
    assert LazyConfig.load(CONFIGS / "vit5_hyena_tiny_hybrid.py").model.mixers == ["hyena"] * 2 + ["attention"] * 2
