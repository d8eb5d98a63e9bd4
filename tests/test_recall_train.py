"""Spatial recall trained end to end: ``launch/train.py`` runs the 3-D config under torchrun with
CP=2 (shrunk by overrides), and CP=2 trains exactly like one process (loss and gradient-norm
curves, validation metrics; fp32, 1e-5 relative) — with the negative twin of the plausible bug
of a rank averaging its loss over its own block instead of taking its share of the replica's."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hyena_cp.train.spatial_tasks import SpatialRecallTask
from train_helpers import QUIET, ROOT, RTOL, run_config

CONFIG = "recall3d_hyena_tiny.py"
# the 3-D config with a 4x16x16 volume, one narrow block and a handful of samples
TINY = QUIET + ["model.grid=[4,16,16]", "model.dim=8", "model.depth=1", "model.hyena.num_heads=8",
                "model.hyena.filter.embedding_dim=8", "model.hyena.filter.hidden_dim=8", "task.data.num_train=64",
                "task.data.num_val=8", "task.global_batch_size=4", "task.eval_batch_size=8", "train.steps=3",
                "train.eval_every=3", "train.ckpt_every=0"]


def test_launch_trains_the_3d_config_under_cp2(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py",
           f"configs/{CONFIG}", *TINY, f"train.output_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "final validation: val_loss=" in proc.stdout and "val_recall_acc=" in proc.stdout
    assert "world=2 (dp=1 x cp=2 x tp=1)" in proc.stderr + proc.stdout
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["step"] == 3 and 0 <= final["val_recall_acc"] <= 1 and final["val_readout_mse"] > 0


def run_config_block_mean(name: str, overrides: list[str], output_dir: str) -> dict:
    """`run_config` with the bug of the negative twin: each rank's loss is the mean over ITS block
    (P times its share), so CP=2 steps with twice the gradient (hidden from Adam's loss curve, not
    from the gradient norm)."""
    def mean_of_block(self, model, batch):
        inputs, targets = batch
        out = model(inputs, cp_group=self.groups.cp_group)
        return (out - model.local_part(targets, self.groups.cp_group)).square().mean()

    real, SpatialRecallTask.loss_share = SpatialRecallTask.loss_share, mean_of_block
    try:
        return run_config(name, overrides, output_dir)
    finally:
        SpatialRecallTask.loss_share = real  # the pool's workers run later tests


def _curve(dist_run, fn, world: int, overrides: list[str], out) -> dict:
    results = dist_run(fn, world, CONFIG, TINY + overrides, str(out))
    assert all(r["losses"] == results[0]["losses"] for r in results)
    return results[0]


def _same(a: dict, b: dict) -> None:
    for key in ("losses", "grad_norms"):
        torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), rtol=RTOL, atol=0)
    for key in b["final"]:
        torch.testing.assert_close(a["final"][key], b["final"][key], rtol=RTOL, atol=1e-7)


def test_cp2_trains_like_one_process(dist_run, tmp_path):
    single = _curve(dist_run, run_config, 1, ["parallel.cp=1"], tmp_path / "p1")
    _same(_curve(dist_run, run_config, 2, ["parallel.cp=2"], tmp_path / "p2"), single)
    buggy = _curve(dist_run, run_config_block_mean, 2, ["parallel.cp=2"], tmp_path / "bug")
    with pytest.raises(AssertionError):
        _same(buggy, single)
