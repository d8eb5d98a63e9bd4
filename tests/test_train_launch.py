"""The entry points: ``launch/train.py`` (command line = config + key=value overrides; a
world of one without torchrun) and ``launch/slurm.sh`` (its dry run prints the command)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from hyena_cp.lazy import LazyConfig
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


def test_slurm_dry_run_checks_the_layout_and_the_config_before_starting_anything():
    """nproc x nodes must divide by tp x cp, and the config must exist: refused with the reason (exit 2)."""
    env = {**os.environ, "DRY_RUN": "1", "NPROC_PER_NODE": "1"}
    bad = subprocess.run(["bash", "launch/slurm.sh", "configs/lm_tiny.py", "parallel.tp=4", "parallel.cp=2"], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "must divide the world size 1" in bad.stderr and not bad.stdout
    missing = subprocess.run(["bash", "launch/slurm.sh", "configs/nope.py"], cwd=ROOT, env=env, capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "configs/nope.py does not exist" in missing.stderr
    assert "digits_hyena_tiny.py" in missing.stderr  # the configs that do exist are listed


def test_a_user_error_is_printed_once_by_rank_zero_and_recorded_for_torchrun(tmp_path, monkeypatch, capsys):
    from hyena_cp.train import cli
    from hyena_cp.train.cli import run_launcher

    monkeypatch.setattr(cli, "PEER_GRACE_S", 0.0)  # rank 1's wait for rank 0 (nothing to wait for here)

    def fails() -> int:
        raise ValueError("train.steps='abc': expected int, got str")

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert run_launcher(fails) == 1
        err = capsys.readouterr().err
        assert ("error: ValueError: train.steps='abc'" in err) == printed and "Traceback" not in err
        assert "train.steps='abc'" in json.loads(error_file.read_text())["message"]["message"]

    def bad_key() -> int:  # an override naming no key is the user's mistake, said without quotes
        LazyConfig.apply_overrides(LazyConfig.load(CONFIGS / "digits_hyena_tiny.py"), ["train.stpes=5"])
        return 0

    monkeypatch.setenv("RANK", "0")
    assert run_launcher(bad_key) == 1
    assert "error: ConfigKeyError: override 'train.stpes=5': no key 'train.stpes'" in capsys.readouterr().err

    def bug() -> int:
        raise ZeroDivisionError("a bug keeps its traceback")

    with pytest.raises(ZeroDivisionError):
        run_launcher(bug)


def test_under_torchrun_rank_zero_prints_the_error_once_and_the_banner_names_it():
    """The same mistake on both ranks: one ``error:`` line (rank 0's; rank 1 waits for it instead of
    racing it to the exit, where torchrun would stop rank 0 before it prints), no Python traceback of
    the launcher, and torchrun's root cause is rank 0 with that message."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "launch/train.py", "configs/digits_hyena_tiny.py", "train.stpes=5"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert out.count("error: ConfigKeyError: override 'train.stpes=5'") == 1, out
    assert 'launch/train.py", line' not in out, out
    root = out.split("Root Cause")[1]
    assert "rank      : 0 (local_rank: 0)" in root and "ConfigKeyError: override 'train.stpes=5'" in root, out


@pytest.mark.parametrize("world", ["1", "2"])
def test_exit_process_keeps_the_status_and_what_was_printed(world):
    """Under torchrun the launchers leave with ``os._exit`` (hyena_cp.distributed.exit_process):
    the status must survive it, and buffered stdout must be flushed first."""
    code = ("import sys; from hyena_cp.distributed import exit_process; "
            "sys.stdout.write('printed before exit'); exit_process(3)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": world}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "printed before exit"
