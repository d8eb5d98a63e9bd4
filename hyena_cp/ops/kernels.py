"""Optional CUDA kernels for the short and the long causal conv, picked at run time (pure math,
no process groups). The pure-torch functions in `hyena_cp.ops.short_conv` and
`hyena_cp.ops.fftconv` stay the reference; a kernel is only ever a faster way to the same
result, never a requirement (none of them runs on CPU).

What is picked, and when:

- ``causal_depthwise_conv1d`` (the short conv) runs ``causal_conv1d.causal_conv1d_fn(x, weight,
  bias)`` (PyPI ``causal-conv1d``, Dao-AILab; ``weight[:, -1]`` multiplies the current token, as
  ours) when x is a CUDA tensor in fp32/fp16/bf16, K is 2..4, there are no packed ``positions``
  and the kernel passed its self-test on that device. A halo ``left_context [N, C, K-1]`` is
  concatenated in front of x and the first K-1 outputs are dropped: the kernel's own
  ``initial_states`` argument exists but accepts only the channel-last layout
  (``x.stride(1) == 1``, C % 8 == 0), and our tensors are channel-first. The gradient of the
  halo flows back through the concatenation.
- ``fft_causal_conv1d`` (the long conv, one document per row) runs
  ``subquadratic_ops_torch.fft_causal_conv1d.fft_causal_conv1d(x, weight)`` (PyPI
  ``subquadratic-ops-torch-cu12`` / ``-cu13``, NVIDIA; ``x [B, C, L]``, ``weight [C, K]``,
  ``weight[:, 0]`` multiplies the current token, as our ``k``) when u is a CUDA tensor, the
  compute dtype is fp32 (a float64 run stays on torch: that is the tests' reference), and the
  kernel passed its self-test on that device for that length class (the kernel has a
  single-pass path for filters up to 8192 taps, or 16384 from SM90 on, and a long path beyond:
  each class is self-tested at a length of its own). Grouped filters ``[G, L]`` are repeated to one row per channel,
  which the kernel needs; autograd sums their gradients back. Packed documents stay on torch.
- Under ``torch.compile`` (while tracing) the torch path is traced: the self-test cannot run
  inside a graph, and causal-conv1d's extension is opaque to dynamo.
- Everything else (CPU tensors, float64, K = 1 or > 4, packed documents, a kernel not
  installed, failing to import, or failing its self-test) runs the pure-torch path.

The switch: ``HYENA_CP_KERNELS=auto`` (default: use a kernel where one fits) or ``torch``
(never), read at each call, not at import; `set_kernel_policy` overrides it in-process
(``None`` returns to the variable). `kernel_status` reports what is installed and usable.

Safety: each package is imported lazily, once per process; any import error (an ImportError, or
a CUDA build that does not load) means "not installed". Before its first use on a device a
kernel runs once on a small fixed input against an aten reference, output and gradients; an
error or a mismatch disables it on that device with one warning. NVIDIA's own wrappers of these
kernels do the same, because a CUDA/PTX mismatch can make a kernel return wrong numbers without
raising. The probes use fixed inputs, not the RNG, so picking a kernel never changes a run's
random stream.
"""
from __future__ import annotations

import importlib
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["set_kernel_policy", "kernel_policy", "kernel_status", "fast_causal_depthwise_conv1d",
           "fast_fft_causal_conv1d", "KERNEL_ENV"]

KERNEL_ENV = "HYENA_CP_KERNELS"
_POLICIES = ("auto", "torch")
_override: str | None = None

# Where and in which dtypes a kernel may run (module constants so the tests can run a fake kernel on CPU).
_DEVICE_TYPES = ("cuda",)
_SHORT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SHORT_WIDTHS = (2, 3, 4)  # causal-conv1d: "only supports width between 2 and 4"
_FFT_DTYPES = (torch.float32,)
# Filter lengths at which subquadratic-ops-torch changes path: single-pass up to 8192 taps on every
# GPU, up to 16384 from SM90 on, its long path beyond. One self-test length per class.
_FFT_CLASS_BOUNDS = (8192, 16384)
_FFT_PROBE_LENGTHS = (300, 12000, 20000)  # neither powers of two nor multiples of the kernel's tiles


def set_kernel_policy(policy: str | None) -> str | None:
    """``"auto"`` (use a kernel where one fits), ``"torch"`` (never), or None (back to
    ``$HYENA_CP_KERNELS``, default auto). Returns the previous override, to restore it."""
    global _override
    if policy is not None and policy not in _POLICIES:
        raise ValueError(f"kernel policy must be one of {_POLICIES} or None, got {policy!r}")
    previous, _override = _override, policy
    return previous


