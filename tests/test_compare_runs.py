"""`launch/compare_runs.py` (`hyena_cp.train.compare`): two runs' logged losses, gradient norms
and validation metrics matched by step; a difference above rtol fails, one below passes.
`launch/plot_runs.py` draws the validation accuracies of several runs."""
from __future__ import annotations

import importlib.util
import json

import pytest

from hyena_cp.train.compare import compare_runs
from train_helpers import ROOT


def write_run(folder, losses, val_acc, scale=1.0):
    folder.mkdir()
    records = [{"event": "memory", "step": 1, "per_rank": {}, "replicated": {}}]
    records += [{"step": i + 1, "loss": x * scale, "grad_norm": 2 * x, "time_s": 10.0 * i} for i, x in enumerate(losses)]
    records.append({"step": len(losses), "val_loss": 0.5, "val_acc": val_acc})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.fixture(scope="module")
def launcher():
    spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "launch" / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_equal_runs_pass_and_a_changed_loss_fails(tmp_path, launcher, capsys):
    ref = write_run(tmp_path / "ref", [3.0, 2.0, 1.0], 0.9)
    same = write_run(tmp_path / "same", [3.0, 2.0, 1.0 * (1 + 1e-7)], 0.9)
    off = write_run(tmp_path / "off", [3.0, 2.0, 1.0], 0.9, scale=1 + 1e-4)
    diff = compare_runs(same, ref)
    assert diff.steps == 3 and diff.within(1e-5) and diff.worst_step["loss"] == 3
    assert set(diff.max_rel) == {"loss", "grad_norm", "val_loss", "val_acc"}
    bad = compare_runs(off, ref)
    assert not bad.within(1e-5) and bad.max_rel["loss"] == pytest.approx(1e-4)
    assert launcher.main([str(same), str(ref)]) == 0
    assert launcher.main([str(off), str(ref)]) == 1 and "EXCEEDS" in capsys.readouterr().out
    assert launcher.main([str(off), str(ref), "1e-3"]) == 0
    assert launcher.main([str(ref)]) == 2


def test_a_folder_without_metrics_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="output folder"):
        compare_runs(tmp_path, tmp_path)


def test_plot_runs_draws_every_accuracy_of_every_run(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_runs", ROOT / "launch" / "plot_runs.py")
    plot_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_runs)
    for name in ("a", "b"):
        run = write_run(tmp_path / name, [3.0, 2.0], 0.5)
        (run / "config.yaml").write_text("task:\n  eval_len: 64\n  length_steps: [0, 1]\n")
    out = tmp_path / "acc.png"
    assert plot_runs.main([str(out), f"{tmp_path / 'a'}=Hyena", str(tmp_path / "b")]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_runs.main([str(tmp_path / "a")]) == 2
    panels = tmp_path / "panels.png"
    assert plot_runs.main([str(panels), str(tmp_path / "a"), "--metrics", "loss", "val_acc"]) == 0
    assert panels.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_runs.main([str(panels), str(tmp_path / "missing")]) == 2
