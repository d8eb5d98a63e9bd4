"""Fault recovery under torchrun: rank 1 dies mid-training (``os._exit(1)`` at a step, first
attempt only); with ``--max-restarts=1`` the job restarts, resumes from the newest complete
checkpoint and ends with bitwise the parameters of an uninterrupted run with the same seed.

One torchrun job (two attempts of 2 processes, ~3.5 s start-up each) against a reference
run in the reused `dist_run` pool: both use one thread per rank and the same reduction
order, so CPU results are bitwise equal.
"""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from hyena_cp.train.checkpoint import load_model_state
from train_helpers import ROOT, VISION, run_config

CONFIG = "digits_hyena_tiny.py"
OVERRIDES = VISION + ["model.mixers=hyena", "train.steps=6", "train.ckpt_every=2", "parallel.cp=2",
                      "parallel.timeout_s=60"]


def test_killed_rank_resumes_to_the_uninterrupted_parameters(dist_run, tmp_path):
    reference, faulty = tmp_path / "reference", tmp_path / "faulty"
    dist_run(run_config, 2, CONFIG, OVERRIDES, str(reference))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "launch/train.py", f"configs/{CONFIG}", *OVERRIDES, "train.fault_step=3", "train.fault_rank=1",
           f"train.output_dir={faulty}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "[fault injection] rank 1 exits at step 3" in proc.stderr
    assert "final validation accuracy" in proc.stdout
    records = [json.loads(line) for line in (faulty / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "resume", "step": 2, "attempt": 1} in records  # restarted from checkpoint 2
    expected = load_model_state(reference / "checkpoints" / "step_00000006")
    got = load_model_state(faulty / "checkpoints" / "step_00000006")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
