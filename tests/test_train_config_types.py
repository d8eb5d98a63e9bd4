"""Typed config values (`hyena_cp.value_types`): a value of the wrong type is refused with the
key, the value and the expected type, before any process group exists, whether the type is
declared by a config section's dataclass (``train.*``, ``parallel.*``) or by the parameter of a
call in the config (``optimizer.lr``, ``task.global_batch_size``, ``model.*``). Values of the
right type (an int for a float, a list for a tuple) pass, in every shipped config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import torch

from hyena_cp.lazy import LazyConfig, check_types
from hyena_cp.train import loop
from hyena_cp.train.config import with_defaults
from hyena_cp.train.export import ExportConfig
from hyena_cp.train.generate import GenerateConfig
from hyena_cp.value_types import check_value
from train_helpers import CONFIGS, VISION, load_config

CONFIG = "digits_hyena_tiny.py"

REFUSED = [  # override, the value as the error shows it, the expected type
    ("train.steps=2.5", "train.steps=2.5", "expected int (a whole number), got float"),
    ("train.steps=abc", "train.steps='abc'", "expected int, got str"),
    ("train.resume=nope", "train.resume='nope'", "expected bool (write true or false), got str"),
    ("train.compile=1", "train.compile=1", "expected bool, got int"),
    ("train.min_lr_ratio=abc", "train.min_lr_ratio='abc'", "expected float, got str"),
    ("parallel.timeout_s=abc", "parallel.timeout_s='abc'", "expected float, got str"),
    ("parallel.cp=true", "parallel.cp=True", "expected int, got bool"),
    ("optimizer.lr=abc", "optimizer.lr='abc'", "expected float | Tensor, got str"),
    ("optimizer.weight_decay=true", "optimizer.weight_decay=True", "expected float, got bool"),
    ("task.global_batch_size=2.5", "task.global_batch_size=2.5", "expected int (a whole number), got float"),
    ("model.embed_dim=abc", "model.embed_dim='abc'", "expected int, got str"),
]


def _no_process_group(*args, **kwargs):
    raise AssertionError("a process group was created before the config was checked")


@pytest.mark.parametrize("override,shown,expected", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_mistyped_value_is_refused_before_any_process_group(monkeypatch, tmp_path, override, shown, expected):
    monkeypatch.setattr(loop, "init_parallel", _no_process_group)
    cfg = load_config(CONFIG, VISION + ["model.mixers=hyena", override], str(tmp_path))
    with pytest.raises(ValueError) as error:
        loop.train(cfg, name="typed")
    assert str(error.value).startswith(f"{shown}: {expected}")


def test_the_generate_and_export_sections_are_typed_the_same_way():
    with pytest.raises(ValueError, match=r"^generate.max_new_tokens=2.5: expected int \(a whole number\), got float"):
        GenerateConfig(max_new_tokens=2.5)
    with pytest.raises(ValueError, match=r"^export.out=3: expected str \| None, got int"):
        ExportConfig(out=3)


ACCEPTED = ["parallel.timeout_s=30", "optimizer.lr=1", "train.fault_step=null", "train.output_dir=runs/a",
            "train.no_weight_decay=[head.*]", "train.min_lr_ratio=0"]


def test_values_of_the_declared_type_pass_in_every_shipped_config(monkeypatch, tmp_path):
    """The positive twin: the checks refuse nothing the trainer takes (the first collective is
    where this run stops, so everything before it was accepted)."""
    monkeypatch.setattr(loop, "init_parallel", _no_process_group)
    cfg = load_config(CONFIG, VISION + ["model.mixers=hyena", *ACCEPTED], str(tmp_path))
    with pytest.raises(AssertionError, match="a process group was created"):
        loop.train(cfg, name="typed")
    for path in sorted(Path(CONFIGS).glob("*.py")):
        check_types(with_defaults(LazyConfig.load(path)))


@pytest.mark.parametrize("hint,good,bad", [
    (int, [0, -3], [2.5, 2.0, True, "1", None]),
    (float, [1, 2.5, -1e-3], [True, "abc", None]),
    (bool, [True, False], [0, 1, "true", "nope"]),
    (str | None, ["a", None], [1, 2.5, True]),
    (float | torch.Tensor, [1e-3, 2], ["abc", None]),
    (tuple[str, ...], [("a", "b"), ["a"], ()], ["a", [1], ("a", 2)]),
    (tuple[int, int], [(1, 2), [3, 4]], [(1,), (1, 2, 3), (1, "2")]),
    (Literal["stop", "skip"], ["stop", "skip"], ["halt", 1]),
])
def test_check_value_accepts_the_declared_type_only(hint, good, bad):
    for value in good:
        check_value("k", value, hint)
    for value in bad:
        with pytest.raises(ValueError, match=r"^k=.*: expected "):
            check_value("k", value, hint)


@pytest.mark.parametrize("hint", [Path, Path | None, list, torch.nn.Module, "unresolved"])
def test_a_type_this_does_not_know_accepts_anything(hint):
    """A config value that works at run time is never refused (a str for a Path, ...)."""
    for value in ("abc", 1, 2.5, None, True):
        check_value("k", value, hint)
