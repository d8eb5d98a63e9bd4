"""ViT5HyenaAdapter against every sentence of the API document of nvSubquadratic's ViT5HyenaAdapter."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from hyena_cp import Hyena, LazyCall, QKVSequenceMixer, ViT5HyenaAdapter, instantiate


def mixer_cfg(c: int = 8, **kw):
    return LazyCall(QKVSequenceMixer)(
        hidden_dim=c, hyena=LazyCall(Hyena)(hidden_dim=c, num_heads=2, spatial_dims=2, filter_width=16), **kw)


class Recorder(nn.Module):
    """A [B, H, W, C]-preserving mixer that records what it was given."""

    def __init__(self, scale: float = 2.0):
        super().__init__()
        self.scale = scale
        self.calls = []

    def forward(self, x, **kwargs):
        self.calls.append((x, kwargs))
        return x * self.scale

    def flop_count(self, num_tokens, inference=False):
        return 7 * num_tokens * (1 if inference else 3)


def test_constructor_signature_has_no_hidden_dim():
    params = list(inspect.signature(ViT5HyenaAdapter.__init__).parameters)
    assert params == ["self", "inner_mixer_cfg", "grid_w"]
    with pytest.raises(TypeError):
        ViT5HyenaAdapter(mixer_cfg(), grid_w=4, hidden_dim=8)


def test_parameter_free_and_inner_mixer_instantiated():
    ad = ViT5HyenaAdapter(mixer_cfg(), grid_w=4)
    assert isinstance(ad.inner_mixer, QKVSequenceMixer)
    assert all(name.startswith("inner_mixer.") for name, _ in ad.named_parameters())
    assert all(name.startswith("inner_mixer.") for name, _ in ad.named_buffers())
    assert sum(p.numel() for p in ad.parameters()) == sum(p.numel() for p in ad.inner_mixer.parameters())


def test_forward_is_reshape_mixer_reshape():
    torch.manual_seed(0)
    ad = ViT5HyenaAdapter(mixer_cfg(), grid_w=5).double()
    x = torch.randn(2, 20, 8, dtype=torch.float64)
    y = ad(x)
    assert y.shape == (2, 20, 8)
    ref = ad.inner_mixer(x.reshape(2, 4, 5, 8)).reshape(2, 20, 8)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    # Spatial mixing really happens on the (T // grid_w, grid_w) grid, not on other shapes.
    assert not torch.allclose(y, ad.inner_mixer(x.reshape(2, 5, 4, 8)).reshape(2, 20, 8))


def test_kwargs_forwarded_verbatim_and_views():
    rec = Recorder()
    ad = ViT5HyenaAdapter(LazyCall(Recorder)(scale=3.0), grid_w=4)
    cond, marker = torch.randn(2, 5), object()
    x = torch.randn(2, 12, 6)
    y = ad(x, conditioning=cond, cp_group=None, anything_else=marker)
    grid, kwargs = ad.inner_mixer.calls[-1]
    assert grid.shape == (2, 3, 4, 6)
    assert grid.data_ptr() == x.data_ptr()  # the first reshape is a zero-copy view
    assert kwargs.keys() == {"conditioning", "cp_group", "anything_else"}
    assert kwargs["conditioning"] is cond and kwargs["cp_group"] is None and kwargs["anything_else"] is marker
    torch.testing.assert_close(y, 3.0 * x)
    assert isinstance(rec, nn.Module)


def test_conditioning_reaches_qkv_mixer():
    ad = ViT5HyenaAdapter(mixer_cfg(conditioning="adaln", cond_dim=3), grid_w=4).double()
    x, c = torch.randn(2, 8, 8, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(ad(x, conditioning=c), ad.inner_mixer(x.reshape(2, 2, 4, 8), conditioning=c)
                               .reshape(2, 8, 8))
    with pytest.raises(ValueError, match="conditioning"):
        ad(x)


def test_qkv_mixer_output_is_contiguous_so_final_reshape_is_a_view():
    ad = ViT5HyenaAdapter(mixer_cfg(), grid_w=4)
    out = ad.inner_mixer(torch.randn(1, 3, 4, 8))
    assert out.is_contiguous()


def test_T_not_divisible_by_grid_w_raises_runtime_error_from_reshape():
    ad = ViT5HyenaAdapter(mixer_cfg(), grid_w=4)
    with pytest.raises(RuntimeError, match="shape"):
        ad(torch.randn(2, 10, 8))


def test_register_tokens_are_ordinary_grid_positions():
    # [patches (3x4) | CLS | 3 registers] on grid_w=4: the register row is row 3, mixed
    # like any other row (no masking): changing a register changes patch outputs.
    ad = ViT5HyenaAdapter(mixer_cfg(), grid_w=4).double()
    x = torch.randn(1, 16, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 13] += 1.0
    assert not torch.allclose(ad(x)[:, :12], ad(x2)[:, :12])


def test_flop_count_delegates():
    ad = ViT5HyenaAdapter(mixer_cfg(), grid_w=4)
    for inference in (False, True):
        assert ad.flop_count(24, inference=inference) == ad.inner_mixer.flop_count(24, inference=inference, grid_w=4)
    assert ad.flop_count(24) != ad.inner_mixer.flop_count(24, grid_w=3)  # the grid shape matters
    rec = ViT5HyenaAdapter(LazyCall(Recorder)(), grid_w=4)
    assert rec.flop_count(12) == 7 * 12 * 3 and rec.flop_count(12, inference=True) == 7 * 12


def test_flop_count_missing_raises_attribute_error():
    ad = ViT5HyenaAdapter(LazyCall(nn.Identity)(), grid_w=2)
    assert not hasattr(ad.inner_mixer, "flop_count")
    with pytest.raises(AttributeError):
        ad.flop_count(8)


def test_nested_instantiate_of_adapter_config():
    ad = instantiate(LazyCall(ViT5HyenaAdapter)(inner_mixer_cfg=mixer_cfg(), grid_w=4))
    assert isinstance(ad.inner_mixer, QKVSequenceMixer) and ad.grid_w == 4
