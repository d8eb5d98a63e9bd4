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

Every entry point (a mixer's, the operator's or a network's forward, a cache's prefill) runs
its body inside `agreement(group, what, fields, ...)`: the group is checked, the ranks agree,
and the body (the call's own validation, then its collectives) runs inside `agreed(group)`.

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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from .groups import check_group, group_size
from .signature import encode, encode_traced, gather_and_compare
from .traceable import agreement_token, group_name

__all__ = ["AGREEMENT_POLICIES", "agreed", "agreement", "check_agreement_policy", "check_ranks_agree", "shape_of"]

AGREEMENT_POLICIES = ("always", "off")

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
        values = [s for v in fields.values() for s in encode_traced(v)]
        tensor = isinstance(before, Tensor)  # (validation, after the check, rejects a non-tensor)
        token = agreement_token(values, group_name(group), what, "\n".join(fields), hint,
                                before.detach() if tensor else torch.zeros(()))
        return before + token if tensor else before
    values = [s for v in fields.values() for s in encode(v)]
    gather_and_compare(group, what, list(fields), values, hint)
    return before


@contextmanager
def agreement(group: ProcessGroup | None, what: str, fields: Mapping[str, Any], *, policy: str, hint: str,
              before: Tensor | None) -> Iterator[Tensor | None]:
    """The one template of an entry point that talks to ``group``: check that ``group`` is a group
    (`check_group`), compare the ranks' ``fields`` (`check_ranks_agree`, which returns ``before``,
    ordered after the check under ``torch.compile``) and run the body inside `agreed(group)`.

    The body validates the call on its own rank and then runs it; the ranks agreed first, so a
    ``ValueError`` it raises is raised on every rank alike, before any collective::

        with agreement(cp_group, "Mixer.forward", {"x.shape": shape_of(x)}, policy=self.check_agreement,
                       hint="Give every rank its shard of the same x", before=x) as x:
            self._check(x)
            return self._forward(x, cp_group)
    """
    check_group(group)
    before = check_ranks_agree(group, what, fields, policy=policy, hint=hint, before=before)
    with agreed(group):
        yield before
