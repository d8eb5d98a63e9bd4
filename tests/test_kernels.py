"""The optional-kernel dispatch (`hyena_cp.ops.kernels`) on CPU.

The real kernels need CUDA (tests/test_kernels_gpu.py compares them on a GPU). Here FAKE kernel
modules are put in ``sys.modules``: each implements its package's documented contract in pure
torch and checks the arguments the CUDA extension checks, so these tests prove our glue (halo
concatenation and cropping, layout, dtypes, grouped filters, the fallbacks, the self-test) and
that outputs and the gradients of x, weight, bias and halo equal the pure-torch reference.
"""
from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from hyena_cp.ops import kernels
from hyena_cp.ops.fftconv import fft_causal_conv1d
from hyena_cp.ops.short_conv import causal_depthwise_conv1d

SHORT, FFT = "causal_conv1d", "subquadratic_ops_torch.fft_causal_conv1d"


def fake_causal_conv1d(calls: list, wrong: bool = False) -> types.ModuleType:
    """causal_conv1d.causal_conv1d_fn as documented: x (batch, dim, seqlen), weight (dim, width),
    bias (dim,), K-1 zeros in front, weight[:, -1] on the current token."""
    def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                         final_states_out=None, activation=None):
        width = weight.shape[1]
        assert x.dim() == 3 and weight.shape == (x.shape[1], width) and 2 <= width <= 4
        assert x.stride(2) == 1 or x.stride(1) == 1
        assert bias is None or (bias.shape == (x.shape[1],) and bias.dtype == weight.dtype)
        assert x.dtype == weight.dtype, "hyena_cp casts the weight to x's dtype, as its torch path does"
        assert seq_idx is None and initial_states is None and not return_final_states and activation is None
        calls.append({"shape": tuple(x.shape), "contiguous": x.is_contiguous(), "dtype": x.dtype, "width": width})
        w = weight.flip(-1) if wrong else weight
        return F.conv1d(F.pad(x, (width - 1, 0)), w[:, None], bias, groups=x.shape[1])
    return types.SimpleNamespace(causal_conv1d_fn=causal_conv1d_fn)


def fake_subquadratic_fft(calls: list, wrong: bool = False) -> types.ModuleType:
    """subquadratic_ops_torch.fft_causal_conv1d.fft_causal_conv1d as documented: x (batch, dim,
    seq_len), weight (dim, kernel_size), weight[:, 0] on the current token."""
    def fft_causal_conv1d(x, weight):
        assert x.dim() == 3 and weight.dim() == 2 and weight.shape[0] == x.shape[1]
        assert x.dtype == weight.dtype
        calls.append({"shape": tuple(x.shape), "weight": tuple(weight.shape), "dtype": x.dtype})
        seqlen, taps = x.shape[-1], weight.shape[-1]
        w = weight.flip(-1) if wrong else weight
        if seqlen * taps <= 1 << 18:  # direct sum, independent of any FFT
            return F.conv1d(F.pad(x, (taps - 1, 0)), w.flip(-1)[:, None], groups=x.shape[1])[..., :seqlen]
        n = 2 * max(seqlen, taps)
        return torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(w, n=n), n=n)[..., :seqlen]
    return types.SimpleNamespace(fft_causal_conv1d=fft_causal_conv1d)


@pytest.fixture
def fresh(monkeypatch):
    """Policy auto, no cached imports or self-tests, restored afterwards."""
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    previous = kernels.set_kernel_policy(None)
    kernels._reset()
    yield monkeypatch
    kernels.set_kernel_policy(previous)
    kernels._reset()


@pytest.fixture
def fakes(fresh):
    """Both fake kernels installed and allowed on CPU, float64 included (exact glue checks)."""
    calls = {"short": [], "fft": []}
    fresh.setitem(sys.modules, SHORT, fake_causal_conv1d(calls["short"]))
    fresh.setitem(sys.modules, FFT, fake_subquadratic_fft(calls["fft"]))
    fresh.setattr(kernels, "_DEVICE_TYPES", ("cuda", "cpu"))
    fresh.setattr(kernels, "_SHORT_DTYPES", kernels._SHORT_DTYPES + (torch.float64,))
    fresh.setattr(kernels, "_FFT_DTYPES", kernels._FFT_DTYPES + (torch.float64,))
    return calls


def _short_inputs(kernel: int, halo: bool, n=2, c=6, length=13, dtype=torch.float64):
    x, w, b = torch.randn(n, c, length, dtype=dtype), torch.randn(c, kernel, dtype=dtype), torch.randn(c, dtype=dtype)
    h = torch.randn(n, c, kernel - 1, dtype=dtype) if halo else None
    return [t if t is None else t.requires_grad_() for t in (x, w, b, h)]


