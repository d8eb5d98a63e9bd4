"""The forked worker pools behind ``dist_run`` and the benchmarks: a task's process groups do
not outlive it (each gloo group keeps threads; hundreds of tasks per worker would pile up
thousands, which once made the suite several times slower)."""
from __future__ import annotations

import threading

import torch.distributed as dist
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state

from hyena_cp.parallel.local_pool import _live_groups


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
