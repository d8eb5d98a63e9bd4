"""The spectral kernel path of the N-D FFT conv: `fft_conv_nd_spectral` of `kernel_spectrum(h, W, b)`
equals `fft_conv_nd` of the explicit kernel ``k = W h^T + b`` (values and the gradients of u, d, h,
W, b, float64), and a direct float64 convolution; `gradcheck` of the spectrum's gradient itself
(the doubled bins of a one-sided spectrum, odd and even last axes); negative twins for a missing
doubling and a bias laid out unlike the kernel."""
from __future__ import annotations

import math

import pytest
import torch

from hyena_cp.ops import fftconv
from hyena_cp.ops.boundary import fft_extent, kernel_extent
from hyena_cp.ops.fftconv import fft_conv_nd, fft_conv_nd_spectral, kernel_spectrum
from references import direct_conv_nd, expand_groups, rel_err

# Both paths are the same linear maps in another order: float64 agrees to ~1e-15 relative; a bin,
# layout or normalisation bug is an O(1) error.
TOL64 = 1e-12

GRIDS = [  # odd and even sizes; even circular axes are where the kernel's roll (and the bias's) matters
    (("linear",), (7,)), (("circular",), (8,)), (("circular",), (7,)), (("linear",), (6,)),
    (("linear", "linear"), (4, 5)), (("causal", "circular"), (5, 6)), (("linear", "circular"), (6, 5)),
    (("circular", "linear"), (4, 4)), (("causal", "linear", "circular"), (3, 4, 6)),
    (("circular", "circular", "linear"), (3, 4, 5)),
]


def _inputs(boundaries, size, per_sample: bool, bias: bool, seed: int = 0, batch: int = 2, channels: int = 4,
            groups: int = 2, width: int = 3):
    g = torch.Generator().manual_seed(seed)
    taps = tuple(kernel_extent(n, b) for n, b in zip(size, boundaries))
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {"u": rnd(batch, channels, *size), "d": rnd(channels),
            "h": rnd(*((batch,) if per_sample else ()), math.prod(taps), width), "w": rnd(groups, width),
            "b": rnd(groups) if bias else None, "taps": taps}


def explicit_kernel(h, w, b, taps):
    """``W h^T + b`` as a kernel in offset layout, ``[G, *K]`` or ``[B, G, *K]``."""
    k = w @ h.transpose(-1, -2) + (0 if b is None else b[:, None])
    return k.reshape(*h.shape[:-2], w.shape[0], *taps)


def _run(fn, t, boundaries, grad_out):
    leaves = {n: v.clone().requires_grad_(True) for n, v in t.items() if isinstance(v, torch.Tensor)}
    y = fn(leaves, boundaries)
    y.backward(grad_out)
    return y.detach(), {n: v.grad for n, v in leaves.items()}


def spectral(t, boundaries, spectrum=kernel_spectrum):
    sizes = tuple(t["u"].shape[2:])
    return fft_conv_nd_spectral(t["u"], spectrum(t["h"], t["w"], t.get("b"), taps_of(sizes, boundaries), sizes,
                                                 boundaries), t["d"], boundaries)


def explicit(t, boundaries):
    sizes = tuple(t["u"].shape[2:])
    return fft_conv_nd(t["u"], explicit_kernel(t["h"], t["w"], t.get("b"), taps_of(sizes, boundaries)), t["d"],
                       boundaries)


def taps_of(sizes, boundaries):
    return tuple(kernel_extent(n, b) for n, b in zip(sizes, boundaries))


@pytest.mark.parametrize("boundaries,size", GRIDS, ids=lambda v: str(v))
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "film"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_spectral_conv_equals_the_explicit_kernel(boundaries, size, per_sample, bias):
    t = _inputs(boundaries, size, per_sample, bias, seed=sum(size))
    t.pop("taps")
    grad_out = torch.randn_like(t["u"])
    y, grads = _run(spectral, t, boundaries, grad_out)
    y_ref, grads_ref = _run(explicit, t, boundaries, grad_out)
    assert rel_err(y, y_ref) < TOL64
    assert grads.keys() == grads_ref.keys() == ({"u", "d", "h", "w"} | ({"b"} if bias else set()))
    for name in grads:
        assert rel_err(grads[name], grads_ref[name]) < TOL64, name