def _value_and_grads(fn, inputs):
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    y = fn(*inputs)
    grads = torch.autograd.grad(y, leaves, torch.sin(torch.arange(y.numel(), dtype=y.dtype)).reshape(y.shape))
    return [y, *grads]


def _on_torch(fn, *args):
    """``fn(*args)`` with the kernels switched off."""
    previous = kernels.set_kernel_policy("torch")
    try:
        return fn(*args)
    finally:
        kernels.set_kernel_policy(previous)


def _reference(fn, inputs):
    return _on_torch(_value_and_grads, fn, inputs)


@pytest.mark.parametrize("kernel", [2, 3, 4])
@pytest.mark.parametrize("halo", [False, True])
def test_short_conv_kernel_glue_equals_reference(fakes, kernel, halo):
    inputs = _short_inputs(kernel, halo)
    fast = _value_and_grads(causal_depthwise_conv1d, inputs)
    assert len(fakes["short"]) == 3  # the self-test's two calls (K = 4, 2), then ours
    call = fakes["short"][-1]
    assert call == {"shape": (2, 6, 13 + (kernel - 1 if halo else 0)), "contiguous": True, "dtype": torch.float64,
                    "width": kernel}
    assert fast[0].is_contiguous()
    for got, want in zip(fast, _reference(causal_depthwise_conv1d, inputs)):  # y, grad x, weight, bias (, halo)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_short_conv_kernel_casts_weight_like_the_torch_path(fakes):
    x = torch.randn(2, 4, 9, requires_grad=True)  # fp32 activations, fp64 parameters
    w, b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64,
                                                                                     requires_grad=True)
    fast = _value_and_grads(causal_depthwise_conv1d, [x, w, b])
    assert fakes["short"][-1]["dtype"] == torch.float32 and fast[0].dtype == torch.float32
    for got, want in zip(fast, _reference(causal_depthwise_conv1d, [x, w, b])):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_step_shape(fakes):
    """One token with its K-1 halo (the generation cache's call), under no_grad."""
    x, w, b, h = _short_inputs(3, True, length=1)
    with torch.no_grad():
        fast = causal_depthwise_conv1d(x, w, b, h)
        ref = _on_torch(causal_depthwise_conv1d, x, w, b, h)
    assert fakes["short"][-1]["shape"] == (2, 6, 3)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)


def test_short_conv_falls_back(fakes):
    for kernel in (1, 5):  # widths the kernel does not have
        causal_depthwise_conv1d(*_short_inputs(kernel, False)[:3])
    x, w, b, h = _short_inputs(3, True)
    positions = torch.tensor([list(range(13)), [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2]])
    causal_depthwise_conv1d(x, w, b, h, positions)  # packed documents
    assert fakes["short"] == []


@pytest.mark.parametrize("groups", [6, 3, 1])
@pytest.mark.parametrize("length", [40, 70])
def test_fft_kernel_glue_equals_reference(fakes, monkeypatch, groups, length):
    monkeypatch.setattr(kernels, "_FFT_CLASS_BOUNDS", (50, 64))  # L = 70 is then the long path's class
    u = torch.randn(2, 6, length, dtype=torch.float64, requires_grad=True)
    k = torch.randn(groups, length, dtype=torch.float64, requires_grad=True)
    d = torch.randn(6, dtype=torch.float64, requires_grad=True)
    fast = _value_and_grads(fft_causal_conv1d, [u, k, d])
    assert fakes["fft"][-1] == {"shape": (2, 6, length), "weight": (6, length), "dtype": torch.float64}
    for got, want in zip(fast, _reference(fft_causal_conv1d, [u, k, d])):  # y, grad u, k, d
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_fft_kernel_computes_in_fp32_and_skips_packing(fakes):
    u, k = torch.randn(2, 4, 32, dtype=torch.bfloat16), torch.randn(2, 32)
    y = fft_causal_conv1d(u, k)
    assert fakes["fft"][-1]["dtype"] == torch.float32 and y.dtype == torch.bfloat16
    one_per_row = torch.tensor([0, 32, 64])
    fft_causal_conv1d(u, k, cu_seqlens=one_per_row)
    assert len(fakes["fft"]) == 3  # self-test, two calls
    fft_causal_conv1d(u, k, cu_seqlens=torch.tensor([0, 10, 32, 64]))  # packed: torch path
    assert len(fakes["fft"]) == 3


def test_cpu_float64_and_compile_take_the_torch_path(fresh):
    """Without the test-only widening a CPU tensor never reaches a kernel, installed or not."""
    calls = {"short": [], "fft": []}
    fresh.setitem(sys.modules, SHORT, fake_causal_conv1d(calls["short"]))
    fresh.setitem(sys.modules, FFT, fake_subquadratic_fft(calls["fft"]))
    causal_depthwise_conv1d(*_short_inputs(3, True, dtype=torch.float32))
    fft_causal_conv1d(torch.randn(1, 2, 16), torch.randn(2, 16))
    assert calls == {"short": [], "fft": []}
    fresh.setattr(kernels, "_DEVICE_TYPES", ("cuda", "cpu"))
    fft_causal_conv1d(torch.randn(1, 2, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64))
    fresh.setattr(torch.compiler, "is_compiling", lambda: True)
    causal_depthwise_conv1d(*_short_inputs(3, True, dtype=torch.float32))
    assert calls == {"short": [], "fft": []}


