"""Shared pytest fixtures.

``dist_run(fn, world_size, *args, **kwargs)`` runs the module-level function ``fn`` on every
rank of an initialized gloo group of ``world_size`` forked processes and returns the
per-rank return values in rank order. Inside ``fn`` use ``torch.distributed.group.WORLD``
and ``dist.get_rank()``. Pass ``expect_error=ValueError`` to require that every rank
raises that error before any hyena_cp data communication (the cross-rank agreement check,
control traffic, may run first); the exceptions are returned.
Worker pools are created on first use per world size and reused for the whole session;
see tests/dist_harness.py.
"""
from __future__ import annotations

import pytest

from dist_harness import DistRunner
from hyena_cp.host_memory import tune_host_memory

tune_host_memory()  # as the launchers do: huge pages, freed memory kept for reuse (hyena_cp.host_memory)


@pytest.fixture(scope="session")
def dist_run():
    runner = DistRunner()
    yield runner
    runner.close()


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so random inputs cannot make it flaky."""
    import torch

    torch.manual_seed(0)
