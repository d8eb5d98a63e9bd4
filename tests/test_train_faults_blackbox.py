"""Faults injected from outside, as a user's cluster would inject them: each test damages a run
(or its folder) and runs ``launch/train.py`` under torchrun (2 processes, cp=2), then checks
what a user sees (the exit status, stderr, stdout) and what is left on disk. No silent loss:

- a diverging run (``optimizer.lr=1e6``) exits non-zero naming the step, prints no final result
  and leaves only finite checkpoints;
- a bit flip (same file size) and a truncated shard in the two newest checkpoints; a missing
  ``.metadata`` and a missing ``meta.json`` in them, with a ``latest`` pointer that is not
  text: each is named in a warning with what is wrong, set aside, and the run resumes from the
  newest checkpoint that verifies to bitwise the parameters of the uninterrupted run;
- no checkpoint verifies: the run refuses, naming the folder, and changes nothing;
  ``train.resume=false`` then starts afresh, keeping the damaged folders aside.

One uninterrupted run (6 steps, checkpoints 2, 4, 6) is the reference; each test damages a copy.
Six torchrun jobs of ~5 s each.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyena_cp.train.checkpoint import load_model_state, load_optimizer_state
from train_helpers import ROOT, VISION, all_finite, damage

CONFIG = "digits_hyena_tiny.py"
OVERRIDES = VISION + ["model.mixers=hyena", "parallel.cp=2", "train.steps=6", "train.ckpt_every=2",
                      "train.keep_checkpoints=3"]


def _torchrun(out: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py",
           f"configs/{CONFIG}", *OVERRIDES, *extra, f"train.output_dir={out}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reference")
    proc = _torchrun(out)
    assert proc.returncode == 0, _explain(proc)
    return out, load_model_state(out / "checkpoints" / "step_00000006")


def _copy(reference, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    return out


def _resumed_from(out: Path) -> list[int]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r.get("event") == "resume"]


def _assert_same_parameters(out: Path, reference) -> None:
    final = load_model_state(out / "checkpoints" / "step_00000006")
    assert final.keys() == reference[1].keys()
    assert all(torch.equal(final[k], v) for k, v in reference[1].items())


def test_a_diverging_run_exits_nonzero_naming_the_step_with_only_finite_checkpoints(tmp_path):
    proc = _torchrun(tmp_path, ("optimizer.lr=1e6", "train.ckpt_every=1"))
    assert proc.returncode != 0, _explain(proc)
    assert "NonFiniteError: step 2: the loss is nan" in proc.stderr, _explain(proc)
    assert "final validation" not in proc.stdout
    folders = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert [f.name for f in folders] == ["step_00000001"]
    assert all(all_finite(load_model_state(f)) and all_finite(load_optimizer_state(f)) for f in folders)


WHAT = {"bitflip": "is corrupt (its SHA-256 differs", "truncate": "is truncated", "no_metadata": ".metadata is missing",
        "no_meta_json": "meta.json is missing"}


@pytest.mark.parametrize("damages,bad_pointer", [
    ({"step_00000006": "bitflip", "step_00000004": "truncate"}, False),
    ({"step_00000006": "no_metadata", "step_00000004": "no_meta_json"}, True),
], ids=["bitflip+truncate", "missing-files+garbage-pointer"])
def test_damaged_checkpoints_are_named_set_aside_and_the_run_resumes_to_the_same_parameters(
        reference, tmp_path, damages, bad_pointer):
    out = _copy(reference, tmp_path)
    ckpts = out / "checkpoints"
    for folder, kind in damages.items():
        damage(ckpts / folder, kind)
    if bad_pointer:
        (ckpts / "latest").write_bytes(b"\xff\xfe\x00 garbage")
    proc = _torchrun(out)
    assert proc.returncode == 0, _explain(proc)
    for folder, kind in damages.items():
        assert f"checkpoint {ckpts / folder} failed verification: " in proc.stderr, _explain(proc)
        assert WHAT[kind] in proc.stderr and f"kept as {folder}.unverified-1" in proc.stderr
    assert (f"{ckpts / 'latest'} is not UTF-8 text" in proc.stderr) == bad_pointer
    assert _resumed_from(out) == [2]
    _assert_same_parameters(out, reference)
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["latest", "step_00000002", "step_00000004", "step_00000004.unverified-1", "step_00000006",
                     "step_00000006.unverified-1"]


def test_with_no_verified_checkpoint_the_run_refuses_and_resume_false_starts_afresh(reference, tmp_path):
    out = _copy(reference, tmp_path)
    ckpts = out / "checkpoints"
    for step in (2, 4, 6):
        damage(ckpts / f"step_{step:08d}", "no_meta_json")
    before = sorted(p.name for p in ckpts.iterdir())
    proc = _torchrun(out)
    assert proc.returncode != 0, _explain(proc)
    assert f"CheckpointError: no checkpoint in {ckpts} verifies" in proc.stderr, _explain(proc)
    assert "final validation" not in proc.stdout
    assert sorted(p.name for p in ckpts.iterdir()) == before  # nothing moved, nothing overwritten
    proc = _torchrun(out, ("train.resume=false",))
    assert proc.returncode == 0, _explain(proc)
    assert _resumed_from(out) == []
    _assert_same_parameters(out, reference)  # the same seed from scratch
    assert {f"step_{s:08d}.unverified-1" for s in (2, 4, 6)} <= {p.name for p in ckpts.iterdir()}
