"""Print which optional CUDA kernels `hyena_cp.ops.kernels` picks here, and one table of their
error and speed against the pure-torch path (forward + backward). Run by
``launch/gpu_kernel_check.sh``; on a machine without CUDA it prints the status and stops.

    python launch/kernel_check.py
"""
from __future__ import annotations

import statistics
import sys

import torch

from hyena_cp.ops import kernels
from hyena_cp.ops.fftconv import fft_causal_conv1d
from hyena_cp.ops.short_conv import causal_depthwise_conv1d

# (name, function, builder of the inputs on the device); shapes of a C=256 layer's 3C short conv
# (the halo is a CP rank's) and of its long conv.
CASES = [
    ("short conv K=3, halo, [1, 768, 65536]", causal_depthwise_conv1d,
     lambda dt: (torch.randn(1, 768, 65536, dtype=dt), torch.randn(768, 3), torch.randn(768),
                 torch.randn(1, 768, 2, dtype=dt))),
    ("FFT conv G=4, [1, 256, 16384]", fft_causal_conv1d,
     lambda dt: (torch.randn(1, 256, 16384, dtype=dt), torch.randn(4, 16384), torch.randn(256))),
    ("FFT conv G=4, [1, 256, 65536]", fft_causal_conv1d,
     lambda dt: (torch.randn(1, 256, 65536, dtype=dt), torch.randn(4, 65536), torch.randn(256))),
]


def fwd_bwd_ms(fn, inputs: list[torch.Tensor], repeats: int = 20) -> tuple[float, list[torch.Tensor]]:
    """Median forward + backward milliseconds, and the output and gradients of the last run."""
    times = []
    for i in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y = fn(*inputs)
        grads = torch.autograd.grad(y, inputs, torch.ones_like(y))
        end.record()
        torch.cuda.synchronize()
        if i >= 3:  # warm-up: allocator, cuFFT plans, the kernels' self-tests
            times.append(start.elapsed_time(end))
    return statistics.median(times), [y, *grads]


def max_error(fast: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(((a.double() - b.double()).abs().max() / b.double().abs().max()).item() for a, b in zip(fast, ref))


def main() -> int:
    status = kernels.kernel_status()
    print("torch", torch.__version__, "| CUDA", torch.version.cuda, "|",
          torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
    for name, value in status.items():
        print(f"  {name}: {value}")
    if not torch.cuda.is_available():
        return 0
    print("\n| case | dtype | torch ms | picked ms | speed-up | max error / max |")
    print("|---|---|---|---|---|---|")
    for name, fn, build in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            inputs = [t.cuda().requires_grad_() for t in build(dtype)]
            previous = kernels.set_kernel_policy("torch")
            try:
                ref_ms, ref = fwd_bwd_ms(fn, inputs)
            finally:
                kernels.set_kernel_policy(previous)
            fast_ms, fast = fwd_bwd_ms(fn, inputs)
            print(f"| {name} | {str(dtype).removeprefix('torch.')} | {ref_ms:.3f} | {fast_ms:.3f} | "
                  f"{ref_ms / fast_ms:.2f}x | {max_error(fast, ref):.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
