"""The training loop end to end, in the `dist_run` gloo pools, on the real experiment configs
shrunk by overrides:

- CP == one process: N steps with P=2 give the loss curve of P=1 (fp32, 1e-5 relative) for
  the vision config (Hyena and attention) and the megatron-core LM config.
- DP (and DP x CP): two replicas of half the batch give the curve of one process.
- Resume: a run restarted from an earlier checkpoint ends with bitwise the parameters of an
  uninterrupted run, and its metrics file describes one run.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import megatron.core.parallel_state  # noqa: F401  (imported before the dist_run workers fork)
import pytest
import torch

from hyena_cp.train.checkpoint import load_model_state
from train_helpers import LM, RTOL, VISION, run_config


def _curve(dist_run, world: int, name: str, overrides: list[str], out: Path) -> dict:
    results = dist_run(run_config, world, name, overrides, str(out))
    for r in results:  # every rank logs the global loss and holds the same gradients
        assert r["losses"] == results[0]["losses"] and r["grad_norms"] == results[0]["grad_norms"]
    return results[0]


def _assert_same_curve(a: dict, b: dict) -> None:
    """Losses AND gradient norms: AdamW hides a constant gradient scale (e.g. averaging over
    CP instead of summing) from the loss curve, the norm does not."""
    for key in ("losses", "grad_norms"):
        torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), rtol=RTOL, atol=0)
    for key in b["final"]:
        torch.testing.assert_close(a["final"][key], b["final"][key], rtol=RTOL, atol=1e-7)


CASES = {
    "vision_hyena": ("digits_hyena_tiny.py", VISION + ["model.mixers=hyena"]),
    "vision_attention": ("digits_attention_tiny.py", VISION),
    "lm": ("lm_tiny.py", LM),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cp2_trains_like_one_process(dist_run, tmp_path, case):
    name, overrides = CASES[case]
    single = _curve(dist_run, 1, name, overrides + ["parallel.cp=1"], tmp_path / "p1")
    cp2 = _curve(dist_run, 2, name, overrides + ["parallel.cp=2"], tmp_path / "p2")
    _assert_same_curve(cp2, single)


@pytest.mark.parametrize("world,cp", [(2, 1), (4, 2)], ids=["dp2", "dp2xcp2"])
def test_replicas_train_like_one_process(dist_run, tmp_path, world, cp):
    """Two replicas of half the global batch each (with CP inside each replica for world 4)."""
    name, overrides = CASES["vision_hyena"]
    single = _curve(dist_run, 1, name, overrides + ["parallel.cp=1"], tmp_path / "single")
    mesh = _curve(dist_run, world, name, overrides + [f"parallel.cp={cp}"], tmp_path / "mesh")
    _assert_same_curve(mesh, single)


def test_resume_is_bitwise_an_uninterrupted_run(dist_run, tmp_path):
    overrides = LM + ["train.steps=4", "train.ckpt_every=2", "train.keep_checkpoints=3", "parallel.cp=2"]
    out = tmp_path / "run"
    dist_run(run_config, 2, "lm_tiny.py", overrides, str(out))
    ckpts = out / "checkpoints"
    uninterrupted = load_model_state(ckpts / "step_00000004")
    # The state a crash after step 3 leaves: checkpoint 2 is the newest, step 3 was logged.
    shutil.rmtree(ckpts / "step_00000004")
    (ckpts / "latest").write_text("step_00000002\n")
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    results = dist_run(run_config, 2, "lm_tiny.py", overrides, str(out))
    assert [r["resumed_from"] for r in results] == [2, 2] and len(results[0]["losses"]) == 2
    resumed = load_model_state(ckpts / "step_00000004")
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "resume", "step": 2, "attempt": 0} in records
    assert all(r.get("loss") != 123.0 for r in records)  # the crashed attempt's record is dropped
    assert (out / "curves.png").stat().st_size > 0 and json.loads((out / "final.json").read_text())["step"] == 4


def test_resume_false_refuses_an_earlier_run(dist_run, tmp_path):
    overrides = LM + ["train.steps=1", "parallel.cp=1"]
    dist_run(run_config, 1, "lm_tiny.py", overrides, str(tmp_path))
    with pytest.raises(Exception, match="train.resume=true"):
        dist_run(run_config, 1, "lm_tiny.py", overrides + ["train.resume=false"], str(tmp_path))
