"""The learning-rate schedule in the checkpoint: each ``meta.json`` stores ``train.steps``,
``train.warmup_steps``, ``train.min_lr_ratio`` and the base ``optimizer.lr`` of every parameter
group; a resume that changes any of them warns, naming the old and new values and saying that
the new run's schedule is used from the checkpoint's step on (and it is: the logged rate is the
new schedule's); a resume that changes none is silent."""
from __future__ import annotations

import json

import pytest

from hyena_cp.train.config import lr_factor
from train_helpers import VISION, run_config, run_config_reporting

CONFIG = "digits_hyena_tiny.py"
OVERRIDES = VISION + ["model.mixers=hyena", "parallel.cp=1", "train.ckpt_every=1"]
LR = 2e-3  # the config's optimizer.lr


def _schedule_warnings(result: dict) -> list[str]:
    return [w for w in result["warnings"] if w.startswith("ScheduleWarning")]


@pytest.mark.parametrize("change,was,now", [
    ("train.steps=4", "train.steps=2", "train.steps=4"),
    ("optimizer.lr=1e-3", f"train.steps=2, optimizer.lr=[{LR}, {LR}]", "train.steps=4, optimizer.lr=[0.001, 0.001]"),
])
def test_a_resume_with_another_schedule_warns_and_uses_the_new_one(dist_run, tmp_path, change, was, now):
    dist_run(run_config, 1, CONFIG, OVERRIDES + ["train.steps=2"], str(tmp_path))
    meta = json.loads((tmp_path / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["schedule"] == {"train.steps": 2, "train.warmup_steps": 1, "train.min_lr_ratio": 0.1,
                                "optimizer.lr": [LR, LR]}
    extend = ["train.steps=4", change]
    (r,) = dist_run(run_config_reporting, 1, CONFIG, OVERRIDES + extend, str(tmp_path))
    assert r["error"] is None and r["summary"]["resumed_from"] == 2
    (warning,) = _schedule_warnings(r)
    assert f"step_00000002 was trained with {was}; this run has {now}" in warning
    assert f"schedule of this run's config ({now}) is used from step 2 on" in warning
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    base = 1e-3 if change.startswith("optimizer.lr") else LR
    assert [r["lr"] for r in records if "lr" in r][-1] == pytest.approx(base * lr_factor(3, 4, 1, 0.1), rel=1e-12)
    (again,) = dist_run(run_config_reporting, 1, CONFIG, OVERRIDES + extend, str(tmp_path))  # at step 4: same
    assert again["error"] is None and again["summary"]["resumed_from"] == 4 and not _schedule_warnings(again)
