"""Host (CPU) memory settings the launchers, the benchmarks and the tests apply before torch
allocates anything: `tune_host_memory` = `enable_huge_pages` + `retain_freed_memory`.

Why. A 16k-token layer's activations are tensors of tens of MB (``[1, 768, 16384]`` fp32 is
50 MB), and one forward + backward allocates and frees dozens of them. glibc serves every
allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and gives it back
with ``munmap`` on free, so every step faults every page of every such tensor in again and
the kernel zeroes it: on the 2-core CI machine ``x * 2`` on a fresh 50 MB tensor took 68 ms,
of which the multiply is ~8 ms.

- `enable_huge_pages`: PyTorch's own knob ``THP_MEM_ALLOC_ENABLE=1`` aligns large
  allocations to 2 MiB and ``madvise``s them as transparent huge pages, so a fault maps
  2 MiB at once (the same multiply: 15 ms). PyTorch reads the variable once, at its first
  large allocation.
- `retain_freed_memory`: glibc keeps freed memory for reuse instead of unmapping it
  (``mallopt(M_MMAP_MAX, 0)``: large blocks come from the heap; ``M_TRIM_THRESHOLD`` 2 GiB:
  the top of the heap is not handed back either), so after the first step a training loop
  faults no pages at all (a 16k layer step: ~15 000 minor faults before, 0 after). This is
  what jemalloc/tcmalloc preloading buys CPU PyTorch, with no extra library. The cost: the
  process keeps its high-water mark of host memory until it exits. It also sets the same
  glibc variables (``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``) for child processes
  (torchrun workers, test pools), which glibc reads at their start.

Both change where memory comes from, never a value. Each is skipped when the user set its
variable (``THP_MEM_ALLOC_ENABLE=0`` / ``MALLOC_MMAP_MAX_=...`` opt out), and
`retain_freed_memory` is a no-op off glibc. The library itself does not touch the process:
a program that imports hyena_cp calls `tune_host_memory` itself (or exports the variables).
No effect on CUDA memory.
"""
from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["THP_ENV", "GLIBC_ENV", "enable_huge_pages", "retain_freed_memory", "tune_host_memory"]

THP_ENV = "THP_MEM_ALLOC_ENABLE"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>
_TRIM_BYTES = 2**31 - 1  # mallopt takes an int: the largest threshold it can express
GLIBC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_TRIM_BYTES)}


def enable_huge_pages() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` unless already set; True when huge pages are on."""
    os.environ.setdefault(THP_ENV, "1")
    return os.environ[THP_ENV] == "1"


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    try:
        libc.gnu_get_libc_version  # glibc only (musl has no mallopt M_MMAP_MAX)
    except AttributeError:
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse, in this process and its future children;
    True when applied. Skipped when ``MALLOC_MMAP_MAX_`` is already set (the user's choice)."""
    if "MALLOC_MMAP_MAX_" in os.environ:
        return os.environ["MALLOC_MMAP_MAX_"] == GLIBC_ENV["MALLOC_MMAP_MAX_"]
    libc = _glibc()
    if libc is None:
        return False
    applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES) == 1
    if applied:
        for name, value in GLIBC_ENV.items():
            os.environ.setdefault(name, value)
    return applied


def tune_host_memory() -> dict[str, bool]:
    """Both settings (call before the first large CPU tensor): ``{"huge_pages": on,
    "retain_freed_memory": on}``."""
    return {"huge_pages": enable_huge_pages(), "retain_freed_memory": retain_freed_memory()}
