"""`hyena_cp.host_memory`: freed CPU memory is kept for reuse (no page faults once warm), and
a variable the user set is never overridden. Each case runs in a fresh interpreter: glibc
and PyTorch read these settings at process start / first allocation."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                                reason="glibc malloc settings")

# allocate, touch and free a 128 MB tensor 8 times; report the minor page faults of each round
_PROBE = """
import json, os, resource, torch
from hyena_cp.host_memory import tune_host_memory
state = tune_host_memory()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(32 * 2**20)
    t.fill_(1.0)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"state": state, "faults": faults, "env": os.environ.get("MALLOC_MMAP_MAX_")}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "THP_MEM"))}
    # 4 KiB pages in both cases, so a round that faults its tensor in again costs 32768 faults
    clean.update(THP_MEM_ALLOC_ENABLE="0", **env)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=clean, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_faulting_it_in_again():
    res = _probe()
    assert res["state"] == {"huge_pages": False, "retain_freed_memory": True}
    assert res["env"] == "0"  # exported for child processes
    # the kernel may still settle pages for a round or two; once warm a round faults nothing
    assert min(res["faults"][1:]) <= 16, res["faults"]


def test_negative_twin_glibc_default_faults_every_round():
    """The user's own setting wins (here glibc's default): then every round faults the whole
    tensor in again, which is what `retain_freed_memory` removes."""
    res = _probe(MALLOC_MMAP_MAX_="65536")
    assert res["state"]["retain_freed_memory"] is False
    assert res["env"] == "65536"
    assert min(res["faults"][1:]) >= 32 * 2**20 * 4 // 4096 // 2, res["faults"]
