"""Cross-rank agreement: before the first collective of a call, the ranks of a group compare
what decides the sizes of their collectives, and all raise the same error if they differ.

Why: every rank validates its own input, but shards that are each valid alone can disagree
(local lengths 8 and 6): gloo then aborts the process ("Received data size doesn't match
expected size"), NCCL hangs or misreads silently, and a rank whose shard is invalid alone
raises while its peers wait in a collective. So each rank encodes its call as a small int64
*signature* (shapes, dtypes, ``num_valid_tokens``, the conditioning shape, the values or a
checksum of ``cu_seqlens``), ONE all-gather gives every rank all signatures, and if they
differ every rank raises the same ``ValueError``, built from the gathered signatures only,
naming each disagreeing field with its values and the ranks that hold them.

Policy (``check_agreement=`` of `QKVSequenceMixer`, `Hyena` and the ViT-5 networks):

- ``"always"`` (default): check on every call. Cost: one all-gather of ``2 + 10 * fields``
  int64 (< 1 KiB) per outermost call, plus, with NCCL, one host sync to read the result.
  On gloo/CPU it is a few percent of even a small layer's forward (docs/design.md).
- ``"off"``: no check, no cost; for runs whose data path is known to hand every rank the
  same shapes. Disagreeing ranks then fail as described above.

Why no "check once per new signature" cache: a rank cannot know that ANOTHER rank's
signature changed without asking it. With a cache, the rank whose shape is new runs the
all-gather while its peers (cache hits) enter the AllToAll: exactly the mismatch the check is
for, now inside the check. A sound cache needs a key all ranks agree on, which only
communication provides, so the check is either on for every call or off.

Nesting: a network checks once at its outermost forward (its input decides every block's
shapes) and runs the blocks inside `agreed(group)`, where nested checks on that group return
at once. A module with ``"off"`` enters the scope too: it vouches for everything inside. The
scope is thread-local and covers the forward pass; recomputation under activation
checkpointing happens outside it and checks again, on every rank alike.

Under ``torch.compile`` (``fullgraph=True`` included) the check is the custom op
`traceable.agreement_token`: the signature is encoded from the traced shapes, the op
all-gathers and compares it when the graph runs, and the zero it returns is added to the
tensor the call's collectives depend on (``before=``), which orders the check first. A tensor
field is then compared by its shape, not its values. What the check cannot cover there: an
input that fails a rank's own validation raises on that rank while tracing, before any graph
runs, so its peers wait in the check until ``parallel.timeout_s`` / the group's timeout; run
the first step eagerly (``train.compile`` compiles per block, after the network's eager check)
or validate the data before compiling.

The all-gather is control traffic: `count_comm` counts it under ``control_calls`` /
``control_bytes``, apart from the data traffic whose bytes the tests hold to the floor.
"""
from __future__ import annotations

import threading
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from .comm_stats import record
from .groups import group_size
from .traceable import _all_gather_tensor, agreement_token, group_name

__all__ = ["AGREEMENT_POLICIES", "agreed", "check_agreement_policy", "check_ranks_agree", "shape_of"]

AGREEMENT_POLICIES = ("always", "off")

_WIDTH = 10  # int64 slots per field: kind, length, up to 8 values (else a checksum)
_VALUES = _WIDTH - 2
_NONE, _INT, _TUPLE, _DTYPE, _TENSOR, _OTHER, _HASHED, _SHAPE_OF_TENSOR = range(8)
# Fixed codes, so that a dtype reads the same on every rank whatever the process.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
           torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
_INT64 = (-(2**63), 2**63 - 1)
# type names as fixed codes for traced calls (crc32 of a name is not traceable)
_TYPE_CODES = {"bool": 1, "float": 2, "str": 3}

_scope = threading.local()


def check_agreement_policy(policy: str) -> str:
    """Return ``policy`` if it is one of `AGREEMENT_POLICIES`, else raise ``ValueError``."""
    if policy not in AGREEMENT_POLICIES:
        raise ValueError(f"check_agreement={policy!r} must be one of {AGREEMENT_POLICIES} ('always': compare the "
                         f"ranks' input shapes before the first collective of every call; 'off': trust them)")
    return policy


def _active() -> list:
    if not hasattr(_scope, "groups"):
        _scope.groups = []
    return _scope.groups


