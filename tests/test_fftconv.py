"""FFT long convolutions equal a direct float64 convolution (values and gradients)."""
from __future__ import annotations

import pytest
import torch

from hyena_cp.ops.fftconv import fft_causal_conv1d, fft_conv2d
from references import direct_causal_conv1d, direct_conv2d_centered, expand_groups, rel_err

# FFT vs direct conv in float64 agree to ~1e-15 relative; 1e-10 leaves room for length
# effects while any indexing or wrap-around bug gives O(1) errors.
TOL64 = 1e-10


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("seqlen", [1, 2, 7, 16, 33, 100])
def test_causal_conv1d_matches_direct(seqlen):
    g = torch.Generator().manual_seed(seqlen)
    u = torch.randn(2, 3, seqlen, generator=g, dtype=torch.float64)
    k = torch.randn(3, seqlen, generator=g, dtype=torch.float64)
    d = torch.randn(3, generator=g, dtype=torch.float64)
    grad_out = torch.randn(2, 3, seqlen, generator=g, dtype=torch.float64)
    y, grads = _grads(fft_causal_conv1d, [u, k, d], grad_out)
    y_ref, grads_ref = _grads(direct_causal_conv1d, [u, k, d], grad_out)
    assert rel_err(y, y_ref) < TOL64
    for name, a, b in zip(["u", "k", "d"], grads, grads_ref):
        assert rel_err(a, b) < TOL64, name


def test_causal_conv1d_is_causal():
    u = torch.randn(1, 2, 20, dtype=torch.float64)
    k = torch.randn(2, 20, dtype=torch.float64)
    u2 = u.clone()
    u2[..., 12:] += 5.0  # changing the future must not change the past
    # FFT round-off differs (~1e-15), but nothing of the +5 change may reach the past.
    torch.testing.assert_close(fft_causal_conv1d(u, k)[..., :12], fft_causal_conv1d(u2, k)[..., :12],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (5, 5), (4, 7), (8, 6), (9, 13)])
def test_conv2d_matches_direct(h, w):
    g = torch.Generator().manual_seed(100 * h + w)
    u = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    k = torch.randn(3, 2 * h - 1, 2 * w - 1, generator=g, dtype=torch.float64)
    d = torch.randn(3, generator=g, dtype=torch.float64)
    grad_out = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    y, grads = _grads(fft_conv2d, [u, k, d], grad_out)
    y_ref, grads_ref = _grads(direct_conv2d_centered, [u, k, d], grad_out)
    assert rel_err(y, y_ref) < TOL64
    for name, a, b in zip(["u", "k", "d"], grads, grads_ref):
        assert rel_err(a, b) < TOL64, name


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_grouped_filters_equal_per_channel_filters(groups):
    u = torch.randn(2, 6, 10, dtype=torch.float64, requires_grad=True)
    k = torch.randn(groups, 10, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 6, 10, dtype=torch.float64)
    y = fft_causal_conv1d(u, k)
    y_ref = direct_causal_conv1d(u, expand_groups(k, 6))
    assert rel_err(y, y_ref) < TOL64
    g, g_ref = (torch.autograd.grad(out, [u, k], grad_out) for out in (y, y_ref))
    assert rel_err(g[0], g_ref[0]) < TOL64 and rel_err(g[1], g_ref[1]) < TOL64
    u2 = torch.randn(1, 6, 3, 4, dtype=torch.float64)
    k2 = torch.randn(groups, 5, 7, dtype=torch.float64)
    assert rel_err(fft_conv2d(u2, k2), direct_conv2d_centered(u2, expand_groups(k2, 6))) < TOL64
    with pytest.raises(ValueError, match="must divide the channel count"):
        fft_causal_conv1d(u, torch.randn(4, 10, dtype=torch.float64))


def test_conv2d_centred_delta_is_identity():
    # A kernel that is 1 at offset (0, 0) only (index H-1, W-1) must return the input.
    u = torch.randn(1, 1, 4, 6, dtype=torch.float64)
    k = torch.zeros(1, 7, 11, dtype=torch.float64)
    k[0, 3, 5] = 1.0
    torch.testing.assert_close(fft_conv2d(u, k), u, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_computes_in_float32(dtype):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 4, 64, generator=g).to(dtype)
    k = (torch.randn(4, 64, generator=g) * 0.1).to(dtype)
    y = fft_causal_conv1d(u, k)
    assert y.dtype == dtype
    ref = direct_causal_conv1d(u.double(), k.double())
    # Only the final cast rounds: error is one bf16/fp16 ulp-level, not FFT-in-bf16 level.
    assert rel_err(y.double(), ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto = fft_conv2d(u.float().reshape(2, 4, 8, 8), k.float().reshape(4, 8, 8).repeat(1, 2, 2)[:, :15, :15])
    assert y_auto.dtype == torch.float32


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="k \\[G, L\\]"):
        fft_causal_conv1d(torch.randn(1, 2, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="linear 2n-1"):
        fft_conv2d(torch.randn(1, 2, 3, 3), torch.randn(2, 3, 3))
