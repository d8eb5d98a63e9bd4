"""Fault recovery under torchrun (``--max-restarts=1``), first attempt only (``train.fault_*``):

- a killed rank: rank 1 exits (``os._exit(1)``) at step 3;
- a hung peer: rank 1 stops responding at step 3 (sleeps, never exits); rank 0's next
  collective times out after ``parallel.timeout_s`` and raises a `PeerTimeoutError` that names
  the setting and rank 1 (it had not started step 3), within the timeout plus a few seconds;
  torchrun then ends the sleeping rank and restarts the job.

Either way the job resumes from the newest complete checkpoint (step 2) and ends with bitwise
the parameters AND the AdamW state (``step``, ``exp_avg``, ``exp_avg_sq``) of an uninterrupted
run with the same seed: the reference runs once in the reused `dist_run` pool; both use one
thread per rank and the same reduction order, so CPU results are bitwise equal. Each torchrun
job is two attempts of 2 processes (~3.5 s start-up each), plus the timeout for the hang.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from hyena_cp.train.checkpoint import load_model_state, load_optimizer_state
from train_helpers import ROOT, VISION, run_config

CONFIG = "digits_hyena_tiny.py"
TIMEOUT_S = 10  # short, but above the slowest collective of a loaded 2-core machine (checkpoint, plot)
OVERRIDES = VISION + ["model.mixers=hyena", "train.steps=6", "train.ckpt_every=2", "parallel.cp=2",
                      f"parallel.timeout_s={TIMEOUT_S}"]


@pytest.fixture(scope="module")
def reference(dist_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    dist_run(run_config, 2, CONFIG, OVERRIDES, str(out))
    final = out / "checkpoints" / "step_00000006"
    return load_model_state(final), load_optimizer_state(final)


def _torchrun(out, fault: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "launch/train.py", f"configs/{CONFIG}", *OVERRIDES, "train.fault_step=3", "train.fault_rank=1", *fault,
           f"train.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "final validation accuracy" in proc.stdout
    return proc


def _assert_resumed_to_reference(out, reference) -> None:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "resume", "step": 2, "attempt": 1} in records  # restarted from checkpoint 2
    final = out / "checkpoints" / "step_00000006"
    for got, expected in zip((load_model_state(final), load_optimizer_state(final)), reference):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), key
    optimizer = reference[1]
    assert {k.rsplit("/", 1)[1] for k in optimizer} == {"step", "exp_avg", "exp_avg_sq"}
    assert all(float(v) == 6 for k, v in optimizer.items() if k.endswith("/step"))


def test_killed_rank_resumes_to_the_uninterrupted_parameters_and_optimizer_state(reference, tmp_path):
    proc = _torchrun(tmp_path, [])
    assert "[fault injection] rank 1 exits at step 3" in proc.stderr, proc.stderr[-4000:]
    _assert_resumed_to_reference(tmp_path, reference)


def test_hung_peer_times_out_with_a_clear_error_and_resumes(reference, tmp_path):
    proc = _torchrun(tmp_path, ["train.fault_mode=hang"])
    assert "[fault injection] rank 1 hangs at step 3" in proc.stderr, proc.stderr[-4000:]
    match = re.search(r"PeerTimeoutError: rank 0: a collective of step 3 did not complete within "
                      rf"parallel.timeout_s={TIMEOUT_S} s \(the step had run ([\d.]+) s\); rank 1 had not started "
                      r"step 3 \(rank 1 at step 2\): the likely hung \(or dead\) peer", proc.stderr)
    assert match, proc.stderr[-4000:]
    assert TIMEOUT_S <= float(match.group(1)) < TIMEOUT_S + 5  # failed within the timeout, not gloo's 30 min
    _assert_resumed_to_reference(tmp_path, reference)


def test_hung_peer_in_a_mesh_subgroup_times_out_within_parallel_timeout_s(tmp_path):
    """4 processes, dp=2 x cp=2, ``dp_mode=ddp``: the CP groups are mesh SUBGROUPS, which DeviceMesh
    creates with ``new_group``'s default timeout (30 min on gloo) unless `init_parallel` sets
    ``parallel.timeout_s`` on them. Rank 1 hangs at step 3; rank 0's first collective of the step
    is in its CP group {0, 1} (with replicated parameters there is no FSDP all-gather on the
    whole job first), so rank 0 must fail there within the timeout. Checked by hand with the
    setting removed from `hyena_cp.distributed.mesh._run_mesh`: the subgroups then report 30 min and
    this test fails: the run ends without rank 0's timeout error. First attempt only (no restart)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "--max-restarts=0",
           "launch/train.py", f"configs/{CONFIG}", *OVERRIDES, "train.fault_step=3", "train.fault_rank=1",
           "train.fault_mode=hang", "parallel.dp_mode=ddp", f"train.output_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0, proc.stderr[-4000:]
    assert "[fault injection] rank 1 hangs at step 3" in proc.stderr, proc.stderr[-4000:]
    match = re.search(r"PeerTimeoutError: rank 0: a collective of step 3 did not complete within "
                      rf"parallel.timeout_s={TIMEOUT_S} s \(the step had run ([\d.]+) s\); rank 1 had not started "
                      r"step 3", proc.stderr)
    assert match, proc.stderr[-4000:]
    assert TIMEOUT_S <= float(match.group(1)) < TIMEOUT_S + 5