@contextmanager
def agreed(group: ProcessGroup | None) -> Iterator[None]:
    """Inside, `check_agreement` on ``group`` returns at once (`check_ranks_agree`): the caller has checked (or
    vouches) that the ranks agree on everything that decides the collectives inside."""
    groups = _active()
    groups.append(group)
    try:
        yield
    finally:
        groups.pop()


def _crc(data: Any) -> int:
    return zlib.crc32(repr(data).encode())


def _fits(values: list[int]) -> bool:
    return all(_INT64[0] <= v <= _INT64[1] for v in values)


def _encode(value: Any) -> list[int]:
    """One field as ``_WIDTH`` ints: ``[kind, length, values...]``; never raises."""
    if value is None:
        kind, values = _NONE, []
    elif isinstance(value, torch.dtype):
        kind, values = _DTYPE, [_DTYPES.index(value) if value in _DTYPES else 100 + _crc(value)]
    elif isinstance(value, bool) or not isinstance(value, (int, tuple, list, Tensor)):
        # repr only of plain values: an object's repr may hold its address, different per rank
        plain = isinstance(value, (bool, float, str))
        kind, values = _OTHER, [_crc(type(value).__name__), _crc(value) if plain else 0]
    elif isinstance(value, int):
        kind, values = _INT, [value]
    elif isinstance(value, Tensor):
        kind, values = _encode_tensor(value)
    else:
        values = list(value)
        kind = _TUPLE if all(isinstance(v, int) and not isinstance(v, bool) for v in values) else _OTHER
        values = values if kind == _TUPLE else [_crc(type(value).__name__), _crc(values)]
    if len(values) > _VALUES or not _fits(values):
        kind, values = _HASHED, [len(values), _crc(values)]
    return [kind, len(values), *values] + [0] * (_VALUES - len(values))


def _encode_tensor(t: Tensor) -> tuple[int, list[int]]:
    """A small tensor (``cu_seqlens``) by its values: a host read, as its validation does anyway."""
    try:
        data = t.detach().reshape(-1).cpu().tolist()
    except (RuntimeError, NotImplementedError):  # no data (meta tensors)
        return _OTHER, [_crc("Tensor"), _crc(tuple(t.shape))]
    integral = not (t.is_floating_point() or t.is_complex())
    return (_TENSOR, data) if integral else (_HASHED, [len(data), _crc(data)])


def _decode(slots: list[int]) -> str:
    kind, n, values = slots[0], slots[1], slots[2:2 + slots[1]]
    if kind == _NONE:
        return "None"
    if kind == _INT:
        return str(values[0])
    if kind == _TUPLE:
        return str(tuple(values))
    if kind == _DTYPE:
        return str(_DTYPES[values[0]]) if values[0] < len(_DTYPES) else f"dtype #{values[0]}"
    if kind == _TENSOR:
        return f"tensor({values})"
    if kind == _HASHED:
        return f"<{values[0]} values, crc32 {values[1]:#010x}>"
    if kind == _SHAPE_OF_TENSOR:
        return f"tensor of shape {tuple(values)}"
    return f"<not an int, tuple or tensor: crc32 {values[0]:#010x}/{values[1]:#010x}>"


def _device(group: ProcessGroup) -> torch.device:
    # NCCL moves CUDA tensors only; gloo (and the others used here) CPU tensors.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shape_of(value: Any) -> Any:
    """``tuple(value.shape)`` for a tensor, else ``value`` itself (None stays None): a field."""
    return tuple(value.shape) if isinstance(value, Tensor) else value


def check_ranks_agree(group: ProcessGroup | None, what: str, fields: Mapping[str, Any], *,
                      policy: str = "always", hint: str = "", before: Tensor | None = None) -> Tensor | None:
    """All-gather ``fields`` over ``group`` and raise the same ``ValueError`` on every rank if
    any field differs between ranks. Call it on every rank before the first collective.

    Args:
        what: the call being checked (e.g. ``"QKVSequenceMixer.forward"``), for the message.
        fields: name -> value; values are None, ints, dtypes, tuples of ints (shapes) or
            small integer tensors (compared by value; float or long ones by length + crc32;
            under ``torch.compile`` by their shape: values would need a host read).
            The names (and their order) must be the same on every rank.
        policy: ``"off"`` returns at once (see the module docstring).
        hint: appended to the message: how to give every rank matching input.
        before: the tensor the call's collectives depend on. Returned as is eagerly; under
            ``torch.compile`` the check is a custom op (`traceable.agreement_token`) and a zero
            it returns is added to ``before``, so the compiled graph runs the check before
            those collectives. Use the returned tensor in its place. Without it a compiled
            graph may drop the check as dead code: every caller in hyena_cp passes it.

    Returns ``before``.
    """
    if policy == "off" or group_size(group) == 1 or any(g is group for g in _active()):
        return before
    if torch.compiler.is_compiling():
        values = [s for v in fields.values() for s in _encode_traced(v)]
        tensor = isinstance(before, Tensor)  # (validation, after the check, rejects a non-tensor)
        token = agreement_token(values, group_name(group), what, "\n".join(fields), hint,
                                before.detach() if tensor else torch.zeros(()))
        return before + token if tensor else before
    values = [s for v in fields.values() for s in _encode(v)]
    gather_and_compare(group, what, list(fields), values, hint)
    return before


