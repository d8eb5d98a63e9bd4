"""The non-finite guard (`hyena_cp.train.nonfinite`), through the training loop on the shrunk
vision config and on the tiny checkpoint model:

- ``optimizer.lr=1e6`` makes the loss nan at step 2: the run stops there on every rank with the
  same `NonFiniteError` naming the step, and every checkpoint on disk is finite (also when the
  diverging run resumes over good checkpoints with ``keep_checkpoints=2``);
- ``train.nonfinite=skip``: a step whose loss one rank poisons (``train.fault_mode=nan``) is
  skipped on every rank (parameters and AdamW state unchanged, a ``nonfinite`` log record), the
  next one steps; a run that stays non-finite gives up after ``nonfinite_max_skips``;
- the verdict is agreed: one rank's nan stops or skips the step on both ranks (the negative
  twin: that rank's peer saw a finite loss);
- a checkpoint of non-finite state is refused on every rank, even if one rank's copy is bad;
- evaluation of a non-finite model is an error, not a result.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hyena_cp.distributed.mesh import destroy_parallel, init_parallel
from hyena_cp.train.checkpoint import Checkpointer, load_model_state, load_optimizer_state
from hyena_cp.train.loop import Trainer
from hyena_cp.train.nonfinite import NonFiniteError, NonFiniteGuard
from train_helpers import (VISION, all_finite, load_config, run_config, run_config_reporting,
                           tiny_model_and_optimizer)

CONFIG = "digits_hyena_tiny.py"
OVERRIDES = VISION + ["model.mixers=hyena", "train.ckpt_every=1"]
DIVERGE = ["optimizer.lr=1e6"]  # loss 2.30 at step 1, nan from step 2


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step_*"))


def _assert_all_finite(out: Path) -> None:
    for folder in _checkpoints(out):
        assert all_finite(load_model_state(folder)) and all_finite(load_optimizer_state(folder)), folder


def test_a_diverging_run_stops_at_its_first_nonfinite_step_on_every_rank(dist_run, tmp_path):
    results = dist_run(run_config_reporting, 2, CONFIG, OVERRIDES + DIVERGE + ["parallel.cp=2", "train.steps=4"],
                       str(tmp_path))
    errors = [r["error"] for r in results]
    assert errors[0] == errors[1] and errors[0].startswith("NonFiniteError: step 2: the loss is nan"), errors
    assert [f.name for f in _checkpoints(tmp_path)] == ["step_00000001"]
    _assert_all_finite(tmp_path)


def test_a_diverging_resume_keeps_the_newest_finite_checkpoints(dist_run, tmp_path):
    dist_run(run_config, 1, CONFIG, OVERRIDES + ["parallel.cp=1", "train.steps=2"], str(tmp_path))
    (r,) = dist_run(run_config_reporting, 1, CONFIG, OVERRIDES + DIVERGE + ["parallel.cp=1", "train.steps=6"],
                    str(tmp_path))
    assert r["error"] and r["error"].startswith("NonFiniteError: step 4"), r["error"]  # step 3 steps at lr 1e6
    assert [f.name for f in _checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    _assert_all_finite(tmp_path)


def test_skip_policy_skips_a_poisoned_step_on_every_rank(dist_run, tmp_path):
    skip = ["parallel.cp=1", "train.steps=3", "train.nonfinite=skip", "train.fault_mode=nan", "train.fault_step=1",
            "train.fault_rank=1", "train.keep_checkpoints=3"]  # dp=2: rank 1 poisons step 2
    results = dist_run(run_config, 2, CONFIG, OVERRIDES + skip, str(tmp_path))
    for r in results:
        assert r["step"] == 3 and math.isnan(r["losses"][1]) and math.isfinite(r["losses"][2])
    one, two, three = (tmp_path / "checkpoints" / f"step_{s:08d}" for s in (1, 2, 3))
    for load in (load_model_state, load_optimizer_state):
        assert all(torch.equal(v, load(two)[k]) for k, v in load(one).items())  # step 2 changed nothing
        assert not all(torch.equal(v, load(three)[k]) for k, v in load(two).items())  # step 3 stepped
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (skipped,) = [r for r in records if r.get("event") == "nonfinite"]
    assert skipped["step"] == 2 and skipped["action"] == "skipped" and skipped["in_a_row"] == 1


def test_skip_policy_gives_up_after_nonfinite_max_skips_in_a_row(dist_run, tmp_path):
    skip = ["parallel.cp=1", "train.steps=8", "train.nonfinite=skip", "train.nonfinite_max_skips=2"]
    (r,) = dist_run(run_config_reporting, 1, CONFIG, OVERRIDES + DIVERGE + skip, str(tmp_path))
    assert r["error"].startswith("NonFiniteError: step 4:") and "3 non-finite steps in a row" in r["error"]
    assert "train.nonfinite_max_skips=2" in r["error"]
    _assert_all_finite(tmp_path)


def _agreed_verdicts(policy: str) -> dict:
    """Rank 1 alone sees a nan loss; each rank's verdict (or error)."""
    groups = init_parallel(1)
    try:
        guard = NonFiniteGuard(policy, max_skips=1, groups=groups)
        loss = math.nan if groups.rank == 1 else 1.0
        try:
            verdict = guard.step_is_finite(7, loss, 1.0)
        except NonFiniteError as e:
            verdict = str(e)
        return {"local_finite": math.isfinite(loss), "verdict": verdict}
    finally:
        destroy_parallel(groups)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_the_verdict_on_one_ranks_nan_is_the_same_on_every_rank(dist_run, policy):
    r0, r1 = dist_run(_agreed_verdicts, 2, policy)
    assert r0["local_finite"] and not r1["local_finite"]  # rank 0 alone would have stepped
    if policy == "skip":
        assert r0["verdict"] is False and r1["verdict"] is False
    else:
        assert r1["verdict"].startswith("step 7: the loss is nan and the gradient norm 1.0; stopped")
        assert r0["verdict"].startswith("step 7: the loss or the gradient norm is not finite on another rank "
                                        "(here: loss 1.0, gradient norm 1.0); stopped")


