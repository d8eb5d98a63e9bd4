"""Large CPU tensors on transparent huge pages: what the launchers, the benchmarks and the
tests turn on before torch allocates anything.

On CPU a fresh tensor of tens of MB (one activation of a 16k-token layer: ``[1, 768, 16384]``
fp32 is 50 MB) comes from ``mmap``, and the first touch of each 4 KiB page faults: on the
2-core CI machine ``x * 2`` on such a tensor took 68 ms, of which the multiply is ~8 ms. A
layer's forward and backward allocate dozens of them per step. PyTorch's own knob
``THP_MEM_ALLOC_ENABLE=1`` aligns large allocations to 2 MiB and ``madvise``s them as huge
pages, so a fault maps 2 MiB at once (the same multiply: 15 ms). It changes where memory
comes from, never a value. `enable_huge_pages` sets it unless the user set it (``=0`` opts
out); it must run before the first large allocation (PyTorch reads the variable once).
The library itself does not touch the environment: a program that imports hyena_cp sets the
variable itself (or exports it) to get the same effect. No effect on CUDA memory.
"""
from __future__ import annotations

import os

__all__ = ["THP_ENV", "enable_huge_pages"]

THP_ENV = "THP_MEM_ALLOC_ENABLE"


def enable_huge_pages() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` unless already set; True when huge pages are on."""
    os.environ.setdefault(THP_ENV, "1")
    return os.environ[THP_ENV] == "1"
