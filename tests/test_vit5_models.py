"""ViT-5 networks in one process: layouts, parts against direct references, stochastic depth,
FLOPs against FlopCounterMode, and bad input (also on every CP rank before communicating)."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hyena_cp import ViT5ClassificationNet, ViT5HierarchicalClassificationNet, ViT5HyenaAdapter
from hyena_cp.models.attention import Attention2d, rope_2d
from hyena_cp.models.blocks import DropPath
from hyena_cp.models.token_grid import StageGrid
from hyena_cp.ops.filters import FourierFilter
from hyena_cp.ops.siren import SirenFilter
from references import rel_err

HYENA = dict(num_heads=4, filter_width=8, filter_bands=2)


def hier(**kw) -> ViT5HierarchicalClassificationNet:
    args = dict(img_size=20, patch_size=2, in_chans=3, num_classes=5, embed_dim=16, depths=(1, 1, 1),
                num_heads=(2, 2, 4), mixers=("hyena", "attention", "hyena"), hyena=HYENA)
    torch.manual_seed(0)
    return ViT5HierarchicalClassificationNet(**{**args, **kw}).double()


def iso(**kw) -> ViT5ClassificationNet:
    args = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=2, num_heads=2,
                hyena=HYENA)
    torch.manual_seed(0)
    return ViT5ClassificationNet(**{**args, **kw}).double()


def test_layouts_and_grid_w_per_stage():
    net = hier()
    assert [(g.grid_h, g.grid_w, g.num_extra) for g in net.grids] == [(10, 10, 5), (5, 5, 5), (3, 3, 5)]
    for grid, blocks in zip(net.grids, net.stages):
        for block in blocks:
            mixer = block.mixer
            assert mixer.grid_w == grid.grid_w  # the network is the source of truth for grid_w
            if isinstance(mixer, ViT5HyenaAdapter):
                assert tuple(mixer.inner_mixer.hyena.filter.max_size) == (grid.filter_rows(8), grid.grid_w)
    # 3x3 grid + 5 extras: 2 register rows; P=4 pads 5 rows to 8
    layout = net.grids[2].layout(4)
    assert (layout.grid.rows, layout.padded_rows, layout.local_tokens) == (5, 8, 6)
    assert [layout.local_parts(r).patches for r in range(4)] == [6, 3, 0, 0]
    assert [layout.local_parts(r).extras for r in range(4)] == [0, 3, 2, 0]
    assert layout.owner(layout.grid.num_patches) == 1


def test_forward_shapes_and_param_counts():
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    assert hier()(x).shape == (2, 5)
    assert iso()(torch.randn(2, 1, 16, 16, dtype=torch.float64)).shape == (2, 10)
    no_extras = hier(class_token=False, num_registers=0, pool="mean")
    assert no_extras(x).shape == (2, 5) and no_extras.merges[0].extra_proj is None


def test_embedding_equals_conv2d_patch_embed():
    net = iso(num_registers=2)
    images = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    tokens = net.embed(images, net.layouts(1)[0], 0)
    ref = net.patch_embed(images).flatten(2).transpose(1, 2) + net.pos_embed  # B, 16, C
    torch.testing.assert_close(tokens[:, :16], ref)
    torch.testing.assert_close(tokens[:, 16:19], torch.cat([net.cls_token, net.reg_tokens]).expand(2, -1, -1))
    assert tokens.shape[1] == 20 and torch.count_nonzero(tokens[:, 19:]) == 0  # register row padding


def test_patch_merge_equals_direct_swin_merge():
    net = hier()  # 5x5 -> 3x3: the odd grid is zero-padded to 6x6
    merge, old, new = net.merges[1], *net.layouts(1)[1:3]
    x = torch.randn(2, old.num_tokens, 32, dtype=torch.float64)
    y = merge(x, old, new, None)
    grid = F.pad(x[:, :25].reshape(2, 5, 5, 32), (0, 0, 0, 1, 0, 1))  # B, 6, 6, C
    cat = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], -1)
    torch.testing.assert_close(y[:, :9], merge.reduction(merge.norm(cat)).reshape(2, 9, 64))
    torch.testing.assert_close(y[:, 9:14], merge.extra_proj(merge.extra_norm(x[:, 25:30])))
    assert y.shape[1] == new.num_tokens and torch.count_nonzero(y[:, 14:]) == 0


def direct_rope(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, theta: float) -> torch.Tensor:
    """Axial RoPE as complex rotations: pair (i, i + d/2) turns by row*f_i (i < d/4) or col*f_(i-d/4)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    angle = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], -1)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], -1)


