"""Short depthwise convs (with and without halos) and implicit filters, single process."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from hyena_cp import Hyena
from hyena_cp.ops.masks import ExponentialMask
from hyena_cp.ops.short_conv import causal_depthwise_conv1d, depthwise_conv2d_same
from references import expand_groups


@pytest.mark.parametrize("kernel", [1, 2, 3, 5, 7])
def test_causal_conv1d_against_loop(kernel):
    x = torch.randn(2, 3, 11, dtype=torch.float64)
    w = torch.randn(3, kernel, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    y = causal_depthwise_conv1d(x, w, b)
    ref = torch.zeros_like(x) + b[:, None]
    for t in range(11):
        for j in range(kernel):
            s = t - (kernel - 1) + j
            if s >= 0:
                ref[..., t] += w[:, j] * x[..., s]
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", [2, 3, 6])
def test_causal_conv1d_halo_equals_conv_of_whole(kernel):
    x = torch.randn(2, 4, 20, dtype=torch.float64)
    w, b = torch.randn(4, kernel, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    whole = causal_depthwise_conv1d(x, w, b)
    part = causal_depthwise_conv1d(x[..., 9:], w, b, left_context=x[..., 9 - (kernel - 1):9])
    torch.testing.assert_close(part, whole[..., 9:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", [1, 3, 4])
@pytest.mark.parametrize("halo", [False, True])
def test_compiled_form_of_the_causal_conv_equals_the_eager_one(kernel, halo):
    # what torch.compile traces (one expression, autograd's backward) against the eager
    # autograd.Function: outputs and the gradients of x, weight, bias and halo
    from hyena_cp.ops.short_conv import _shifted_sum

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, w, b = leaf(2, 4, 9), leaf(4, kernel), leaf(4)
    left = leaf(2, 4, kernel - 1) if halo else None
    inputs = [t for t in (x, w, b, left) if t is not None]
    upstream = torch.randn(2, 4, 9, dtype=torch.float64)
    results = []
    for fn in (causal_depthwise_conv1d, _shifted_sum):
        y = fn(x, w, b, left)
        results.append((y, *torch.autograd.grad(y, inputs, upstream)))
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_conv2d_same_and_halo_rows(kernel):
    x = torch.randn(2, 3, 9, 6, dtype=torch.float64)
    w, b = torch.randn(3, kernel, kernel, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    whole = depthwise_conv2d_same(x, w, b)
    torch.testing.assert_close(whole, F.conv2d(x, w[:, None], b, padding=kernel // 2, groups=3))
    p = kernel // 2
    if p:
        above, below = x[:, :, 3 - p:3], x[:, :, 6:6 + p]
        part = depthwise_conv2d_same(x[:, :, 3:6], w, b, rows_above=above, rows_below=below)
        torch.testing.assert_close(part, whole[:, :, 3:6], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="must be odd"):
        depthwise_conv2d_same(x, torch.randn(3, 2, 2, dtype=torch.float64))


def _hyena_filter(dims: int, groups: int, **kw) -> Hyena:
    """A Hyena whose ``build_filter`` is the original generator times its decay window."""
    return Hyena(hidden_dim=groups, num_heads=groups, spatial_dims=dims, checkpoint_filter=False, **kw).double()


def test_filter1d_groups_slice_and_prefix():
    filt = _hyena_filter(1, 4, max_len=64)
    full = filt.build_filter((40,), slice(None))
    assert full.shape == (4, 40)
    torch.testing.assert_close(filt.build_filter((40,), slice(2, 4)), full[2:4], rtol=0, atol=1e-14)
    # With max_len set, positions are absolute: a shorter sequence gets a prefix filter.
    torch.testing.assert_close(filt.build_filter((17,), slice(None)), full[:, :17], rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="max_len"):
        filt.build_filter((65,), slice(None))


def test_filter1d_any_length_without_max_and_decays():
    filt = _hyena_filter(1, 2, mask=functools.partial(ExponentialMask, fast_decay_pct=0.3, slow_decay_pct=1.5,
                                                      target=1e-2))
    for n in (1, 5, 300):
        assert filt.build_filter((n,), slice(None)).shape == (2, n)
    with torch.no_grad():  # constant MLP output 1: the filter is the decay window itself
        filt.filter.out.weight.zero_()
        filt.filter.out.bias.fill_(1.0)
    window = filt.build_filter((100,), slice(None))
    assert torch.all(window[:, 1:] < window[:, :-1])  # strictly decaying
    # The fast group reaches `target` at 30% of the length, the slow one at 150%.
    torch.testing.assert_close(window[:, 30], torch.tensor([1e-2, 1e-2 ** 0.2], dtype=torch.float64))


def test_filter2d_shape_slice_and_limits():
    filt = _hyena_filter(2, 6, max_grid=(8, 10))
    k = filt.build_filter((5, 7), slice(None))
    assert k.shape == (6, 9, 13)
    torch.testing.assert_close(filt.build_filter((5, 7), slice(3, 6)), k[3:], rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="max_grid\\[1\\]"):
        filt.build_filter((4, 11), slice(None))
    assert expand_groups(k, 12).shape == (12, 9, 13)
    torch.testing.assert_close(expand_groups(k, 12)[2:4], k[1:2].expand(2, 9, 13))