"""N-D long and short convolutions with a boundary per axis (causal, linear, circular) against
direct float64 sums written from the definitions (`references.direct_conv_nd`,
`references.direct_short_conv_nd`): values and every gradient, shared and per-sample kernels."""
from __future__ import annotations

import pytest
import torch

from hyena_cp.ops.boundary import circular_offsets, kernel_extent, kernel_offsets, short_conv_reach
from hyena_cp.ops.fftconv import fft_conv_nd
from hyena_cp.ops.short_conv import depthwise_conv_nd
from references import direct_conv_nd, direct_short_conv_nd, expand_groups, rel_err

# FFT vs direct sums in float64 agree to ~1e-15 relative; any indexing, centring or wrap-around
# bug is an O(1) error.
TOL64 = 1e-10

GRIDS = [
    (("causal",), (9,)), (("linear",), (7,)), (("circular",), (8,)), (("circular",), (7,)),
    (("linear", "linear"), (4, 5)), (("circular", "circular"), (4, 6)), (("causal", "circular"), (5, 4)),
    (("circular", "linear"), (3, 6)), (("causal", "linear"), (6, 3)),
    (("linear", "linear", "linear"), (3, 4, 2)), (("causal", "circular", "circular"), (3, 4, 4)),
    (("circular", "causal", "linear"), (2, 3, 5)),
]


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("boundaries,size", GRIDS, ids=lambda v: str(v))
@pytest.mark.parametrize("per_sample", [False, True])
def test_fft_conv_nd_matches_direct(boundaries, size, per_sample):
    g = torch.Generator().manual_seed(sum(size) + len(boundaries))
    batch, channels, groups = 2, 4, 2
    taps = tuple(kernel_extent(n, b) for n, b in zip(size, boundaries))
    u = torch.randn(batch, channels, *size, generator=g, dtype=torch.float64)
    k = torch.randn(*((batch,) if per_sample else ()), groups, *taps, generator=g, dtype=torch.float64)
    d = torch.randn(channels, generator=g, dtype=torch.float64)
    grad_out = torch.randn(batch, channels, *size, generator=g, dtype=torch.float64)
    y, grads = _grads(lambda u, k, d: fft_conv_nd(u, k, d, boundaries), [u, k, d], grad_out)
    expand = (lambda t: expand_groups(t.transpose(0, 1), channels).transpose(0, 1)) if per_sample else \
        (lambda t: expand_groups(t, channels))
    y_ref, grads_ref = _grads(lambda u, k, d: direct_conv_nd(u, expand(k), d, boundaries), [u, k, d], grad_out)
    assert rel_err(y, y_ref) < TOL64
    for name, a, b in zip(["u", "k", "d"], grads, grads_ref):
        assert rel_err(a, b) < TOL64, name


