"""`Hyena` / `QKVSequenceMixer` with the spectral kernel path (``spectral_kernel=True``) against the
same mixer building its kernel (``spectral_kernel=False``): outputs and EVERY gradient (input,
conditioning, each parameter) in float64, for the Fourier and SIREN generators (FiLM, grouped
filters), 2-D and 3-D, mixed boundaries, with and without ``checkpoint_filter``; float32 and bf16
autocast against float64; when the path is taken; negative twins."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from hyena_cp import Hyena, QKVSequenceMixer
from hyena_cp.modules import hyena as hyena_module
from hyena_cp.ops import fftconv
from hyena_cp.ops.fftconv import kernel_spectrum
from hyena_cp.ops.masks import ExponentialMask
from hyena_cp.ops.siren import RandomFourierFilter, SirenFilter
from references import rel_err

TOL64 = 1e-12  # the same linear maps in another order (see test_spectral_conv)

CASES = {  # (spatial_dims, boundary, x shape [B, *S, C], Hyena kwargs)
    "2d_fourier_linear": (2, "linear", (2, 5, 6, 8), dict(num_heads=8, filter_width=6, mask=None)),
    "2d_fourier_grouped_causal_x_circular": (2, ("causal", "circular"), (2, 5, 6, 8),
                                             dict(num_heads=4, filter_width=5, mask=None)),
    "2d_siren_film_circular_x_linear": (2, ("circular", "linear"), (2, 6, 5, 8), dict(
        num_heads=4, mask=None, filter=functools.partial(SirenFilter, L_cache=(6, 5), hidden_dim=6, embedding_dim=6,
                                                         cond_dim=3, film_init="small_random", film_init_std=0.5))),
    "3d_siren_no_bias_mixed": (3, ("causal", "linear", "circular"), (1, 3, 4, 4, 8), dict(
        num_heads=2, mask=None, filter=functools.partial(SirenFilter, L_cache=4, hidden_dim=5, bias=False))),
    "3d_rff_film_free": (3, "circular", (1, 3, 4, 5, 8), dict(
        num_heads=8, mask=None, filter=functools.partial(RandomFourierFilter, L_cache=5, hidden_dim=6))),
}


def mixers(name: str, dtype=torch.float64, **hyena_kw):
    """The same mixer twice (equal parameters): spectral path forced on, and off."""
    dims, boundary, shape, kw = CASES[name]
    torch.manual_seed(0)
    hyena = Hyena(hidden_dim=shape[-1], spatial_dims=dims, boundary=boundary, spectral_kernel=True, **kw, **hyena_kw)
    on = QKVSequenceMixer(hidden_dim=shape[-1], hyena=hyena).to(dtype)
    with torch.no_grad():  # zero-initialised parts would hide gradient bugs
        for p in on.parameters():
            p.add_(0.2 * torch.randn_like(p))
    off = copy.deepcopy(on)
    off.hyena.spectral_kernel = False
    assert on.hyena.use_spectral(slice(0, on.hyena.num_heads)) and not off.hyena.use_spectral(slice(0, 1))
    x = torch.randn(shape, dtype=dtype)
    cond = torch.randn(shape[0], on.cond_dim, dtype=dtype) if on.cond_dim else None
    return on, off, x, cond


def run(m: QKVSequenceMixer, x: torch.Tensor, cond: torch.Tensor | None, grad: torch.Tensor):
    x = x.clone().requires_grad_(True)
    cond = None if cond is None else cond.clone().requires_grad_(True)
    y = m(x, **({} if cond is None else {"conditioning": cond}))
    y.backward(grad)
    grads = {"x": x.grad, **({} if cond is None else {"cond": cond.grad})}
    grads.update({n: p.grad for n, p in m.named_parameters()})
    return y.detach(), grads


def compare(on, off, x, cond) -> dict[str, float]:
    """Relative error of the output and of every gradient, spectral path vs kernel path."""
    grad = torch.randn_like(x)
    y, g = run(on, x, cond, grad)
    y_ref, g_ref = run(off, x, cond, grad)
    assert g.keys() == g_ref.keys()
    missing = [n for n in g if (g[n] is None) != (g_ref[n] is None)]
    assert not missing, missing
    return {"y": rel_err(y, y_ref), **{n: rel_err(g[n], g_ref[n]) for n in g if g[n] is not None}}


@pytest.mark.parametrize("checkpoint_filter", [True, False], ids=["checkpoint", "stored"])
@pytest.mark.parametrize("name", list(CASES))
def test_spectral_path_equals_the_kernel_path(name, checkpoint_filter):
    errors = compare(*mixers(name, checkpoint_filter=checkpoint_filter))
    assert any(n.startswith("hyena.filter.out") for n in errors) and "hyena.skip" in errors
    bad = {n: e for n, e in errors.items() if not e < TOL64}
    assert not bad, bad


def test_twin_a_missing_nyquist_doubling_is_caught(monkeypatch):
    monkeypatch.setattr(fftconv, "_spectrum_grad", lambda grad_f, extents: grad_f / torch.tensor(extents).prod())
    errors = compare(*mixers("2d_fourier_grouped_causal_x_circular"))
    assert errors["y"] < TOL64 and errors["hyena.filter.out.weight"] > 1e-2


def test_twin_a_bias_unlike_the_kernel_is_caught(monkeypatch):
    """A bias added to every bin of the spectrum (a delta at offset 0, not the kernel's taps)."""
    def bias_as_delta(h, weight, bias, taps, sizes, boundaries):
        k_f = kernel_spectrum(h, weight, None, taps, sizes, boundaries)
        return k_f + bias.reshape(-1, *[1] * len(sizes))
    monkeypatch.setattr(hyena_module, "kernel_spectrum", bias_as_delta)
    errors = compare(*mixers("2d_fourier_linear"))
    assert errors["y"] > 1e-3


@pytest.mark.parametrize("name", ["2d_siren_film_circular_x_linear", "3d_siren_no_bias_mixed"])
def test_float32_spectral_path_is_as_accurate_as_the_kernel_path(name):
    """Against float64: both fp32 paths make errors of ~eps * log2(FFT size) per transform; 1e-5
    relative is ~100x that and far below any real bug."""
    on, off, x, cond = mixers(name)
    ref, _ = run(off, x, cond, torch.randn_like(x))
    grad = torch.randn_like(x)
    for m in (on, off):
        y, _ = run(m.float(), x.float(), None if cond is None else cond.float(), grad.float())
        assert rel_err(y.double(), ref) < 1e-5


def test_bf16_autocast_runs_the_spectrum_in_float32():
    on, off, x, cond = mixers("2d_fourier_linear", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = run(on, x, cond, torch.ones_like(x))
        y_ref, _ = run(off, x, cond, torch.ones_like(x))
    assert y.dtype == y_ref.dtype and rel_err(y.float(), y_ref.float()) < 1e-2  # bf16 projections, 8 bits


def test_when_the_spectral_path_is_taken():
    def hyena(**kw):
        return Hyena(hidden_dim=64, spatial_dims=2, **{"num_heads": 64, "mask": None, "filter_width": 16, **kw})
    assert not hyena().use_spectral(slice(0, 64))  # the default builds the kernel
    assert hyena(spectral_kernel=None).use_spectral(slice(0, 64))  # 17 feature transforms < 64 filters
    assert not hyena(spectral_kernel=None).use_spectral(slice(0, 16))  # a CP rank's 16 groups: 17 is not fewer
    assert not hyena(num_heads=8, spectral_kernel=None).use_spectral(slice(0, 8))
    assert hyena(num_heads=8, spectral_kernel=True).use_spectral(slice(0, 8))
    assert not hyena(mask=ExponentialMask, spectral_kernel=True).use_spectral(slice(0, 64))  # a window multiplies the taps
    causal = Hyena(hidden_dim=64, num_heads=64, spatial_dims=1, mask=None, filter_width=16, spectral_kernel=True)
    assert not causal.use_spectral(slice(0, 64))  # the 1-D causal conv keeps its own path
    with pytest.raises(ValueError, match="spectral_kernel='yes' must be None"):
        hyena(spectral_kernel="yes")


def test_flop_count_counts_the_transforms_the_spectral_path_runs():
    """64 filter groups, W = 16 features (+ the bias): the spectral path transforms 17 signals instead of
    64 kernels, and applies the output layer to their spectra (4 FLOPs per group, transform and bin)."""
    from hyena_cp import flops

    def fft_flops(**kw):
        h = Hyena(hidden_dim=64, spatial_dims=2, num_heads=64, mask=None, filter_width=16, **kw)
        return h.flop_count((8, 8))["fft_conv"]
    numel = 16 * 16  # the FFT of an 8 x 8 linear-boundary grid: 16 x 16 points
    assert fft_flops() == flops.fft_conv(64, 64, numel)
    assert fft_flops(spectral_kernel=True) == flops.fft_conv(64, 17, numel) + 4 * 64 * 17 * (numel // 2 + 1)
