"""The real optional kernels against the pure-torch path, on a GPU (skipped without CUDA), and the
StripedHyena kernels that no optional kernel takes (blocked Toeplitz conv, modal filter) on the GPU.

`launch/gpu_kernel_check.sh` installs the kernels where it can and runs this file. A kernel that
is not installed skips its tests; one that is installed but fails its self-test FAILS them.
Errors are the max absolute difference over the reference's max absolute value:

| dtype | output | gradients |
|---|---|---|
| fp32 | 1e-5 short conv, 1e-4 FFT conv (5e-4 past 16384 taps) | 1e-4 (5e-4 past 16384 taps) |
| bf16 | 1e-2 (the torch path rounds after every tap, the kernel once) | 2e-2 |
"""
from __future__ import annotations

import pytest
import torch

from hyena_cp.ops import kernels
from hyena_cp.ops.fftconv import fft_causal_conv1d
from hyena_cp.ops.short_conv import causal_depthwise_conv1d

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = torch.device("cuda")


@pytest.fixture
def spy(monkeypatch):
    """``spy(name)``: skip unless that kernel is installed, fail unless it passed its self-test;
    returns a list that grows by one per call of the kernel."""
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    previous = kernels.set_kernel_policy(None)

    def install(name: str) -> list:
        status = kernels.kernel_status(DEVICE)[name]
        if status.startswith("not installed"):
            pytest.skip(f"{name}: {status}")
        assert status == "ok", status
        kernel, calls = kernels._KERNELS[name], []
        fn = kernel.fn

        def counted(*args, **kwargs):
            calls.append(1)
            return fn(*args, **kwargs)
        monkeypatch.setattr(kernel, "fn", counted)
        return calls
    yield install
    kernels.set_kernel_policy(previous)


def _grads(fn, inputs):
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    y = fn(*inputs)
    g = torch.randn(y.shape, generator=torch.Generator(y.device).manual_seed(1), device=y.device).to(y.dtype)
    return [y, *torch.autograd.grad(y, leaves, g)]


def _on_torch(fn, inputs):
    previous = kernels.set_kernel_policy("torch")
    try:
        return _grads(fn, inputs)
    finally:
        kernels.set_kernel_policy(previous)


def _assert_near(got, want, tol_out, tol_grad):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype
        err = ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
        assert err <= (tol_out if i == 0 else tol_grad), f"{'output' if i == 0 else f'grad {i}'}: {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", [2, 3, 4])
@pytest.mark.parametrize("halo", [False, True])
def test_causal_conv1d_kernel_equals_torch(spy, dtype, kernel, halo):
    calls = spy("causal_conv1d")
    dev = DEVICE
    x = torch.randn(2, 96, 4099, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(96, kernel, device=dev, requires_grad=True)  # fp32 parameters, as under autocast
    b = torch.randn(96, device=dev, requires_grad=True)
    h = torch.randn(2, 96, kernel - 1, device=dev, dtype=dtype, requires_grad=True) if halo else None
    fast = _grads(causal_depthwise_conv1d, [x, w, b, h])
    assert calls, "the kernel was not used"
    tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 2e-2)
    _assert_near(fast, _on_torch(causal_depthwise_conv1d, [x, w, b, h]), *tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [32, 4])
@pytest.mark.parametrize("length", [1000, 16384, 20000])
def test_fft_kernel_equals_torch(spy, dtype, groups, length):
    calls = spy("subquadratic_fft")
    dev = DEVICE
    u = torch.randn(2, 32, length, device=dev, dtype=dtype, requires_grad=True)
    decay = torch.exp(-torch.arange(length, device=dev) / (length / 8))
    k = (torch.randn(groups, length, device=dev) * decay).requires_grad_()
    d = torch.randn(32, device=dev, requires_grad=True)
    fast = _grads(fft_causal_conv1d, [u, k, d])
    assert calls, "the kernel was not used"
    fp32 = 1e-4 if length <= 16384 else 5e-4
    tol = (fp32, fp32) if dtype == torch.float32 else (1e-2, 2e-2)
    _assert_near(fast, _on_torch(fft_causal_conv1d, [u, k, d]), *tol)


