"""Reading nvSubquadratic config nodes as plain data, and renaming state_dict keys.

`Node` wraps one mapping of an nvSubquadratic config with its key path (``mixer_cfg.global_conv_cfg``)
so every refusal names the exact key. A converter reads each setting it understands with `Node.get`
and ends with `Node.finish`, which refuses any key it did not read: nvSubquadratic 0.2.0's
constructors take fixed keyword arguments, so an unread key is a setting this converter would
otherwise drop silently. Values are read as nvSubquadratic's ``instantiate`` sees them: strings of
plain arithmetic (``"3 * 48"``) are evaluated; an unresolved interpolation (``"${net.hidden_dim}"``)
is refused (resolve the config first, e.g. ``OmegaConf.to_container(cfg, resolve=True)``).

`StateMap` collects renaming rules ``nvSubquadratic key -> our key (+ transform)`` while the config
is converted, then applies them to a state_dict: a rule whose key is missing, or a key no rule
claims, raises ``ValueError`` naming the key.
"""
from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

__all__ = ["Node", "StateMap", "callable_name", "target_name"]

_MISSING = object()
_ARITH = re.compile(r"^[0-9.+\-*/()% ]+$")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def _arith(text: str, where: str) -> int | float:
    """The value of a string of plain arithmetic, as nvSubquadratic's instantiate evaluates it (an
    integral float becomes an int), without ``eval``."""
    def value(n: ast.AST):
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](value(n.left), value(n.right))
        if isinstance(n, ast.UnaryOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](value(n.operand))
        raise ValueError
    try:
        result = value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"{where}: {text!r} is not an arithmetic expression nvSubquadratic can evaluate") from e
    return int(result) if isinstance(result, float) and result.is_integer() else result


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}.{i}") for i, v in enumerate(value)]
    if isinstance(value, str):
        if "${" in value:
            raise ValueError(f"{where}: {value!r} is an unresolved interpolation; resolve the config first "
                             f"(OmegaConf.to_container(cfg, resolve=True))")
        if _ARITH.match(value) and any(c.isdigit() for c in value):
            return _arith(value, where)
    return value


def callable_name(value: Any) -> str | None:
    """``module.qualname`` of a raw callable: a function object, or the ``{"__callable__": name}`` encoding."""
    if isinstance(value, Mapping) and set(value) == {"__callable__"}:
        return str(value["__callable__"])
    if callable(value) and not isinstance(value, Mapping):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    return None


def target_name(value: Any) -> str | None:
    """The dotted ``__target__`` of a node (a string, or a class/function object), else None."""
    if not isinstance(value, Mapping) or "__target__" not in value:
        return None
    target = value["__target__"]
    return target if isinstance(target, str) else callable_name(target)


class Node:
    """One nvSubquadratic config node (a mapping with ``__target__``) and its key path."""

    def __init__(self, data: Mapping[str, Any], path: str):
        self.data, self.path, self.read = dict(data), path, {"__target__"}
        if "_target_" in self.data:
            self.fail("_target_", "nvSubquadratic configs name their class in __target__ (its instantiate ignores "
                                  "_target_); this is not an nvSubquadratic config node")
        target = target_name(self.data)
        if target is None:
            raise ValueError(f"{path or '<root>'}: expected a config node with a __target__, got {dict(data)!r}")
        self.target = target
        self.root, self.name = target.partition(".")[0], target.rpartition(".")[2]

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def fail(self, k: str, msg: str) -> NoReturn:
        raise ValueError(f"{self.key(k)}: {msg}")

    def is_(self, *names: str) -> bool:
        """True when the target is one of ``names`` ("Conv2d", ...) from torch or nvsubquadratic."""
        return self.root in ("torch", "nvsubquadratic") and self.name in names

    def get(self, k: str, default: Any = _MISSING) -> Any:
        self.read.add(k)
        if k not in self.data:
            if default is _MISSING:
                self.fail(k, f"is required by {self.name} and missing")
            return default
        return _plain(self.data[k], self.key(k))

    def child(self, k: str, default: Any = _MISSING) -> Node | None:
        """The sub-node at ``k`` (None when the value is None)."""
        value = self.get(k, default)
        if value is None:
            return None
        if target_name(value) is None and not (isinstance(value, Mapping) and "_target_" in value):
            self.fail(k, f"expected a config node with a __target__, got {value!r}")
        return Node(value, self.key(k))  # refuses a node spelled with our _target_

    def finish(self) -> None:
        """Refuse every key not read: a setting of this node that the conversion would drop."""
        for k in self.data:
            if k not in self.read:
                self.fail(k, f"is not a setting {self.name} converts from nvSubquadratic 0.2.0 (unknown key)")


Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StateMap:
    """Rules ``(their key, our key, transform)``, keys relative to the module being converted."""

    rules: list[tuple[str, str, Transform | None]] = field(default_factory=list)

    def add(self, theirs: str, ours: str, transform: Transform | None = None) -> None:
        self.rules.append((theirs, ours, transform))

    def extend(self, other: StateMap, their_prefix: str, our_prefix: str) -> None:
        """Add ``other``'s rules under the two prefixes (a submodule's keys)."""
        join = lambda p, k: f"{p}.{k}" if p else k  # noqa: E731
        self.rules += [(join(their_prefix, t), join(our_prefix, o), f) for t, o, f in other.rules]

    def apply(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state_dict from theirs; ``ValueError`` naming a missing or unclaimed key."""
        out: dict[str, torch.Tensor] = {}
        for theirs, ours, transform in self.rules:
            if theirs not in state_dict:
                raise ValueError(f"state_dict: key {theirs!r} is missing (the config says the module has it)")
            value = state_dict[theirs].detach()
            out[ours] = (transform(value) if transform is not None else value).clone()
        claimed = {theirs for theirs, _, _ in self.rules}
        extra = [k for k in state_dict if k not in claimed]
        if extra:
            raise ValueError(f"state_dict: key {extra[0]!r} has no counterpart in the converted model (the config "
                             f"does not describe it)" + (f"; {len(extra) - 1} more" if len(extra) > 1 else ""))
        return out