def gather_and_compare(group: ProcessGroup, what: str, names: list[str], values: list[int], hint: str) -> None:
    """The check itself: one all-gather of ``[rank, crc(what, names), *values]``; raises the same
    ``ValueError`` on every rank if the rows differ past the rank."""
    local = torch.tensor([dist.get_rank(), _crc([what, *names])] + values, dtype=torch.int64)
    world = group.size()
    gathered = torch.empty(world * local.numel(), dtype=torch.int64, device=_device(group))
    _all_gather_tensor(gathered, local.to(gathered.device), group=group)
    record("agreement", (world - 1) * local.numel() * local.element_size(), control=True)
    rows = gathered.view(world, -1).tolist()
    if all(row[1:] == rows[0][1:] for row in rows):
        return
    raise ValueError(_message(what, names, rows, hint))


def _encode_traced(value: Any) -> list[int]:
    """`_encode` for a call being traced by ``torch.compile``: shapes may be symbolic and a tensor
    cannot be read on the host, so a tensor is encoded by its shape (`_SHAPE_OF_TENSOR`);
    values of other kinds (rare in signatures) by their type alone."""
    if value is None:
        kind, values = _NONE, []
    elif isinstance(value, torch.dtype):
        kind, values = _DTYPE, [_DTYPES.index(value) if value in _DTYPES else len(_DTYPES)]
    elif isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        kind, values = _INT, [value]
    elif isinstance(value, Tensor):
        kind, values = _SHAPE_OF_TENSOR, list(value.shape)
    elif isinstance(value, (tuple, list)) and all(isinstance(v, (int, torch.SymInt)) for v in value):
        kind, values = _TUPLE, list(value)
    else:
        kind, values = _OTHER, [_TYPE_CODES.get(type(value).__name__, -1), 0]
    if len(values) > _VALUES:
        raise ValueError(f"check_ranks_agree under torch.compile: a field has {len(values)} values, more than "
                         f"{_VALUES}; pass a shorter field")
    return [kind, len(values), *values] + [0] * (_VALUES - len(values))


def _message(what: str, names: list[str], rows: list[list[int]], hint: str) -> str:
    global_ranks = [row[0] for row in rows]
    if any(row[1] != rows[0][1] for row in rows):  # different field names: not the same call
        parts = ["they are checking different calls (field-name crc32 "
                 + _by_value([f"{row[1]:#010x}" for row in rows], global_ranks) + ")"]
    else:
        parts = []
        for i, name in enumerate(names):
            lo = 2 + i * _WIDTH
            if any(row[lo:lo + _WIDTH] != rows[0][lo:lo + _WIDTH] for row in rows):
                parts.append(f"{name}: {_by_value([_decode(row[lo:lo + _WIDTH]) for row in rows], global_ranks)}")
    return (f"{what}: the {len(rows)} ranks of the group disagree on their inputs (compared before any "
            f"collective, so none has started): " + "; ".join(parts) + (f". {hint}" if hint else ""))


def _by_value(values: list[str], global_ranks: list[int]) -> str:
    """``"(2, 8, 8) on rank 0 vs (2, 6, 8) on ranks 1, 2"`` (group ranks; global ranks when they differ)."""
    groups: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(value, []).append(rank)
    out = []
    for value, ranks in groups.items():
        label = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        if any(global_ranks[r] != r for r in ranks):
            label += f" (global {', '.join(str(global_ranks[r]) for r in ranks)})"
        out.append(f"{value} on {label}")
    return " vs ".join(out)