def test_attention_matches_direct_reference():
    torch.manual_seed(0)
    att = Attention2d(dim=16, num_heads=2, grid_w=3, num_patches=9).double()
    for p in att.parameters():
        torch.nn.init.normal_(p)
    x, valid = torch.randn(2, 15, 16, dtype=torch.float64), 12  # 3x3 patches, 3 extras, 3 padding
    q, k, v = att.qkv(x).reshape(2, 15, 3, 2, 8).permute(2, 0, 3, 1, 4)
    pos = torch.arange(15)
    rows = torch.where(pos < 9, pos // 3, 0).double()
    cols = torch.where(pos < 9, pos % 3, 0).double()
    q, k = direct_rope(att.q_norm(q), rows, cols, 100.0), direct_rope(att.k_norm(k), rows, cols, 100.0)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores[..., valid:] = -math.inf
    ref = att.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 15, 16))
    assert rel_err(att(x, num_valid_tokens=valid), ref) < 1e-12


def test_rope_is_relative_on_patches_and_identity_elsewhere():
    cos, sin = rope_2d(torch.arange(30), grid_w=5, num_patches=20, head_dim=8, theta=100.0, dtype=torch.float64)
    assert torch.all(cos[20:] == 1) and torch.all(sin[20:] == 0)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def score(a: int, b: int) -> torch.Tensor:
        rot = lambda t, p: t * cos[p] + torch.cat([-t[4:], t[:4]]) * sin[p]  # noqa: E731
        return rot(q, a) @ rot(k, b)
    # (0,1)->(1,3) and (2,0)->(3,2) have the same (row, col) offset
    torch.testing.assert_close(score(1, 8), score(10, 17))
    assert not torch.allclose(score(1, 8), score(1, 9))