def test_fallbacks_on_cuda(monkeypatch):
    """K = 5, packed positions, float64, packed documents, policy torch: the torch path, on any CUDA box."""
    calls = []
    for kernel in kernels._KERNELS.values():
        fn = kernel.load()
        if fn is not None:
            monkeypatch.setattr(kernel, "fn", lambda *a, _fn=fn, **kw: calls.append(1) or _fn(*a, **kw))
    dev = DEVICE
    x, w = torch.randn(2, 8, 64, device=dev), torch.randn(8, 5, device=dev)
    causal_depthwise_conv1d(x, w)
    causal_depthwise_conv1d(x, w[:, :3], positions=torch.arange(64, device=dev).repeat(2, 1))
    causal_depthwise_conv1d(x.double(), w[:, :3].double())
    fft_causal_conv1d(x.double(), torch.randn(8, 64, device=dev, dtype=torch.float64))
    fft_causal_conv1d(x, torch.randn(8, 64, device=dev), cu_seqlens=torch.tensor([0, 10, 128], device=dev))
    previous = kernels.set_kernel_policy("torch")
    try:
        causal_depthwise_conv1d(x, w[:, :3])
        fft_causal_conv1d(x, torch.randn(8, 64, device=dev))
    finally:
        kernels.set_kernel_policy(previous)
    assert calls == []


def test_mixer_on_gpu_equals_torch(spy):
    """A 1-D mixer, fp32, forward and backward, with whichever kernels are installed."""
    from hyena_cp.modules.hyena import Hyena
    from hyena_cp.modules.mixer import QKVSequenceMixer
    status = kernels.kernel_status(DEVICE)
    if not any(v == "ok" for v in status.values()):
        pytest.skip(f"no kernel installed: {status}")
    mixer = QKVSequenceMixer(hidden_dim=64, hyena=Hyena(hidden_dim=64, num_heads=4)).to(DEVICE)
    x = torch.randn(2, 4096, 64, device=DEVICE, requires_grad=True)
    params = [x, *mixer.parameters()]

    def run():
        y = mixer(x)
        return [y, *torch.autograd.grad(y.square().sum(), params)]
    fast = run()
    previous = kernels.set_kernel_policy("torch")
    try:
        ref = run()
    finally:
        kernels.set_kernel_policy(previous)
    _assert_near(fast, ref, 1e-4, 1e-3)


@pytest.mark.parametrize("packed", [False, True])
def test_striped_kernels_on_gpu_equal_the_cpu(packed):
    """Hyena-MR's blocked Toeplitz conv (K=128, with a halo) and Hyena-LI's factored modal filter,
    float64 on the GPU against the same code on the CPU: the pure-torch paths the operators run
    there (no optional kernel takes K=128)."""
    from hyena_cp.ops.modal import modal_kernel
    from hyena_cp.ops.packing import document_positions
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 8, 1000, generator=g, dtype=torch.float64), torch.randn(8, 128, generator=g, dtype=torch.float64)
    halo = torch.randn(2, 8, 127, generator=g, dtype=torch.float64)
    positions = document_positions(torch.tensor([0, 300, 1000, 1500, 2000]), 2000).view(2, 1000) if packed else None

    def conv(device):
        inputs = [t.to(device).requires_grad_() for t in (x, w, halo)]
        return _grads(lambda a, b, h: causal_depthwise_conv1d(a, b, None, h, None if positions is None
                                                              else positions.to(device)), inputs)
    for got, want in zip(conv(DEVICE), conv("cpu")):
        assert (got.cpu() - want).abs().max() <= 1e-12 * want.abs().max()
    poles, residues = -torch.rand(16, 16, generator=g, dtype=torch.float64) * 0.1, torch.randn(16, 16, generator=g,
                                                                                               dtype=torch.float64)
    on_gpu = modal_kernel(poles.to(DEVICE), residues.to(DEVICE), 5000).cpu()
    want = modal_kernel(poles, residues, 5000)
    assert (on_gpu - want).abs().max() <= 1e-12 * want.abs().max()
