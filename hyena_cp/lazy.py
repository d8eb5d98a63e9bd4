"""Python config files on omegaconf: ``LazyCall``, ``LazyConfig``, ``instantiate``.

A config is a ``DictConfig`` tree; a node with ``_target_`` is a call that ``instantiate``
performs bottom-up. ``LazyConfig(target)(**kw)`` and ``LazyCall(target)(**kw)`` record the same
node, so a mixer config reads as the ViT-5 Hyena adapter's API document writes it::

    ViT5HyenaAdapter(inner_mixer_cfg=LazyConfig(QKVSequenceMixer)(
        hidden_dim=384, hyena=LazyConfig(Hyena)(hidden_dim=384, spatial_dims=2)), grid_w=14)

One Python file per experiment; a derived file loads its base and edits::

    # configs/base.py
    model = LazyCall(torch.nn.Linear)(in_features=8, out_features=4, dtype=torch.float64)
    train = dict(lr=3e-4, steps=100)
    # configs/wide.py
    model, train = LazyConfig.load_rel("base.py", ("model", "train"))
    model.out_features = 16
    # launcher: a config path and key=value overrides, nothing else
    cfg = LazyConfig.apply_overrides(LazyConfig.load("configs/wide.py"), ["train.lr=1e-3"])
    net = instantiate(cfg.model)

Choices:
- Reserved keys: ``_target_`` (callable or dotted import string), ``_args_`` (positional
  args, e.g. the layers of ``nn.Sequential``), ``_partial_: true`` (return
  ``functools.partial`` instead of calling), ``_recursive_: false`` (pass the children as
  configs, unbuilt: for a constructor that instantiates a template per block itself).
- ``__target__`` (nvSubquadratic's spelling) is read as ``_target_``, so nested dicts written
  for nvSubquadratic, e.g. ``{"__target__": "torch.nn.modules.activation.SiLU"}``, load and
  build; a node with both keys is an error. Unlike nvSubquadratic, nested nodes are built
  bottom-up (modules included; ``_recursive_: false`` passes them as configs) and strings are
  never evaluated (``"3 * 48"`` stays a string).
- ``LazyConfig(target)`` also takes a dotted import string, resolved by ``instantiate``;
  ``instantiate(LazyConfig(target))`` builds it with no arguments.
- A ``.py`` config's keys are its dict/DictConfig globals not starting with ``_`` (name an
  intermediate ``_base = LazyConfig.load_rel("base.py")`` to keep it out); other globals
  (imports, ints, functions) are ignored. Each load runs the file again: fresh objects.
- ``instantiate`` returns a mapping without a target key as a plain ``dict`` and a list as
  a plain ``list`` (children built), so results can be passed on as kwargs.
- ``save`` writes YAML: a callable ``_target_`` (or ``__target__``, key kept as written)
  becomes its dotted name; any other object (``nn.GELU``, ``torch.float64``) becomes
  ``${locate:torch.float64}``, an interpolation that resolves back to the object on access.
  Objects without an importable name (lambdas, local functions, instances) raise
  ``ValueError`` naming the key.
- Override values are YAML 1.2 scalars: ``3e-4`` is a float, only true/false are bools
  (``no`` stays a string), ``null`` is None, an empty value is ``""``. ``check_types`` holds
  each plain argument of a call to the type its parameter declares (``optimizer.lr=abc`` is
  refused with the key, `hyena_cp.value_types`) without calling anything.
"""
from __future__ import annotations

import dataclasses

import builtins
import difflib
import functools
import importlib
import importlib.util
import inspect
import itertools
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml
from omegaconf import Container, DictConfig, ListConfig, OmegaConf

from hyena_cp.value_types import check_value

__all__ = ["ConfigKeyError", "LazyCall", "LazyConfig", "check_types", "instantiate", "locate", "takes_keyword"]

_FLAGS = {"allow_objects": True}  # callables, dtypes and classes are legal config values
_counter = itertools.count()


