"""Shared pytest fixtures.

``dist_run(fn, world_size, *args, **kwargs)`` runs the module-level function ``fn`` on every
rank of an initialized gloo group of ``world_size`` forked processes and returns the
per-rank return values in rank order. Inside ``fn`` use ``torch.distributed.group.WORLD``
and ``dist.get_rank()``. Pass ``expect_error=ValueError`` to require that every rank
raises that error before any hyena_cp data communication (the cross-rank agreement check,
control traffic, may run first); the exceptions are returned.
Worker pools are created on first use per world size and reused for the whole session;
see tests/dist_harness.py.

Slow tests — whole training, conversion and documentation runs through the launchers, each
seconds to minutes of torchrun — carry the ``slow`` mark (the files in `SLOW_FILES`), so
``pytest -m "not slow"`` is the quick loop of unit and parity tests; CI runs everything.
"""
from __future__ import annotations

import pytest

from dist_harness import DistRunner
from hyena_cp.host_memory import tune_host_memory

tune_host_memory()  # as the launchers do: huge pages, freed memory kept for reuse (hyena_cp.host_memory)

# end-to-end runs of the launchers and the training loop (a file, not a test, is the unit: these
# files are slow throughout, and one list is easier to keep right than marks on 150 tests)
SLOW_FILES = {
    "test_bench.py", "test_convert_launch.py", "test_export.py", "test_generate_launch.py",
    "test_readme_commands.py", "test_readme_snippets.py", "test_recall_train.py",
    "test_train_checkpoint.py", "test_train_checkpoint_tp.py", "test_train_fault.py",
    "test_train_faults_blackbox.py", "test_train_fsdp.py", "test_train_fsdp_checkpoint.py", "test_train_hygiene.py",
    "test_train_launch.py", "test_train_loop.py", "test_train_nonfinite.py", "test_train_parallel.py",
    "test_train_resume_schedule.py", "test_train_speed.py", "test_train_tp.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


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