def _save_poisoned(root: str) -> dict:
    groups = init_parallel(1)
    try:
        model, optimizer = tiny_model_and_optimizer(0)
        if groups.rank == 1:  # one replica's copy is bad: DCP might write either
            with torch.no_grad():
                model[0].weight[0, 0] = float("inf")
        try:
            Checkpointer(root, groups).save(1, model, optimizer, {"step": 1})
            return {"error": None}
        except NonFiniteError as e:
            return {"error": str(e)}
    finally:
        destroy_parallel(groups)


def test_a_nonfinite_state_is_never_saved(dist_run, tmp_path):
    r0, r1 = dist_run(_save_poisoned, 2, str(tmp_path))
    assert "not written: the state is not finite (on another rank)" in r0["error"]
    assert "['model/0.weight'] on rank 1" in r1["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _evaluate_poisoned(out: str) -> str | None:
    cfg = load_config(CONFIG, OVERRIDES + ["parallel.cp=1", "train.steps=1"], out)
    groups = init_parallel(1)
    try:
        trainer = Trainer.build(cfg, groups, Path(out), "poisoned")
        with torch.no_grad():
            next(trainer.model.parameters()).fill_(float("nan"))
        try:
            trainer.evaluate()
        except NonFiniteError as e:
            return str(e)
        return None
    finally:
        destroy_parallel(groups)


def test_evaluating_a_nonfinite_model_is_an_error(dist_run, tmp_path):
    (error,) = dist_run(_evaluate_poisoned, 1, str(tmp_path))
    assert error and error.startswith("evaluation after step 0 is not finite (val_loss=nan")
