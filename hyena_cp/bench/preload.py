"""What the benchmarks' fork server imports once, so every rank worker starts with it
(`hyena_cp.bench.ranks`): torch, the bench sections and megatron-core when installed, whose
CPU-only "Transformer Engine and Apex are not installed" warnings would otherwise be printed
between the tables by the server (it does not inherit the bench's warning filters)."""
from __future__ import annotations

import warnings

import torch  # noqa: F401

import hyena_cp.bench  # noqa: F401

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    try:
        import megatron.core  # noqa: F401
    except ImportError:  # sections that need it say so themselves
        pass
