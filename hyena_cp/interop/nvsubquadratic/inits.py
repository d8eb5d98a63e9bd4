"""nvSubquadratic's init callables (``nvsubquadratic.utils.init``), read from a config.

They only decide initial weights, which a converted state_dict replaces. Where ours has the same
init we keep it, so a converted config trained from scratch starts as nvSubquadratic's would:
``small_init`` -> ``"small"`` (``N(0, 2/(5C))``) and ``partial_wang_init_fn_with_num_layers(num_layers=n)``
-> ``"wang"`` (``N(0, (2/(n sqrt C))^2)``). The other functions of that module (``trunc_normal_init``,
``trunc_normal_init_factory``, ``wang_init``) are accepted and dropped: the converted module keeps
its own init there. A callable from anywhere else is refused (we cannot tell what it does).
Raw callables arrive as function objects or as ``{"__callable__": "module.qualname"}``.
"""
from __future__ import annotations

from hyena_cp.interop.nvsubquadratic.nodes import Node, callable_name, target_name

__all__ = ["check_init"]

_MODULE = "nvsubquadratic.utils.init"
_KNOWN = ("small_init", "wang_init", "trunc_normal_init", "trunc_normal_init_factory",
          "partial_wang_init_fn_with_num_layers")


def check_init(node: Node, key: str) -> tuple[str, int | None] | None:
    """``(kind, num_layers)`` for our ``*_init`` settings from ``node[key]``, None to keep our default."""
    value = node.get(key, None)
    if value is None:
        return None
    target = target_name(value)
    name = target if target is not None else callable_name(value)
    module, _, func = (name or "").rpartition(".")
    if module != _MODULE or func not in _KNOWN:
        node.fail(key, f"{name or value!r} is not one of {_MODULE}.{{{', '.join(_KNOWN)}}}; an unknown init cannot "
                       f"be carried over (remove it to keep our default init)")
    if target is not None:  # a node: nvSubquadratic builds it eagerly into the init function
        call = Node(value, node.key(key))
        if func == "partial_wang_init_fn_with_num_layers":
            layers = call.get("num_layers")
            call.finish()
            return "wang", int(layers)
        if func == "trunc_normal_init_factory":
            call.get("std", 0.02)
        call.finish()
        return None
    return ("small", None) if func == "small_init" else None
