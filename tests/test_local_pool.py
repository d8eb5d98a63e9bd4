"""The forked worker pools behind ``dist_run`` and the benchmarks: a task's process groups do
not outlive it (each gloo group keeps threads; hundreds of tasks per worker would pile up
thousands, which once made the suite several times slower), and a rank that hangs or dies of
a signal reports its Python stacks (a rare CI hang or crash must say where it happened)."""
from __future__ import annotations

import gc
import os
import threading
import time

import torch.distributed as dist
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state

from hyena_cp.testing.local_pool import LocalPool, _live_groups, format_failures


def worker_make_groups() -> int:
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=dist.get_world_size())
    parallel_state.destroy_model_parallel()  # drops megatron's references, destroys nothing
    assert singles[dist.get_rank()].size() == 1
    return len(_live_groups())


def worker_census() -> tuple[int, int]:
    return len(_live_groups()), threading.active_count()


def test_groups_of_a_task_are_destroyed_after_it(dist_run):
    before = dist_run(worker_census, 2)
    made = dist_run(worker_make_groups, 2)
    assert all(n > 1 for n in made)  # the task really created groups
    after = dist_run(worker_census, 2)
    # what was there before is left: WORLD, and the run meshes `init_parallel` caches for reuse
    assert [groups for groups, _ in after] == [groups for groups, _ in before]
    assert [threads for _, threads in after] == [threads for _, threads in before]


def worker_sleeps_forever() -> None:
    time.sleep(600)  # a stand-in for a rank stuck in a collective or a lock


def worker_aborts() -> None:
    os.abort()  # what glibc does on a corrupted heap ("free(): invalid pointer")


def _one_task_on_a_fresh_pool(fn, timeout: float):
    """``fn`` on a 1-rank pool of its own (not the shared ``dist_run`` one: it may hang or die)."""
    pool = LocalPool(1, gloo_timeout_s=30.0)
    try:
        (reply,) = pool.run(fn, (), {}, timeout=timeout)
    finally:
        pool.kill()
    return reply


def test_a_silent_rank_reports_its_python_stacks_when_given_up_on():
    reply = _one_task_on_a_fresh_pool(worker_sleeps_forever, timeout=1.0)
    assert reply.status == "missing"
    # faulthandler's format: 'File "...test_local_pool.py", line N in worker_sleeps_forever'
    assert "test_local_pool.py" in reply.value and " in worker_sleeps_forever" in reply.value
    assert " in worker_sleeps_forever" in format_failures([reply])


def test_a_rank_killed_by_a_signal_reports_where_it_died():
    reply = _one_task_on_a_fresh_pool(worker_aborts, timeout=30.0)
    assert reply.status == "err" and "died (exit code -6)" in str(reply.value[0])
    text = format_failures([reply])
    assert "Fatal Python error: Aborted" in text and " in worker_aborts" in text


def worker_collect_garbage() -> int:
    return gc.collect()


def test_a_process_group_the_parent_dropped_does_not_hang_a_forked_worker():
    """The parent drops a gloo group it has not collected yet (gc off: as between two automatic
    collections), then forks a pool. Were that garbage collected in the worker, the group's
    destructor would join threads that exist only in the parent and never return."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        cycle: list = [dist.group.WORLD]
        cycle.append(cycle)  # reachable only through a reference cycle, as in a DeviceMesh
        dist.destroy_process_group()
        del cycle
        reply = _one_task_on_a_fresh_pool(worker_collect_garbage, timeout=20.0)
    finally:
        if enabled:
            gc.enable()
    assert reply.status == "ok", format_failures([reply])
