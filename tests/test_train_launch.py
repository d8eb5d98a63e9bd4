"""The entry points: ``launch/train.py`` (command line = config + key=value overrides; a
world of one without torchrun) and ``launch/slurm.sh`` (its dry run prints the command)."""
from __future__ import annotations

import importlib.util
import os
import subprocess

import pytest

from train_helpers import CONFIGS, ROOT, VISION


@pytest.fixture(scope="module")
def launcher():
    spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv", [[], ["--resume"], ["configs/digits_hyena_tiny.py", "--resume"]])
def test_anything_but_a_config_and_overrides_is_a_usage_error(launcher, capsys, argv):
    assert launcher.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_single_process_run_prints_the_final_accuracy(launcher, capsys, tmp_path):
    argv = [str(CONFIGS / "digits_hyena_tiny.py"), *VISION, "model.mixers=hyena", "train.steps=2",
            "parallel.cp=1", f"train.output_dir={tmp_path}"]
    assert launcher.main(argv) == 0
    assert "final validation accuracy:" in capsys.readouterr().out
    assert {"metrics.jsonl", "curves.png", "final.json", "config.yaml", "checkpoints"} <= set(os.listdir(tmp_path))


def test_slurm_dry_run_prints_one_srun_torchrun_command():
    env = {**os.environ, "DRY_RUN": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu07,gpu08",
           "SLURM_JOB_ID": "42", "NPROC_PER_NODE": "4", "RDZV_PORT": "29400"}
    out = subprocess.run(["bash", "launch/slurm.sh", "configs/lm_tiny.py", "parallel.cp=4"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    for flag in ["--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu07:29400",
                 "--rdzv-id=42", "--max-restarts=3"]:
        assert flag in out
    assert out[-3:] == [str(ROOT / "launch" / "train.py"), "configs/lm_tiny.py", "parallel.cp=4"]
    usage = subprocess.run(["bash", "launch/slurm.sh"], cwd=ROOT, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