def locate(name: str) -> Any:
    """Import an object by dotted name: ``locate("torch.nn.Linear") is torch.nn.Linear``."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        modname = ".".join(parts[:i])
        try:
            obj = importlib.import_module(modname)
        except ModuleNotFoundError as e:  # a found module's own missing dependency propagates
            if e.name and (modname == e.name or modname.startswith(e.name + ".")):
                continue
            raise
        for j, attr in enumerate(parts[i:], start=i):
            if not hasattr(obj, attr):
                near = difflib.get_close_matches(attr, dir(obj), n=3)
                raise ImportError(f"cannot locate {name!r}: {'.'.join(parts[:j])!r} has no "
                                  f"attribute {attr!r}" + (f"; did you mean {near}?" if near else ""))
            obj = getattr(obj, attr)
        return obj
    if hasattr(builtins, name):
        return getattr(builtins, name)
    raise ImportError(f"cannot locate {name!r}: no importable module prefix")


_register = getattr(OmegaConf, "register_resolver", None)  # omegaconf >= 2.4
if _register is None or "use_cache" not in inspect.signature(_register).parameters:
    _register = OmegaConf.register_new_resolver  # omegaconf 2.1-2.3
if not OmegaConf.has_resolver("locate"):
    _register("locate", locate)


class ConfigKeyError(KeyError):
    """An override names a key the config does not have. A ``KeyError`` whose text is the message
    itself (``str(KeyError(m))`` quotes ``m``), and a user's mistake to the launchers, not a bug."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class LazyCall:
    """``LazyCall(target)(*args, **kwargs)`` records a call as a ``DictConfig``.

    >>> cfg = LazyCall(torch.nn.Linear)(in_features=2, out_features=3)
    >>> cfg.out_features = 5; layer = instantiate(cfg)
    """

    def __init__(self, target: Callable[..., Any]) -> None:
        if not callable(target):
            raise TypeError(f"LazyCall target must be a class or function, got {target!r} "
                            f"({type(target).__name__}); a dotted string goes in a dict's _target_")
        self._target = target

    def __call__(self, *args: Any, **kwargs: Any) -> DictConfig:
        return _call_node(self._target, args, kwargs)