def kernel_policy() -> str:
    """The policy in force: the `set_kernel_policy` override, else ``$HYENA_CP_KERNELS`` (default auto)."""
    if _override is not None:
        return _override
    policy = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if policy not in _POLICIES:
        raise ValueError(f"{KERNEL_ENV}={policy!r} must be one of {_POLICIES}")
    return policy


@dataclass
class _Kernel:
    """One optional package: where its function lives, how to self-test it, what we know of it."""
    package: str  # the pip name, for messages
    module: str
    attr: str
    self_test: Callable[[Callable, torch.device, int], None]
    fn: Callable | None = None
    loaded: bool = False
    error: str | None = None
    verified: dict = field(default_factory=dict)  # (device, size class) -> True, or the reason it failed

    def load(self) -> Callable | None:
        if not self.loaded:
            self.loaded = True
            try:
                self.fn = getattr(importlib.import_module(self.module), self.attr)
            except Exception as err:  # ImportError, or an installed CUDA build that fails to load
                self.fn, self.error = None, f"{type(err).__name__}: {err}"
                if not isinstance(err, ImportError):
                    warnings.warn(f"hyena_cp: {self.package} is installed but does not load ({self.error}); "
                                  "using the torch path", RuntimeWarning, stacklevel=3)
        return self.fn

    def ready(self, device: torch.device, size_class: int = 0) -> Callable | None:
        """The kernel's function if it is installed and passed its self-test on ``device``, else None."""
        fn = self.load()
        if fn is None:
            return None
        key = (device, size_class)
        if key not in self.verified:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None  # a CUDA graph capture cannot run the self-test (it synchronizes)
            try:
                with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                    self.self_test(fn, device, size_class)
                self.verified[key] = True
            except Exception as err:
                self.verified[key] = f"{type(err).__name__}: {err}"
                warnings.warn(f"hyena_cp: {self.package} failed its self-test on {device} ({self.verified[key]}); "
                              "using the torch path", RuntimeWarning, stacklevel=3)
        return fn if self.verified[key] is True else None


def _wanted(t: torch.Tensor) -> bool:
    """A kernel may be tried: policy auto, eager mode, a device the kernels run on."""
    return t.device.type in _DEVICE_TYPES and not torch.compiler.is_compiling() and kernel_policy() == "auto"


# ------------------------------------------------------------------------------------------- short conv
def fast_causal_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 left_context: torch.Tensor | None,
                                 positions: torch.Tensor | None) -> torch.Tensor | None:
    """`hyena_cp.ops.short_conv.causal_depthwise_conv1d` by causal-conv1d, or None where the torch
    path must run. Same contract: ``x [N, C, L]``, ``weight [C, K]``, ``bias [C]`` or None,
    ``left_context [N, C, K-1]`` or None; returns ``[N, C, L]`` contiguous, in x's dtype."""
    if (positions is not None or x.dtype not in _SHORT_DTYPES or weight.shape[-1] not in _SHORT_WIDTHS
            or x.numel() == 0 or not _wanted(x)):
        return None
    fn = _KERNELS["causal_conv1d"].ready(x.device)
    if fn is None:
        return None
    dtype, width = x.dtype, weight.shape[-1]
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)  # the kernel wants bias in weight's dtype
    if left_context is None:
        return fn(x.contiguous(), weight, bias)
    padded = torch.cat([left_context.to(dtype), x], dim=-1)  # N, C, K-1+L: the halo, then x
    return fn(padded, weight, bias)[..., width - 1:].contiguous()


def _probe(*shape: int, device: torch.device, phase: float) -> torch.Tensor:
    """A fixed, RNG-free test input."""
    n = math.prod(shape)
    return torch.sin(torch.arange(n, device=device, dtype=torch.float32) * 0.731 + phase).reshape(shape)