@pytest.mark.parametrize("boundaries,size", [GRIDS[1], GRIDS[5], GRIDS[8]], ids=lambda v: str(v))
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "film"])
def test_spectral_conv_matches_a_direct_convolution(boundaries, size, per_sample):
    t = _inputs(boundaries, size, per_sample, bias=True, seed=3)
    k = explicit_kernel(t["h"], t["w"], t["b"], t.pop("taps"))
    channels = t["u"].shape[1]
    k = expand_groups(k.transpose(0, 1), channels).transpose(0, 1) if per_sample else expand_groups(k, channels)
    grad_out = torch.randn_like(t["u"])
    y, grads = _run(spectral, t, boundaries, grad_out)
    y_ref, grads_ref = _run(lambda l, b: direct_conv_nd(l["u"], k, l["d"], b), {"u": t["u"], "d": t["d"]},
                            boundaries, grad_out)
    assert rel_err(y, y_ref) < TOL64
    for name in ("u", "d"):
        assert rel_err(grads[name], grads_ref[name]) < TOL64, name


@pytest.mark.parametrize("boundaries,size", [(("circular",), (6,)), (("circular",), (5,)),
                                             (("causal", "circular"), (2, 4)), (("linear", "circular"), (2, 3))],
                         ids=lambda v: str(v))
def test_gradcheck_of_a_spectrum_input(boundaries, size):
    """Any complex one-sided spectrum, not only a Hermitian-consistent one: the DC bin, and the
    Nyquist bin of an even last axis, count once, the others twice."""
    g = torch.Generator().manual_seed(5)
    extents = [fft_extent(n, b) for n, b in zip(size, boundaries)]
    u = torch.randn(1, 2, *size, generator=g, dtype=torch.float64, requires_grad=True)
    k_f = torch.randn(2, *extents[:-1], extents[-1] // 2 + 1, generator=g, dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, k_f: fft_conv_nd_spectral(u, k_f, None, boundaries), (u, k_f))


def test_gradcheck_through_the_features():
    boundaries, size = ("causal", "circular"), (2, 4)
    t = _inputs(boundaries, size, per_sample=True, bias=True, batch=1, channels=2, groups=2, width=2)
    taps = t.pop("taps")
    leaves = [t[n].requires_grad_(True) for n in ("u", "d", "h", "w", "b")]
    fn = lambda u, d, h, w, b: fft_conv_nd_spectral(u, kernel_spectrum(h, w, b, taps, size, boundaries), d, boundaries)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


def test_twin_a_spectrum_gradient_without_the_doubled_bins_is_caught(monkeypatch):
    boundaries, size = ("causal", "circular"), (5, 6)
    t = _inputs(boundaries, size, per_sample=False, bias=True)
    t.pop("taps")
    grad_out = torch.randn_like(t["u"])
    _, grads_ref = _run(explicit, t, boundaries, grad_out)
    monkeypatch.setattr(fftconv, "_spectrum_grad", lambda grad_f, extents: grad_f / math.prod(extents))
    _, grads = _run(spectral, t, boundaries, grad_out)
    assert rel_err(grads["u"], grads_ref["u"]) < TOL64  # only the kernel's gradient goes wrong
    assert rel_err(grads["w"], grads_ref["w"]) > 0.1


def test_twin_a_bias_not_laid_out_like_the_kernel_is_caught():
    """The bias's constant feature must be rolled like the kernel on an even circular axis (K = n - 1 taps
    of n places): padding it without the roll moves the empty place."""
    boundaries, size = ("causal", "circular"), (5, 6)
    t = _inputs(boundaries, size, per_sample=False, bias=True)
    t.pop("taps")
    extents = tuple(fft_extent(n, b) for n, b in zip(size, boundaries))

    def unrolled_bias(h, w, b, taps, sizes, bds):
        ones = torch.nn.functional.pad(h.new_ones(taps), (0, extents[1] - taps[1]))
        return kernel_spectrum(h, w, None, taps, sizes, bds) + b[:, None, None] * torch.fft.rfftn(ones, s=extents)

    y_ref = explicit(t, boundaries)
    assert rel_err(spectral(t, boundaries), y_ref) < TOL64
    assert rel_err(spectral(t, boundaries, unrolled_bias), y_ref) > 1e-3


def test_bad_spectrum_arguments_name_the_problem():
    u = torch.randn(1, 4, 4, 5)
    with pytest.raises(ValueError, match=r"complex k_f \[G, \*F\] or \[B, G, \*F\] with F=\(8, 6\)"):
        fft_conv_nd_spectral(u, torch.randn(2, 8, 6, dtype=torch.complex64), None, ("linear", "linear", "linear"))
    with pytest.raises(ValueError, match="F=\\(8, 6\\)"):
        fft_conv_nd_spectral(u, torch.randn(2, 8, 5, dtype=torch.complex64), None, ("linear", "linear"))
    with pytest.raises(ValueError, match="must divide the channel count"):
        fft_conv_nd_spectral(u, torch.randn(3, 8, 6, dtype=torch.complex64), None, ("linear", "linear"))
    with pytest.raises(ValueError, match="kernel_spectrum expects h"):
        kernel_spectrum(torch.randn(10, 3), torch.randn(2, 3), None, (7, 9), (4, 5), ("linear", "linear"))