def _call_node(target: Callable[..., Any] | str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> DictConfig:
    """The ``DictConfig`` that records ``target(*args, **kwargs)``."""
    # omegaconf would turn a dataclass *type* into a structured-config node, so a
    # dataclass target is stored as its import path (resolved again by instantiate).
    if dataclasses.is_dataclass(target) and isinstance(target, type):
        target = f"{target.__module__}.{target.__qualname__}"
    node: dict[str, Any] = {"_target_": target, **({"_args_": list(args)} if args else {})}
    return DictConfig({**node, **kwargs}, flags=_FLAGS)


_TARGET_KEYS = ("_target_", "__target__")  # ours, nvSubquadratic's


def _target_key(items: Mapping[str, Any], path: str) -> str | None:
    """Which target key a node uses (``None``: a plain mapping); both at once is ambiguous."""
    present = [k for k in _TARGET_KEYS if k in items]
    if len(present) > 1:
        raise ValueError(f"{path or '<root>'} has both _target_ ({items['_target_']!r}) and __target__ "
                         f"({items['__target__']!r}); keep one (__target__ is nvSubquadratic's _target_)")
    return present[0] if present else None


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _with_context(exc: Exception, msg: str) -> Exception:
    """``exc`` with ``msg`` prepended, of the same type where the type allows."""
    try:  # a typo stays a TypeError, a constructor's validation stays a ValueError
        return type(exc)(f"{msg}: {exc}")
    except Exception:
        return RuntimeError(f"{msg}: {exc}")


def _check_kwargs(target: Any, kwargs: Mapping[str, Any], path: str) -> None:
    """Name the full key path (and near matches) of a kwarg the target does not take."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # no signature (some builtins): the call itself decides
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=3)
            raise TypeError(f"unexpected keyword {key!r} ({_join(path, key)}); "
                            + (f"did you mean {near}?" if near else f"accepted: {names}"))


def takes_keyword(cfg: Any, name: str) -> bool:
    """Whether the call that config node ``cfg`` describes has a parameter ``name`` that can be passed
    by keyword (False for a node without a target, or a target without a signature)."""
    if isinstance(cfg, LazyConfig):
        cfg = cfg()
    if not isinstance(cfg, (DictConfig, Mapping)):
        return False
    key = _target_key(cfg, "")
    if key is None:
        return False
    target = cfg[key]
    try:
        params = inspect.signature(locate(target) if isinstance(target, str) else target).parameters
    except (TypeError, ValueError):
        return False
    return name in params and params[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                    inspect.Parameter.KEYWORD_ONLY)


def _build(node: Any, path: str, overrides: Mapping[str, Any] | None = None) -> Any:
    if isinstance(node, LazyConfig):  # recorded target, never called: a call without arguments
        node = node()
    if isinstance(node, (DictConfig, Mapping)):
        try:  # resolves interpolations; a missing value ("???") raises here, with its path
            items = {str(k): node[k] for k in node.keys()}
        except Exception as e:
            raise _with_context(e, f"while reading {path or '<root>'}") from e
        items.update(overrides or {})
        key = _target_key(items, path)
        if key is None:
            return {k: _build(v, _join(path, k)) for k, v in items.items()}
        target, partial = items.pop(key), bool(items.pop("_partial_", False))
        build = _build if items.pop("_recursive_", True) else lambda v, _: v  # False: pass configs
        args = [build(v, _join(path, f"_args_.{i}")) for i, v in enumerate(items.pop("_args_", []))]
        kwargs = {k: build(v, _join(path, k)) for k, v in items.items()}
        try:
            fn = locate(target) if isinstance(target, str) else target
            if not callable(fn):
                raise TypeError(f"{key} {fn!r} is not callable")
            _check_kwargs(fn, kwargs, path)
            return functools.partial(fn, *args, **kwargs) if partial else fn(*args, **kwargs)
        except Exception as e:
            name = target if isinstance(target, str) else \
                f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"
            raise _with_context(e, f"while instantiating {path or '<root>'} ({name})") from e
    if isinstance(node, (ListConfig, list, tuple)):
        out = [_build(v, _join(path, i)) for i, v in enumerate(node)]
        return tuple(out) if isinstance(node, tuple) else out
    return node


def _node_path(cfg: Any) -> str:
    """Key of a sub-config inside its root (``"model.mixer"``), so errors name full paths."""
    parts: list[str] = []
    while isinstance(cfg, Container) and cfg._get_parent() is not None:
        parts.append(str(cfg._key()))
        cfg = cfg._get_parent()
    return ".".join(reversed(parts))


def instantiate(cfg: Any, /, **overrides: Any) -> Any:
    """Build ``cfg`` bottom-up; ``overrides`` replace or add top-level kwargs first.

    Non-config values pass through; mappings without ``_target_`` or ``__target__`` become
    ``dict``s. Override values may be live objects (a process group) that never enter the config.

    >>> instantiate(LazyCall(torch.nn.Linear)(in_features=2, out_features=3), bias=False)
    """
    if overrides and not isinstance(cfg, (DictConfig, Mapping, LazyConfig)):
        raise TypeError(f"instantiate overrides {sorted(overrides)} need a mapping config, got {type(cfg)}")
    return _build(cfg, _node_path(cfg), overrides)


def _declared_types(fn: Any) -> dict[str, Any]:
    """Parameter name -> declared type of ``fn`` (a class: its constructor's). Each string
    annotation (``from __future__ import annotations``) is evaluated on its own in the module of
    its definition, as ``typing.get_type_hints`` would, so one that cannot be resolved (a name
    imported only for type checkers) leaves just that parameter unchecked."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    owner = inspect.unwrap(fn.__init__ if inspect.isclass(fn) else fn)
    namespace = getattr(owner, "__globals__", {})
    declared = {}
    for name, p in params.items():
        hint = p.annotation
        if isinstance(hint, str):
            try:
                hint = eval(hint, namespace)  # the source's own annotation, as typing.get_type_hints does
            except Exception:
                continue
        if hint is not p.empty:
            declared[name] = hint
    return declared


_SCALARS = (type(None), bool, int, float, str)


def _plain(value: Any) -> Any:
    """A scalar, or a list of scalars, as plain Python; anything else (a call, an object): None."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(v, _SCALARS) for v in value):
        return list(value)
    return None


def check_types(cfg: Any, path: str = "") -> None:
    """Check every plain argument (scalar or list of scalars) of every call in ``cfg`` against
    the type its parameter declares (`hyena_cp.value_types.check_value`), calling nothing; a
    ValueError names the key, the value and the type, e.g. ``optimizer.lr='abc': expected
    float | Tensor, got str``. Values this cannot read (a missing ``???``, an interpolation
    that does not resolve) are left for `instantiate` to report."""
    path = path or _node_path(cfg)
    if isinstance(cfg, (DictConfig, Mapping)):
        items = {}
        for key in cfg.keys():
            try:
                items[str(key)] = cfg[key]
            except Exception:
                continue
        target = items.get("_target_")
        if target is not None:
            fn = locate(target) if isinstance(target, str) else target
            declared = _declared_types(fn)
            for key, value in items.items():
                plain = _plain(value)
                if key in declared and not key.startswith("_") and (plain is not None or value is None):
                    check_value(_join(path, key), plain, declared[key])
        for key, value in items.items():
            if key != "_target_":
                check_types(value, _join(path, key))
    elif isinstance(cfg, (ListConfig, list, tuple)):
        for i, value in enumerate(cfg):
            check_types(value, _join(path, i))


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 scalars: ``3e-4`` is a float and only true/false are bools."""


class _YamlDumper(yaml.SafeDumper):
    """Quotes the strings that ``_YamlLoader`` would read as floats (``"3e-4"``)."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_YamlLoader.yaml_implicit_resolvers = {
    c: [(tag, rx) for tag, rx in rs if tag != _BOOL]
    for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
for _cls in (_YamlLoader, _YamlDumper):
    _cls.add_implicit_resolver(_FLOAT, re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                               list("-+0123456789"))


def _dotted(obj: Any, path: str) -> str:
    """Dotted name that ``locate`` maps back to ``obj`` (``torch.nn.GELU``, ``torch.float64``)."""
    qual, module = getattr(obj, "__qualname__", None), getattr(obj, "__module__", None)
    name = f"{module}.{qual}" if qual and module else str(obj)  # str(torch.float64) == "torch.float64"
    try:
        if bool(locate(name) == obj):  # == so bound methods (Cls.from_config) qualify too
            return name
    except Exception:
        pass
    raise ValueError(f"cannot save {path or '<root>'}: {obj!r} has no importable dotted name "
                     "(a lambda, a local function, an object defined in a config file, an instance)")


def _to_plain(node: Any, path: str, strict: bool) -> Any:
    if isinstance(node, dict):
        return {k: (_dotted(v, _join(path, k)) if k in _TARGET_KEYS and callable(v)
                    else _to_plain(v, _join(path, k), strict)) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_to_plain(v, _join(path, i), strict) for i, v in enumerate(node)]
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    try:
        return "${locate:" + _dotted(node, path) + "}"
    except ValueError:
        if strict:
            raise
        return f"<unserializable {node!r}>"


def _flat_keys(plain: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a plain container (``model.dims.0`` for list items)."""
    items = plain.items() if isinstance(plain, dict) else enumerate(plain) if isinstance(plain, list) else ()
    return [k for key, v in items for k in (_join(prefix, key), *_flat_keys(v, _join(prefix, key)))]


def _exec_py(path: str) -> dict[str, Any]:
    """Run a config file as a fresh module; its public dict/DictConfig variables are the config."""
    name = f"_hyena_cp_lazy_config_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # visible while it runs (dataclasses look it up), gone after
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and isinstance(v, (dict, DictConfig))}


class LazyConfig:
    """``LazyConfig(target)(*args, **kwargs)`` records a call as ``LazyCall`` does; the static
    methods load, derive, override, save and print config files.

    >>> cfg = LazyConfig(QKVSequenceMixer)(hidden_dim=8, hyena=LazyConfig(Hyena)(hidden_dim=8))
    >>> mixer = instantiate(cfg)
    """

    def __init__(self, target: Callable[..., Any] | str) -> None:
        if not (callable(target) or isinstance(target, str)):
            raise TypeError(f"LazyConfig target must be a class, a function or a dotted import string, "
                            f"got {target!r} ({type(target).__name__})")
        self._target = target

    def __call__(self, *args: Any, **kwargs: Any) -> DictConfig:
        return _call_node(self._target, args, kwargs)

    def __repr__(self) -> str:
        return f"LazyConfig({self._target!r})"

    @staticmethod
    def load(path: str | os.PathLike[str], keys: str | Sequence[str] | None = None) -> Any:
        """Root ``DictConfig`` of a ``.py`` config (run fresh on every call) or a ``.yaml`` file.

        ``keys`` returns one top-level entry (a str) or a tuple of entries instead.

        >>> cfg = LazyConfig.load("configs/vit5_tiny.py"); cfg.model.depth
        """
        path = os.fspath(path)
        if path.endswith(".py"):
            data = _exec_py(path)
        elif path.endswith((".yaml", ".yml")):
            with open(path, encoding="utf-8") as f:
                data = yaml.load(f, Loader=_YamlLoader) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
        else:
            raise ValueError(f"{path}: config files end in .py or .yaml")
        cfg = DictConfig(data, flags=_FLAGS)
        if keys is None:
            return cfg
        return cfg[keys] if isinstance(keys, str) else tuple(cfg[k] for k in keys)

    @staticmethod
    def load_rel(filename: str, keys: str | Sequence[str] | None = None) -> Any:
        """``load`` a file relative to the config file that calls this (fresh objects each time).

        >>> model = LazyConfig.load_rel("vit5_tiny.py", "model")  # in configs/vit5_wide.py
        """
        caller = sys._getframe(1).f_globals.get("__file__")
        if caller is None:
            raise RuntimeError("LazyConfig.load_rel must be called from a config file; use load()")
        return LazyConfig.load(os.path.join(os.path.dirname(os.path.abspath(caller)), filename), keys)

    @staticmethod
    def save(cfg: Any, path: str | os.PathLike[str]) -> None:
        """Write ``cfg`` as YAML atomically: a temp file in the same folder, then ``os.replace``."""
        text, path = LazyConfig.format(cfg, strict=True), os.fspath(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                   prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @staticmethod
    def format(cfg: Any, strict: bool = False) -> str:
        """YAML text of ``cfg`` as ``save`` writes it, for logs (unsaveable values shown as text)."""
        plain = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, Container) else cfg
        return yaml.dump(_to_plain(plain, "", strict), Dumper=_YamlDumper, sort_keys=False)

    @staticmethod
    def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
        """Apply command-line ``key=value`` items to ``cfg`` in place and return it.

        A key must exist already (else `ConfigKeyError`, a ``KeyError``, with near matches);
        ``model.dims.0=3`` and ``model.dims[0]=3`` index lists; ``model.act=${locate:torch.nn.ReLU}``
        sets an object.

        >>> LazyConfig.apply_overrides(cfg, ["model.hidden_dim=128", "train.lr=3e-4", "model.norm=null"])
        """
        for item in overrides:
            key, sep, text = item.partition("=")
            key = key.strip().replace("[", ".").replace("]", "")
            if not sep or not key:
                raise ValueError(f"override {item!r} must look like key=value (e.g. train.lr=3e-4)")
            keys = _flat_keys(OmegaConf.to_container(cfg, resolve=False))  # sees "???", ${...} too
            if key not in keys:
                near = difflib.get_close_matches(key, keys, n=3)
                there = [k for k in keys if k.rpartition(".")[0] == key.rpartition(".")[0]][:20]
                raise ConfigKeyError(f"override {item!r}: no key {key!r} in the config; "
                               + (f"did you mean {near}?" if near else f"keys there: {there}"))
            value = "" if not text.strip() else yaml.load(text, Loader=_YamlLoader)
            OmegaConf.update(cfg, key, value, merge=False)
        return cfg
