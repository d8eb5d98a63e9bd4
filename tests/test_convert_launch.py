"""``launch/convert.py`` on random checkpoints in the original formats (vortex ``.pt`` + ``.yml``,
HuggingFace ``.safetensors`` + ``config.json``), then ``launch/train.py``'s loop on the written
``train.yaml``: the model starts from exactly the converted tensors (``train.init_from``) at CP=2,
and the configs of the tiny trainable models (configs/evo2_tiny.py, configs/hyenadna_tiny.py) train."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json

import pytest
import torch
import yaml
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state  # noqa: F401
from safetensors.torch import load_file, save_file

from hyena_cp.lazy import LazyConfig
from hyena_cp.train.checkpoint import load_model_state
from hyena_cp.train.config import with_defaults
from hyena_cp.train.generate import latest_checkpoint
from hyena_cp.train.loop import train
from striped_references import EVO2_TINY, HYENADNA_TINY, random_evo2_checkpoint, random_hyenadna_checkpoint
from train_helpers import QUIET, ROOT, run_config


def _convert_main():
    spec = importlib.util.spec_from_file_location("launch_convert", ROOT / "launch" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def write_checkpoint(kind: str, folder) -> tuple[list[str], int]:
    """A random checkpoint and config in the original files; the convert arguments and seq_len."""
    if kind == "evo2":
        config = {**EVO2_TINY, "vocab_size": 256}  # bytes
        torch.save({k: v.float() for k, v in random_evo2_checkpoint(config).items()}, folder / "evo2.pt")
        (folder / "evo2.yml").write_text(yaml.safe_dump(config))
        return [f"config={folder / 'evo2.yml'}", f"checkpoint={folder / 'evo2.pt'}"], 512  # CP=2: chunks >= MR's 127
    save_file({k: v.float().contiguous() for k, v in random_hyenadna_checkpoint(HYENADNA_TINY).items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(HYENADNA_TINY))
    return [f"config={folder / 'config.json'}", f"checkpoint={folder / 'model.safetensors'}"], 64


def worker_finetune(train_yaml: str) -> None:
    cfg = with_defaults(LazyConfig.load(train_yaml))
    cfg = LazyConfig.apply_overrides(cfg, QUIET + ["parallel.cp=2", "train.steps=1", "optimizer.lr=0.0",
                                                   "optimizer.weight_decay=0.0", "task.data.max_bytes=20000",
                                                   "task.global_batch_size=2", "task.eval_samples=2"])
    train(cfg, name="converted")


@pytest.mark.parametrize("kind", ["evo2", "hyenadna"])
def test_converted_folder_fine_tunes_from_the_converted_tensors(dist_run, tmp_path, kind):
    args, seq_len = write_checkpoint(kind, tmp_path)
    out = tmp_path / "converted"
    with contextlib.redirect_stdout(io.StringIO()):
        assert _convert_main()([kind, *args, f"out={out}", f"seq_len={seq_len}"]) == 0
    converted = load_file(str(out / "model.safetensors"))
    dist_run(worker_finetune, 2, str(out / "train.yaml"))
    trained = load_model_state(latest_checkpoint(out / "finetune" / "checkpoints"))  # lr 0: still the init
    assert trained.keys() == converted.keys()
    for name, tensor in converted.items():
        assert torch.equal(trained[name], tensor), name


def test_convert_usage_errors():
    main = _convert_main()
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert main([]) == 2
        assert main(["evo2", "config=a.yml", "checkpoint=b.pt"]) == 2  # no out=
        assert main(["evo2", "config=a.yml", "checkpoint=b.pt", "out=c", "shift=0.1"]) == 2  # hyenadna only
        assert main(["bert", "config=a.yml", "checkpoint=b.pt", "out=c"]) == 2
    assert "usage: python launch/convert.py" in err.getvalue()


@pytest.mark.parametrize("name", ["evo2_tiny.py", "hyenadna_tiny.py"])
def test_tiny_configs_train(dist_run, tmp_path, name):
    overrides = QUIET + ["train.steps=3", "task.data.max_bytes=30000", "task.global_batch_size=4", "task.eval_samples=4"]
    losses = dist_run(run_config, 2, name, overrides, str(tmp_path))
    assert losses[0]["final"]["val_loss"] == losses[1]["final"]["val_loss"]
    assert losses[0]["final"]["val_loss"] < 7.0  # from ln(512) = 6.24 / ln(256) = 5.55 at init, finite
