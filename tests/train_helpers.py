"""Shared by the training tests: the shipped configs, shrunk by overrides, run on one rank; a
tiny model for the checkpoint tests; checkpoint damage as a disk or a copy would do it."""
from __future__ import annotations

import io
import struct
import warnings
import zipfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

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


def run_config_reporting(name: str, overrides: list[str], output_dir: str) -> dict:
    """`run_config` that returns, instead of raising, what a user sees: the summary or the
    error (``"Type: message"``), and the warnings (so a test can compare them across ranks)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            summary, error = run_config(name, overrides, output_dir), None
        except Exception as e:
            summary, error = None, f"{type(e).__name__}: {e}"
    return {"summary": summary, "error": error, "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}


# --------------------------------------------------------------------------- tiny checkpoint model
def tiny_model_and_optimizer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    model.register_buffer("counter", torch.arange(3.0))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def tiny_steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
    for i in range(n):
        optimizer.zero_grad()
        model(torch.full((2, 4), float(i + 1))).square().sum().backward()
        optimizer.step()


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# --------------------------------------------------------------------------- checkpoint damage
DAMAGE = ("bitflip", "truncate", "no_metadata", "no_meta_json")


def _largest_payload(folder: Path) -> tuple[str, int, int]:
    """(file, offset, length) of the raw bytes of the largest stored model tensor: DCP's index
    gives the tensor's record (a ``torch.save`` zip), whose ``data/0`` entry holds the bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = dcp.FileSystemReader(str(folder)).read_metadata().storage_data
    _, info = max(((i, v) for i, v in storage.items() if i.fqn.startswith("model/")), key=lambda kv: kv[1].length)
    with open(folder / info.relative_path, "rb") as f:
        f.seek(info.offset)
        record = f.read(info.length)
    entry = next(e for e in zipfile.ZipFile(io.BytesIO(record)).infolist() if e.filename.endswith("/data/0"))
    name_len, extra_len = struct.unpack("<HH", record[entry.header_offset + 26:entry.header_offset + 30])
    start = info.offset + entry.header_offset + 30 + name_len + extra_len  # after the zip's local header
    return info.relative_path, start, entry.file_size


def damage(folder: Path, kind: str) -> str:
    """Damage checkpoint ``folder`` as a disk or an interrupted copy would (``DAMAGE``); returns
    the damaged file's name. "bitflip" flips one bit in the middle of the largest model tensor's
    bytes (same file size); "truncate" cuts the file holding them in the middle of them; the
    others delete DCP's ``.metadata`` or our ``meta.json``."""
    if kind in ("bitflip", "truncate"):
        name, start, size = _largest_payload(folder)
        data = bytearray((folder / name).read_bytes())
        if kind == "bitflip":
            data[start + size // 2] ^= 0x10
        else:
            data = data[:start + size // 2]
        (folder / name).write_bytes(bytes(data))
        return name
    name = {"no_metadata": ".metadata", "no_meta_json": "meta.json"}[kind]
    (folder / name).unlink()
    return name