@pytest.mark.parametrize("boundaries,size", [GRIDS[4], GRIDS[6], GRIDS[10]], ids=lambda v: str(v))
def test_fft_conv_nd_keeps_a_channels_last_layout(boundaries, size):
    """A channels-last ``u`` (a grid mixer's z) gives the same values and gradients as a contiguous one,
    and its output and ``u``'s gradient come back channels last (the layout the caller works in)."""
    g = torch.Generator().manual_seed(7)
    taps = tuple(kernel_extent(n, b) for n, b in zip(size, boundaries))
    u = torch.randn(2, 4, *size, generator=g, dtype=torch.float64)
    k = torch.randn(2, *taps, generator=g, dtype=torch.float64)
    d = torch.randn(4, generator=g, dtype=torch.float64)
    grad_out = torch.randn(2, 4, *size, generator=g, dtype=torch.float64)
    last = lambda t: t.movedim(1, -1).contiguous().movedim(-1, 1)  # noqa: E731  same values, channels last
    y, grads = _grads(lambda u, k, d: fft_conv_nd(u, k, d, boundaries), [u, k, d], grad_out)
    inputs = [last(u).requires_grad_(True), k.clone().requires_grad_(True), d.clone()]  # d: no gradient wanted
    y_cl = fft_conv_nd(*inputs, boundaries)
    y_cl.backward(last(grad_out))
    assert y_cl.movedim(1, -1).is_contiguous() and inputs[0].grad.movedim(1, -1).is_contiguous()
    torch.testing.assert_close(y_cl, y, rtol=0, atol=1e-12)
    torch.testing.assert_close(inputs[0].grad, grads[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(inputs[1].grad, grads[1], rtol=0, atol=1e-12)
    assert inputs[2].grad is None


def test_direct_reference_is_not_vacuous():
    """The references tell the boundaries apart: causal, linear and circular give different sums."""
    u = torch.randn(1, 1, 6, dtype=torch.float64)
    outs = {b: direct_conv_nd(u, torch.randn(1, kernel_extent(6, b), dtype=torch.float64).abs() + 1, None, (b,))
            for b in ("causal", "linear", "circular")}
    assert rel_err(outs["causal"], outs["linear"]) > 0.1 and rel_err(outs["linear"], outs["circular"]) > 0.1
    # a circular conv with a delta at offset +1 is a roll by one position, wrapping the last to the first
    k = torch.zeros(1, kernel_extent(6, "circular"), dtype=torch.float64)
    k[0, list(circular_offsets(6)).index(1)] = 1.0
    torch.testing.assert_close(fft_conv_nd(u, k, None, ("circular",)), torch.roll(u, 1, -1), rtol=0, atol=1e-12)


def test_kernel_offsets_per_boundary():
    assert list(kernel_offsets(4, "causal")) == [0, 1, 2, 3]
    assert list(kernel_offsets(3, "linear")) == [-2, -1, 0, 1, 2]
    assert list(kernel_offsets(5, "circular")) == [-2, -1, 0, 1, 2]
    assert list(kernel_offsets(4, "circular")) == [-1, 0, 1]  # the residue 2 == -2 of an even period has no tap


def test_circular_conv_is_translation_equivariant_with_wrap():
    g = torch.Generator().manual_seed(3)
    u = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64)
    k = torch.randn(2, 5, 5, generator=g, dtype=torch.float64)  # a period of 6 has 5 taps
    y = fft_conv_nd(u, k, None, ("circular", "circular"))
    shifted = fft_conv_nd(torch.roll(u, (2, -3), (-2, -1)), k, None, ("circular", "circular"))
    torch.testing.assert_close(shifted, torch.roll(y, (2, -3), (-2, -1)), rtol=0, atol=1e-12)


def test_fft_conv_nd_errors_name_the_problem():
    u = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="one boundary per axis"):
        fft_conv_nd(u, torch.randn(2, 7, 7), None, ("linear",))
    with pytest.raises(ValueError, match="circular n if odd, n-1 if even"):
        fft_conv_nd(u, torch.randn(2, 7, 7), None, ("linear", "circular"))
    with pytest.raises(ValueError, match="must divide the channel count"):
        fft_conv_nd(u, torch.randn(3, 7, 3), None, ("linear", "circular"))


@pytest.mark.parametrize("boundaries,size", GRIDS, ids=lambda v: str(v))
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_depthwise_conv_nd_matches_direct(boundaries, size, kernel):
    g = torch.Generator().manual_seed(kernel + sum(size))
    x = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    w = torch.randn(3, *([kernel] * len(size)), generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    if any(bd == "circular" and n < kernel // 2 for n, bd in zip(size, boundaries)):
        pytest.skip("the wrap needs at least K//2 positions")
    y, grads = _grads(lambda x, w, b: depthwise_conv_nd(x, w, b, boundaries), [x, w, b], grad_out)
    y_ref, grads_ref = _grads(lambda x, w, b: direct_short_conv_nd(x, w, b, boundaries), [x, w, b], grad_out)
    assert rel_err(y, y_ref) < TOL64
    for name, a, c in zip(["x", "w", "b"], grads, grads_ref):
        assert rel_err(a, c) < TOL64, name


@pytest.mark.parametrize("boundaries", [("linear", "circular"), ("circular", "linear", "linear"), ("causal", "circular")])
def test_depthwise_conv_nd_halo_of_a_block_equals_the_whole(boundaries):
    """A block of the first axis with the positions around it as a halo gives the whole conv's block."""
    size = (9, 4, 3)[: len(boundaries)]
    kernel = 3
    x = torch.randn(1, 2, *size, dtype=torch.float64)
    w = torch.randn(2, *([kernel] * len(size)), dtype=torch.float64)
    whole = depthwise_conv_nd(x, w, None, boundaries)
    before, after = short_conv_reach(kernel, boundaries[0])
    start, stop = 3, 6
    idx = torch.arange(start - before, stop + after) % size[0]  # wraps on a circular first axis
    valid = ((torch.arange(start - before, stop + after) >= 0) & (torch.arange(start - before, stop + after) < size[0]))
    padded = x.index_select(2, idx) * (valid if boundaries[0] != "circular" else torch.ones_like(valid)).to(x.dtype) \
        .reshape(-1, *([1] * (len(size) - 1)))
    halo_b, block, halo_a = padded.split([before, stop - start, after], dim=2)
    part = depthwise_conv_nd(block, w, None, boundaries, halo_b, halo_a)
    torch.testing.assert_close(part, whole[:, :, start:stop], rtol=0, atol=1e-12)


def test_short_conv_reach_refuses_even_centred_kernels():
    assert short_conv_reach(4, "causal") == (3, 0)
    assert short_conv_reach(5, "circular") == (2, 2)
    with pytest.raises(ValueError, match="short_kernel_size=4 must be odd along a 'linear' axis"):
        short_conv_reach(4, "linear")
