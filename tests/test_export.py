"""Weights-only export (``launch/export.py``, `hyena_cp.train.export`): after a two-step training
run at CP=2 (an FSDP-sharded checkpoint), the exported safetensors load into a fresh model with
parameters equal to the checkpoint's; loading never unpickles (pickle and torch.load are made to
raise), while the DCP checkpoint itself does (its ``.metadata``); an untrusted ``model.yaml`` is
refused."""
from __future__ import annotations

import contextlib
import importlib.util
import pickle

import pytest
import torch
import yaml

from hyena_cp.lazy import LazyConfig
from hyena_cp.train.checkpoint import load_model_state
from hyena_cp.train.config import with_defaults
from hyena_cp.train.export import export_model, load_exported, with_export_defaults
from hyena_cp.train.generate import latest_checkpoint
from train_helpers import CONFIGS, ROOT, VISION, run_config

CONFIG = "digits_hyena_tiny.py"
TINY = [*VISION, "model.mixers=hyena", "train.steps=2", "parallel.cp=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dist_run):
    out = tmp_path_factory.mktemp("run")
    dist_run(run_config, 2, CONFIG, TINY, str(out))
    return out


def _config(run_dir, overrides=()):
    cfg = with_export_defaults(with_defaults(LazyConfig.load(CONFIGS / CONFIG)))
    return LazyConfig.apply_overrides(cfg, [*TINY, f"train.output_dir={run_dir}", *overrides])


@contextlib.contextmanager
def no_pickle():
    """Every unpickling entry point raises (torch.load builds its unpickler from pickle.Unpickler)."""
    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    with pytest.MonkeyPatch.context() as patch:
        for name in ("load", "loads", "Unpickler"):
            patch.setattr(pickle, name, refuse)
        patch.setattr(torch, "load", refuse)
        yield


def test_export_loads_into_a_fresh_model_with_the_checkpoint_parameters(trained, tmp_path):
    spec = importlib.util.spec_from_file_location("launch_export", ROOT / "launch" / "export.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    argv = [str(CONFIGS / CONFIG), *TINY, f"train.output_dir={trained}", f"export.out={tmp_path}"]
    assert launcher.main(argv) == 0
    assert launcher.main([str(CONFIGS / CONFIG), "--out"]) == 2
    reference = load_model_state(latest_checkpoint(trained / "checkpoints"))
    for model in (load_exported(tmp_path), load_exported(tmp_path, _config(trained).model)):
        state = model.state_dict()
        assert state.keys() == reference.keys()
        for name, tensor in reference.items():
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
    default = export_model(_config(trained), name="digits_hyena_tiny")
    assert default == trained / "export" and (default / "model.safetensors").is_file()


def test_loading_an_export_never_unpickles(trained, tmp_path):
    folder = export_model(_config(trained, [f"export.out={tmp_path}"]), name="digits_hyena_tiny")
    with no_pickle():
        model = load_exported(folder)
        with pytest.raises(AssertionError, match="unpickled"):  # the trap works: DCP reads its pickle
            load_model_state(latest_checkpoint(trained / "checkpoints"))
    reference = load_model_state(latest_checkpoint(trained / "checkpoints"))
    torch.testing.assert_close(model.state_dict(), reference, rtol=0, atol=0)


def test_an_export_config_naming_other_callables_is_refused(trained, tmp_path):
    folder = export_model(_config(trained, [f"export.out={tmp_path}"]), name="digits_hyena_tiny")
    text = yaml.safe_load((folder / "model.yaml").read_text())
    text["model"]["_target_"] = "os.system"
    (folder / "model.yaml").write_text(yaml.safe_dump(text))
    with pytest.raises(ValueError, match="os.system"):
        load_exported(folder)
    load_exported(folder, _config(trained).model)  # the caller's own config is trusted


def test_checkpoint_tensors_are_read_weights_only(trained, monkeypatch):
    """The README's claim on the DCP path: every tensor goes through torch.load(weights_only=True)."""
    seen, real = [], torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_model_state(latest_checkpoint(trained / "checkpoints"))
    assert seen and all(w is True for w in seen), seen
