"""A call's signature for the cross-rank agreement check (`agreement`): the encoding of its fields
as fixed-width int64 slots (eager and traced), the one all-gather that compares the ranks' rows,
and the message every rank raises when they differ. Used by `agreement` (eager) and by the
`traceable.agreement_token` op (compiled calls), which is why it is a module of its own."""
from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from .c10d import all_gather_tensor
from .comm_stats import record

__all__ = ["encode", "encode_traced", "gather_and_compare"]

_WIDTH = 10  # int64 slots per field: kind, length, up to 8 values (else a checksum)
_VALUES = _WIDTH - 2
_NONE, _INT, _TUPLE, _DTYPE, _TENSOR, _OTHER, _HASHED, _SHAPE_OF_TENSOR = range(8)
# Fixed codes, so that a dtype reads the same on every rank whatever the process.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
           torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
_INT64 = (-(2**63), 2**63 - 1)
# type names as fixed codes for traced calls (crc32 of a name is not traceable)
_TYPE_CODES = {"bool": 1, "float": 2, "str": 3}

def _crc(data: Any) -> int:
    return zlib.crc32(repr(data).encode())


def _fits(values: list[int]) -> bool:
    return all(_INT64[0] <= v <= _INT64[1] for v in values)


def encode(value: Any) -> list[int]:
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
    kind, values = slots[0], slots[2:2 + slots[1]]
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


def gather_and_compare(group: ProcessGroup, what: str, names: list[str], values: list[int], hint: str) -> None:
    """The check itself: one all-gather of ``[rank, crc(what, names), *values]``; raises the same
    ``ValueError`` on every rank if the rows differ past the rank."""
    local = torch.tensor([dist.get_rank(), _crc([what, *names])] + values, dtype=torch.int64)
    world = group.size()
    gathered = torch.empty(world * local.numel(), dtype=torch.int64, device=_device(group))
    all_gather_tensor(gathered, local.to(gathered.device), group=group)
    record("agreement", (world - 1) * local.numel() * local.element_size(), control=True)
    rows = gathered.view(world, -1).tolist()
    if all(row[1:] == rows[0][1:] for row in rows):
        return
    raise ValueError(_message(what, names, rows, hint))


def encode_traced(value: Any) -> list[int]:
    """`encode` for a call being traced by ``torch.compile``: shapes may be symbolic and a tensor
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