def test_missing_kernels_take_the_torch_path(fresh):
    fresh.setitem(sys.modules, SHORT, None)  # None in sys.modules: import raises ImportError
    fresh.setitem(sys.modules, FFT, None)
    fresh.setattr(kernels, "_DEVICE_TYPES", ("cuda", "cpu"))
    inputs = _short_inputs(3, True, dtype=torch.float32)
    fast = _value_and_grads(causal_depthwise_conv1d, inputs)
    for got, want in zip(fast, _reference(causal_depthwise_conv1d, inputs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    fft_causal_conv1d(torch.randn(1, 2, 16), torch.randn(2, 16))
    status = kernels.kernel_status("cpu")
    assert all(status[name].startswith("not installed") for name in ("causal_conv1d", "subquadratic_fft"))


def test_policy_switch(fakes, monkeypatch):
    inputs = _short_inputs(3, False)
    monkeypatch.setenv(kernels.KERNEL_ENV, "torch")
    assert kernels.kernel_policy() == "torch"
    causal_depthwise_conv1d(*inputs[:3])
    assert fakes["short"] == []
    monkeypatch.setenv(kernels.KERNEL_ENV, "auto")
    kernels.set_kernel_policy("torch")  # the in-process switch wins over the variable
    causal_depthwise_conv1d(*inputs[:3])
    assert fakes["short"] == []
    kernels.set_kernel_policy(None)
    causal_depthwise_conv1d(*inputs[:3])
    assert len(fakes["short"]) == 3
    with pytest.raises(ValueError, match="kernel policy"):
        kernels.set_kernel_policy("cuda")
    monkeypatch.setenv(kernels.KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match=kernels.KERNEL_ENV):
        kernels.kernel_policy()


@pytest.mark.parametrize("broken", ["wrong", "raises"])
def test_self_test_disables_a_bad_kernel(fresh, broken):
    calls: list = []
    short = fake_causal_conv1d(calls, wrong=True)
    if broken == "raises":
        def causal_conv1d_fn(*args, **kwargs):
            raise RuntimeError("CUDA error: the provided PTX was compiled with an unsupported toolchain")
        short = types.SimpleNamespace(causal_conv1d_fn=causal_conv1d_fn)
    fresh.setitem(sys.modules, SHORT, short)
    fresh.setitem(sys.modules, FFT, fake_subquadratic_fft([], wrong=True))
    fresh.setattr(kernels, "_DEVICE_TYPES", ("cuda", "cpu"))
    inputs = _short_inputs(3, True, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="failed its self-test"):
        fast = _value_and_grads(causal_depthwise_conv1d, inputs)
    for got, want in zip(fast, _reference(causal_depthwise_conv1d, inputs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not per call
        causal_depthwise_conv1d(*inputs)
    with pytest.warns(RuntimeWarning, match="failed its self-test"):
        status = kernels.kernel_status("cpu")
    assert status["causal_conv1d"].startswith("failed self-test")
    assert status["subquadratic_fft"].startswith("failed self-test")


def test_kernel_that_does_not_load(fresh):
    class Broken(types.ModuleType):
        def __getattr__(self, name):
            raise OSError("libcudart.so.12: cannot open shared object file")
    fresh.setitem(sys.modules, SHORT, Broken(SHORT))
    fresh.setattr(kernels, "_DEVICE_TYPES", ("cuda", "cpu"))
    with pytest.warns(RuntimeWarning, match="does not load"):
        causal_depthwise_conv1d(*_short_inputs(3, False, dtype=torch.float32)[:3])
    assert kernels.kernel_status("cpu")["causal_conv1d"].startswith("not installed (OSError")


def test_mixer_runs_the_kernels_and_matches(fakes):
    """A whole 1-D mixer, forward and backward: both call sites reach the kernels, same numbers."""
    from hyena_cp.modules.hyena import Hyena
    from hyena_cp.modules.mixer import QKVSequenceMixer
    mixer = QKVSequenceMixer(hidden_dim=8, hyena=Hyena(hidden_dim=8, num_heads=2, filter_width=8)).double()
    x = torch.randn(2, 24, 8, dtype=torch.float64, requires_grad=True)
    params = [x, *mixer.parameters()]

    def run():
        return torch.autograd.grad(mixer(x).square().sum(), params)
    fast = run()
    assert fakes["short"] and fakes["fft"]
    for got, want in zip(fast, _on_torch(run)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