def test_drop_path_same_seed_same_masks_and_off_in_eval():
    net = hier(drop_path_rate=0.5)
    x = torch.randn(4, 3, 20, 20, dtype=torch.float64)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(net(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.manual_seed(4)
    assert not torch.allclose(net(x), outs[0])
    net.eval()
    torch.testing.assert_close(net(x), hier(drop_path_rate=0.0).eval()(x))
    with pytest.raises(ValueError, match="drop_path_rate"):
        DropPath(1.0)


def test_no_tensor_is_created_on_a_fixed_device():
    """Forward and backward on the meta device: arithmetic or ``cat`` with a tensor made on the
    CPU by mistake raises there, as it would on a GPU (CI has none). Attention blocks only:
    the FFT conv's autocast guard has no meta mode."""
    with torch.device("meta"):
        net = ViT5HierarchicalClassificationNet(img_size=20, patch_size=2, in_chans=3, num_classes=5, embed_dim=16,
                                                depths=(1, 1, 1), num_heads=(2, 2, 4), mixers="attention",
                                                drop_path_rate=0.2)
        images = torch.randn(2, 3, 20, 20)
    for pool in ("cls", "mean"):
        net.pool = pool
        logits = net(images)
        logits.sum().backward()
        assert logits.device.type == "meta" and logits.shape == (2, 5)


@pytest.mark.parametrize("make", [lambda: iso(mixers=["hyena", "attention"]), lambda: hier()],
                         ids=["isotropic_hybrid", "hierarchical_hybrid"])
def test_flop_count_matches_flop_counter_mode(make):
    net = make().float()
    x = torch.randn(1, net.in_chans, *net.img_size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # MATH: counted matmuls
        net(x)
    parts = net.flop_breakdown()
    assert counter.get_total_flops() == sum(v for k, v in parts.items() if k not in ("hyena.fft_conv", "hyena.gating"))
    assert parts["hyena.fft_conv"] > 0 and parts["attention.core"] > 0 and parts["mlp"] > 0
    assert net.flop_count() == 3 * net.flop_count(inference=True)
    # The Hyena blocks' share agrees with the adapter's flop_count protocol.
    hyena = sum(b.mixer.flop_count(layout.num_tokens, inference=True) for layout, blocks in
                zip(net.layouts(1), net.stages) for b in blocks if isinstance(b.mixer, ViT5HyenaAdapter))
    assert hyena == pytest.approx(sum(v for k, v in parts.items() if k.startswith("hyena.")), abs=1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(pool="cls", class_token=False), "pool='cls'"),
    (dict(pool="max"), "pool='max'"),
    (dict(mixers=("hyena", "attention")), "3 stages"),
    (dict(mixers=("hyena", ["hyena", "attention"], "hyena")), "stage 1"),
    (dict(mixers="conv"), "stage 0"),
    (dict(hyena=dict(num_heads=4, max_grid=(8, 8))), "set by the network"),
    (dict(num_heads=(2, 3, 4)), "num_heads=3"),
    (dict(img_size=21), "divisible by patch_size"),
    (dict(depths=(1, 1)), "num_heads"),
    (dict(hyena=[HYENA, HYENA]), "one per stage"),
    (dict(hyena=dict(num_heads=4, filter=functools.partial(FourierFilter))), "must be absolute"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hier(**kwargs)


def test_per_stage_hyena_bias_switch_and_no_short_conv():
    """``hyena``/``mixer`` per stage (a filter with its own L_cache each), ``bias=False`` (patch embedding,
    MLPs, merges' extra projection, head), a mixer without a short conv."""
    stage = [dict(num_heads=4, filter=functools.partial(SirenFilter, L_cache=n), mask=None) for n in (6, 3, 2)]
    net = hier(hyena=stage, mixer=[dict(short_kernel_size=None), {}, {}], bias=False, mixers="hyena")
    filters = [block.mixer.inner_mixer.hyena.filter for blocks in net.stages for block in blocks]
    assert [f.L_cache for f in filters] == [(6, 6), (3, 3), (2, 2)]
    assert net.stages[0][0].mixer.inner_mixer.short_conv is None
    biased = [k for k in net.state_dict() if k.endswith("bias") and ".mixer." not in k]
    assert biased == []
    assert net(torch.randn(2, 3, 20, 20, dtype=torch.float64)).shape == (2, 5)


def test_bad_images_raise():
    net = hier()
    with pytest.raises(ValueError, match=r"\[B, 3, 20, 20\]"):
        net(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[B, 3, 20, 20\]"):
        net(torch.randn(3, 20, 20, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[B, 3, 20, 20\].*got \[\[0.0\]\]"):
        net([[0.0]])
    with pytest.raises(ValueError, match=r"floating-point tensor \(normalised pixels\), got torch.uint8"):
        net(torch.zeros(2, 3, 20, 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images are on meta but the network's parameters are on cpu"):
        net(torch.empty(2, 3, 20, 20, dtype=torch.float64, device="meta"))
    with pytest.raises(ValueError, match="cp_group must be a torch.distributed ProcessGroup"):
        net(torch.randn(2, 3, 20, 20, dtype=torch.float64), cp_group=4)


def worker_bad(kwargs: dict) -> None:
    hier(**kwargs)(torch.randn(2, 3, 20, 20, dtype=torch.float64), cp_group=dist.group.WORLD)


@pytest.mark.parametrize("world,kwargs,match", [
    (4, dict(hyena=dict(num_heads=2)), "num_heads=2"),  # Hyena filter groups % P
    (4, dict(max_cp_size=2), "max_cp_size=2"),
    # K=7 needs 3 rows per rank; at P=4 the 5x5 stage (+1 register row, padded to 8) has 2
    (4, dict(mixer=dict(short_kernel_size=7)), "short-conv halo"),
])
def test_bad_cp_setup_raises_on_every_rank_before_communicating(dist_run, world, kwargs, match):
    errors = dist_run(worker_bad, world, kwargs, expect_error=ValueError)
    assert all(match in str(e) for e in errors), errors


def test_stage_grid_filter_rows_cover_every_padding():
    grid = StageGrid(7, 3, 5)  # 7 + 2 register rows
    for world in range(1, 9):
        assert grid.layout(world).padded_rows <= grid.filter_rows(8)