def _run_and_grad(fn: Callable, inputs: tuple, grad_phase: float) -> list[torch.Tensor]:
    """``fn(*inputs)`` and the gradients of every input for a fixed output gradient."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, _probe(*y.shape, device=y.device, phase=grad_phase))
    return [y.detach(), *grads]


def _assert_near(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> None:
    for name, a, b in zip(("output", "grad 0", "grad 1", "grad 2"), got, want):
        if a.shape != b.shape:
            raise AssertionError(f"{name}: shape {tuple(a.shape)}, expected {tuple(b.shape)}")
        a, b = a.double(), b.double()
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        if not (torch.isfinite(a).all() and err <= tol):
            raise AssertionError(f"{name}: max error {err:.3g} of the reference's max (tolerance {tol})")


def _self_test_short(fn: Callable, device: torch.device, size_class: int) -> None:
    """causal_conv1d_fn against F.conv1d with K-1 zeros in front, fp32, K = 4 and 2."""
    for width in (4, 2):
        inputs = (_probe(2, 8, 37, device=device, phase=0.0), _probe(8, width, device=device, phase=1.0),
                  _probe(8, device=device, phase=2.0))
        got = _run_and_grad(fn, inputs, 3.0)
        want = _run_and_grad(lambda x, w, b: F.conv1d(F.pad(x, (width - 1, 0)), w[:, None], b, groups=8), inputs, 3.0)
        _assert_near(got, want, 1e-4)


# -------------------------------------------------------------------------------------------- FFT conv
def fast_fft_causal_conv1d(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The causal conv of `hyena_cp.ops.fftconv.fft_causal_conv1d` without its skip term, by
    subquadratic-ops-torch, or None where the torch path must run. ``u [B, C, L]`` and ``k [G, L]``
    in the compute dtype (G divides C, channel c uses group c // (C/G)); returns ``[B, C, L]``."""
    if u.dtype not in _FFT_DTYPES or k.dtype != u.dtype or u.numel() == 0 or not _wanted(u):
        return None
    fn = _KERNELS["subquadratic_fft"].ready(u.device, _fft_size_class(u.shape[-1]))
    if fn is None:
        return None
    channels, groups = u.shape[1], k.shape[0]
    weight = k if groups == channels else k.repeat_interleave(channels // groups, dim=0)  # C, L
    return fn(u.contiguous(), weight.contiguous())


def _fft_size_class(length: int) -> int:
    return sum(length > bound for bound in _FFT_CLASS_BOUNDS)


def _fft_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float64 oracle for the self-test: ``y[t] = sum_j w[:, j] x[t-j]``, linear (2L padding)."""
    n = 2 * x.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(x.double(), n=n) * torch.fft.rfft(w.double(), n=n), n=n)
    return y[..., :x.shape[-1]].to(x.dtype)


def _self_test_fft(fn: Callable, device: torch.device, size_class: int) -> None:
    """fft_causal_conv1d against an rfft oracle, fp32, at the probe length of the size class."""
    length = _FFT_PROBE_LENGTHS[size_class]
    inputs = (_probe(1, 2, length, device=device, phase=0.0),
              _probe(2, length, device=device, phase=1.0) * torch.exp(-torch.arange(length, device=device) / 50.0))
    _assert_near(_run_and_grad(fn, inputs, 3.0), _run_and_grad(_fft_reference, inputs, 3.0), 1e-4)


_KERNELS = {
    "causal_conv1d": _Kernel("causal-conv1d", "causal_conv1d", "causal_conv1d_fn", _self_test_short),
    "subquadratic_fft": _Kernel("subquadratic-ops-torch", "subquadratic_ops_torch.fft_causal_conv1d",
                                "fft_causal_conv1d", _self_test_fft),
}


def kernel_status(device: torch.device | str | None = None) -> dict[str, str]:
    """What each optional kernel is on ``device`` (default: the current CUDA device if any):
    ``"not installed (...)"``, ``"installed"`` (not yet tried there), ``"ok"`` or
    ``"failed self-test (...)"``; runs the self-tests when ``device`` is given. Plus the policy."""
    status = {"policy": kernel_policy()}
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    device = None if device is None else torch.device(device)
    for name, kernel in _KERNELS.items():
        if kernel.load() is None:
            status[name] = f"not installed ({kernel.error})"
            continue
        if device is None or device.type not in _DEVICE_TYPES:
            status[name] = "installed"
            continue
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        classes = range(len(_FFT_PROBE_LENGTHS)) if name == "subquadratic_fft" else (0,)
        results = [kernel.ready(device, size_class) is not None for size_class in classes]
        reasons = [v for (d, _), v in kernel.verified.items() if d == device and v is not True]
        status[name] = "ok" if all(results) else f"failed self-test ({'; '.join(reasons)})"
    return status


def _reset() -> None:
    """Forget every import and self-test result (tests swap in fake kernel modules)."""
    for kernel in _KERNELS.values():
        kernel.fn, kernel.loaded, kernel.error = None, False, None
        kernel.verified.clear()
