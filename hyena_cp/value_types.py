"""Config values checked against the type their key declares, so ``train.steps=2.5`` or
``train.resume=nope`` fails with the key, the value and the type instead of running wrongly.

One rule, `check_value`, for both places a type is declared: the annotations of the
dataclass sections (``train``, ``parallel``, ...; `check_fields`) and the annotated parameters of
the callables a LazyConfig calls (``optimizer.lr``, ``task.global_batch_size``;
`hyena_cp.lazy.check_types`). Command-line values are YAML scalars (`hyena_cp.lazy`), so
``abc`` arrives as a str, ``2.5`` as a float and ``nope`` as a str, never as a bool.

What a declared type accepts: ``bool`` only true/false; ``int`` whole numbers, not bools nor
floats (``2.0`` too is refused: a count is written as one); ``float`` ints and floats, not
bools; ``str`` strings only; ``None`` null; ``Literal[...]`` its values; ``tuple[X, ...]`` /
``list[X]`` a list or tuple of accepted items; a union any of its members. A value is
refused only when every member of the declared type is one of these and none accepts it:
a member this module does not know (``Path``, a class, ``Callable``) accepts anything, so a
value that works at run time is never refused. ``torch.Tensor`` is known and accepts no
config value (``lr: float | Tensor`` takes floats).
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union

import torch

__all__ = ["check_fields", "check_value", "describe"]

_NONE = type(None)


def _accepts(hint: Any, value: Any) -> bool | None:
    """Whether ``hint`` (one member of a union) accepts ``value``; None: a type not known here."""
    if hint is Any or hint is object:
        return True
    if hint is _NONE or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is torch.Tensor:
        return isinstance(value, torch.Tensor)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (tuple, list, Sequence) and args:
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):  # list, tuple, omegaconf's
            return False
        item = args[0] if origin is not tuple or (len(args) == 2 and args[1] is Ellipsis) else None
        if item is None:  # tuple[X, Y]: one type per position
            if len(args) != len(value):
                return False
            verdicts = [_check(a, v) for a, v in zip(args, value)]
        else:
            verdicts = [_check(item, v) for v in value]
        return None if None in verdicts else all(verdicts)
    return None


def _members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _check(hint: Any, value: Any) -> bool | None:
    """True: accepted; False: refused by every member; None: some member is unknown here."""
    verdicts = [_accepts(m, value) for m in _members(hint)]
    if any(v is True for v in verdicts):
        return True
    return None if None in verdicts else False


def describe(hint: Any) -> str:
    """A type as a user reads it: ``int``, ``float | Tensor``, ``str | None``, ``tuple[str, ...]``."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " | ".join(describe(m) for m in typing.get_args(hint))
    if hint is _NONE:
        return "None"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def check_value(key: str, value: Any, hint: Any) -> None:
    """Raise a ValueError naming ``key``, ``value`` and ``hint`` if the declared type refuses
    ``value`` (see the module docstring); a missing or unknown ``hint`` accepts anything."""
    if hint is None or hint is inspect.Parameter.empty or _check(hint, value) is not False:
        return
    expected = describe(hint)
    hint_text = ""
    if any(m is bool for m in _members(hint)) and isinstance(value, str):
        hint_text = " (write true or false)"
    elif any(m is int for m in _members(hint)) and isinstance(value, float):
        hint_text = " (a whole number)"
    raise ValueError(f"{key}={value!r}: expected {expected}{hint_text}, got {type(value).__name__}")


def check_fields(instance: Any, section: str) -> None:
    """`check_value` on every field of the dataclass ``instance``, the keys named ``section.field``."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        check_value(f"{section}.{f.name}", getattr(instance, f.name), hints.get(f.name))

