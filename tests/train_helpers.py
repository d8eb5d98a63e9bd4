"""Shared by the training tests: the shipped configs, shrunk by overrides, run on one rank."""
from __future__ import annotations

from pathlib import Path

from hyena_cp.lazy import LazyConfig
from hyena_cp.train.config import with_defaults
from hyena_cp.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUIET = ["train.progress=false", "train.warmup_steps=1"]
# Small versions of the shipped configs: same code paths, seconds instead of minutes (the
# configs tie task.data.img_size / seq_len to the model's by interpolation).
VISION = QUIET + ["model.embed_dim=16", "model.depth=1", "model.num_heads=2", "model.img_size=16",
                  "model.hyena.num_heads=2", "model.hyena.filter_width=8",
                  "task.global_batch_size=8", "task.data.val_fraction=0.05", "train.steps=3"]
LM = QUIET + ["model.num_layers=1", "model.layer_pattern=H", "model.hidden_size=16", "model.ffn_hidden_size=32",
              "model.max_sequence_length=32", "model.hyena.max_len=32", "model.hyena.filter_width=8",
              "task.data.max_bytes=20000", "task.global_batch_size=4",
              "task.eval_samples=4", "train.steps=3"]
RTOL = 1e-5  # fp32, different reduction orders across ranks


def load_config(name: str, overrides: list[str], output_dir: str):
    """A shipped config with its defaults, the overrides and the output folder."""
    cfg = with_defaults(LazyConfig.load(CONFIGS / name))
    return LazyConfig.apply_overrides(cfg, overrides + [f"train.output_dir={output_dir}"])


def run_config(name: str, overrides: list[str], output_dir: str) -> dict:
    """`train` on one rank of a pool (module level, so `dist_run` can send it)."""
    return train(load_config(name, overrides, output_dir), name=Path(name).stem)


def as_float64(module):
    """``module.double()`` (a LazyCall target: the fp64 parity runs wrap the config's model in it)."""
    return module.double()


def float64_config(name: str, overrides: list[str], output_dir: str):
    """A shipped config with its model in float64 (the tasks' losses follow the logits' dtype)."""
    from omegaconf import OmegaConf

    from hyena_cp.lazy import LazyCall

    cfg = load_config(name, overrides, output_dir)
    OmegaConf.resolve(cfg)  # "${model.img_size}" and the like, before the model moves under "module"
    cfg.model = LazyCall(as_float64)(module=cfg.model)
    return cfg


def run_config_fp64(name: str, overrides: list[str], output_dir: str) -> dict:
    """`run_config` with the model in float64."""
    return train(float64_config(name, overrides, output_dir), name=Path(name).stem)
