"""LazyCall / LazyConfig / instantiate: building, loading, deriving, saving, overrides."""
from __future__ import annotations

import dataclasses

import functools
import os
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torch import nn

from hyena_cp.lazy import LazyCall, LazyConfig, instantiate, locate

CONFIGS = Path(__file__).parent / "lazy_configs"


def scale(x: float, factor: float = 2.0) -> float:
    return x * factor


def bundle(**kwargs: object) -> dict[str, object]:
    return kwargs


class Factory:
    def __init__(self, width: int) -> None:
        self.width = width

    @classmethod
    def make(cls, width: int) -> Factory:
        return cls(width)


def mlp_cfg() -> DictConfig:
    return LazyCall(nn.Sequential)(
        LazyCall(nn.Linear)(in_features=4, out_features=8, dtype=torch.float64),
        LazyCall(nn.GELU)(approximate="tanh"),
        LazyCall(nn.Linear)(in_features=8, out_features=2, bias=False, dtype=torch.float64),
    )


def shapes(module: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def test_lazycall_builds_nested_sequential():
    cfg = mlp_cfg()
    assert cfg._target_ is nn.Sequential and cfg._args_[0]._target_ is nn.Linear
    net = instantiate(cfg)
    assert isinstance(net, nn.Sequential) and len(net) == 3
    assert net[0].weight.dtype == torch.float64 and net[2].bias is None
    assert net[1].approximate == "tanh"


def test_lazycall_rejects_non_callable():
    with pytest.raises(TypeError, match="must be a class or function"):
        LazyCall("torch.nn.Linear")


def test_function_target_lists_dicts_and_passthrough():
    cfg = LazyCall(bundle)(
        values=[LazyCall(scale)(x=1.0), LazyCall(scale)(x=2.0, factor=3.0), 7],
        nested={"act": nn.GELU, "inner": LazyCall(scale)(x=0.5)},
        dtype=torch.float16,
    )
    out = instantiate(cfg)
    assert out["values"] == [2.0, 6.0, 7]
    assert out["nested"] == {"act": nn.GELU, "inner": 1.0}
    assert out["dtype"] is torch.float16


def test_plain_mapping_becomes_dict_and_values_pass_through():
    cfg = DictConfig({"a": LazyCall(scale)(x=1.0), "b": {"c": [1, 2]}}, flags={"allow_objects": True})
    out = instantiate(cfg)
    assert out == {"a": 2.0, "b": {"c": [1, 2]}} and type(out["b"]) is dict
    assert instantiate(5) == 5 and instantiate("s") == "s"


def test_overrides_at_instantiate_and_live_objects():
    cfg = LazyCall(nn.Linear)(in_features=2, out_features=3)
    layer = instantiate(cfg, out_features=5, bias=False)
    assert layer.weight.shape == (5, 2) and layer.bias is None
    assert cfg.out_features == 3 and "bias" not in cfg  # the config is untouched
    marker = object()  # e.g. a process group: passed through, never copied into the config
    out = instantiate(LazyCall(bundle)(a=1), group=marker)
    assert out["group"] is marker
    with pytest.raises(TypeError, match="need a mapping"):
        instantiate([1], x=1)


def test_string_targets_and_partial():
    cfg = DictConfig({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3})
    assert isinstance(instantiate(cfg), nn.Linear)
    fn = instantiate(DictConfig({"_target_": f"{__name__}.scale", "_partial_": True, "factor": 10.0}))
    assert isinstance(fn, functools.partial) and fn(2.0) == 20.0
    assert locate("torch.float64") is torch.float64 and locate("torch.nn.GELU") is nn.GELU


def test_recursive_false_passes_child_configs_unbuilt():
    cfg = LazyCall(bundle)(_recursive_=False, inner=LazyCall(nn.Linear)(in_features=2, out_features=3))
    out = instantiate(cfg)
    assert isinstance(out["inner"], DictConfig)  # the receiver builds it, e.g. once per block
    assert instantiate(out["inner"], out_features=4).weight.shape == (4, 2)
    with pytest.raises(TypeError, match=r"while instantiating inner .*inner\.widht"):
        instantiate(out["inner"], widht=1)


def test_bad_target_errors_name_target_and_path():
    cfg = DictConfig({"model": {"mixer": {"_target_": "torch.nn.Linearr", "in_features": 1}}})
    with pytest.raises(ImportError, match=r"model\.mixer \(torch\.nn\.Linearr\).*Linear"):
        instantiate(cfg)
    with pytest.raises(ImportError, match="no importable module"):
        locate("no_such_pkg_xyz.thing")


def test_typo_kwarg_names_key_path_and_near_match():
    root = DictConfig({"model": {"mixer": LazyCall(nn.Linear)(in_features=2, out_featurs=3)}},
                      flags={"allow_objects": True})
    with pytest.raises(TypeError) as info:
        instantiate(root)
    msg = str(info.value)
    assert "while instantiating model.mixer (torch.nn.modules.linear.Linear)" in msg
    assert "model.mixer.out_featurs" in msg and "out_features" in msg
    with pytest.raises(TypeError, match=r"model\.mixer\.out_featurs"):
        instantiate(root.model.mixer)  # a sub-node still reports its full path


def test_constructor_error_is_wrapped_keeping_type():
    cfg = LazyCall(nn.Linear)(in_features=2, out_features=-1)
    with pytest.raises(RuntimeError, match=r"while instantiating <root> \(torch\.nn"):
        instantiate(cfg)


def test_missing_value_names_path():
    cfg = DictConfig({"m": {"_target_": "torch.nn.Linear", "in_features": "???", "out_features": 1}})
    with pytest.raises(Exception, match="while reading m"):
        instantiate(cfg)


def test_load_python_config_is_fresh_and_isolated():
    before = set(sys.modules)
    a, b = LazyConfig.load(CONFIGS / "base.py"), LazyConfig.load(CONFIGS / "base.py")
    assert set(sys.modules) == before
    assert set(a.keys()) == {"model", "train"}  # no _private, no non-dict globals
    a.train.lr = 1.0
    assert b.train.lr == 3e-4
    net = instantiate(a.model)
    assert shapes(net)["2.weight"] == ((2, 8), torch.float64)
    model, train = LazyConfig.load(CONFIGS / "base.py", ("model", "train"))
    assert train.name == "digits" and model._target_ is nn.Sequential


def test_load_rel_derived_edits_do_not_mutate_base():
    derived = LazyConfig.load(CONFIGS / "derived.py")
    base = LazyConfig.load(CONFIGS / "base.py")
    assert set(derived.keys()) == {"model", "train", "head"}
    assert derived.model._args_[2].out_features == 3 and derived.train.steps == 20
    assert base.model._args_[2].out_features == 2 and base.train.steps == 10
    assert derived.head._args_[0].in_features == 5 and derived.model._args_[0].in_features == 4
    assert instantiate(derived.model)[2].weight.shape == (3, 8)
    with pytest.raises(RuntimeError, match="from a config file"):
        exec("LazyConfig.load_rel('base.py')", {"LazyConfig": LazyConfig})


def test_save_load_instantiate_round_trip(tmp_path):
    cfg = LazyConfig.load(CONFIGS / "base.py")
    cfg.model._args_[1] = LazyCall(nn.GELU)(approximate="tanh")
    cfg.train.act = nn.ReLU
    cfg.train.exp = "3e-4"  # a string that looks like a float must stay a string
    cfg.train.word = "no"
    path = tmp_path / "cfg.yaml"
    LazyConfig.save(cfg, path)
    text = path.read_text()
    assert "torch.nn.modules.linear.Linear" in text and "${locate:torch.float64}" in text
    loaded = LazyConfig.load(path)
    assert loaded.train.act is nn.ReLU and loaded.model._args_[0].dtype is torch.float64
    assert loaded.train.exp == "3e-4" and loaded.train.word == "no" and loaded.train.norm is None
    assert loaded.train.lr == 3e-4 and loaded.train.dims == [1, 2]
    a, b = instantiate(cfg.model), instantiate(loaded.model)
    assert str(a) == str(b) and shapes(a) == shapes(b)
    LazyConfig.save(loaded, tmp_path / "again.yaml")  # saving a loaded config is stable
    assert (tmp_path / "again.yaml").read_text() == text
    assert sorted(os.listdir(tmp_path)) == ["again.yaml", "cfg.yaml"]  # no temp files left


def test_save_bound_method_target_and_dtype_value(tmp_path):
    cfg = DictConfig({"f": LazyCall(Factory.make)(width=3), "t": [torch.bfloat16]}, flags={"allow_objects": True})
    LazyConfig.save(cfg, tmp_path / "f.yaml")
    out = instantiate(LazyConfig.load(tmp_path / "f.yaml"))
    assert isinstance(out["f"], Factory) and out["f"].width == 3 and out["t"] == [torch.bfloat16]


@pytest.mark.parametrize("bad", [lambda x: x, "local"])
def test_save_rejects_unserializable_and_writes_nothing(tmp_path, bad):
    def local_fn() -> None:
        pass

    value = local_fn if bad == "local" else bad
    cfg = DictConfig({"train": {"fn": value}}, flags={"allow_objects": True})
    with pytest.raises(ValueError, match=r"cannot save train\.fn"):
        LazyConfig.save(cfg, tmp_path / "x.yaml")
    assert os.listdir(tmp_path) == []
    assert "unserializable" in LazyConfig.format(cfg)  # logging never raises


def test_format_is_yaml_text():
    text = LazyConfig.format(mlp_cfg())
    assert text.startswith("_target_: torch.nn.modules.container.Sequential")


def test_apply_overrides_parses_yaml_values():
    cfg = LazyConfig.load(CONFIGS / "base.py")
    out = LazyConfig.apply_overrides(cfg, [
        "model._args_.0.out_features=128", "train.lr=1e-3", "train.steps=5", "train.norm=null",
        "train.name=no", "train.dims=[3, 4]", "train.norm=true", "model._args_.1._target_=torch.nn.ReLU",
        "model._args_.0.dtype=${locate:torch.float32}",
    ])
    assert out is cfg
    assert cfg.model._args_[0].out_features == 128 and cfg.train.lr == 1e-3
    assert isinstance(cfg.train.lr, float) and cfg.train.steps == 5 and cfg.train.name == "no"
    assert cfg.train.dims == [3, 4] and cfg.train.norm is True
    LazyConfig.apply_overrides(cfg, ["train.norm=null", "train.name=", "model._args_[2].out_features=128",
                                     "model._args_.2.in_features=128", "train.dims.1=9"])
    assert cfg.train.norm is None and cfg.train.name == "" and cfg.train.dims == [3, 9]
    net = instantiate(cfg.model)
    assert isinstance(net[1], nn.ReLU) and net[0].weight.dtype == torch.float32


def test_apply_overrides_rejects_typos_and_malformed_items():
    cfg = LazyConfig.load(CONFIGS / "base.py")
    with pytest.raises(KeyError, match=r"train\.lrr.*did you mean.*'train\.lr'"):
        LazyConfig.apply_overrides(cfg, ["train.lrr=0.1"])
    with pytest.raises(KeyError, match="model._args_.7"):
        LazyConfig.apply_overrides(cfg, ["model._args_.7.out_features=1"])
    with pytest.raises(ValueError, match="key=value"):
        LazyConfig.apply_overrides(cfg, ["train.lr"])
    assert "lrr" not in cfg.train


@dataclasses.dataclass
class _Settings:
    width: int = 4
    depth: int = 2


def test_dataclass_target():
    cfg = LazyCall(_Settings)(width=8)
    cfg.depth = 3
    assert instantiate(cfg) == _Settings(width=8, depth=3)
