"""The CP collectives as ``torch.library`` custom ops: what lets ``torch.compile(fullgraph=True)``
trace a whole mixer under context parallelism.

Dynamo cannot trace ``dist.P2POp`` / ``batch_isend_irecv`` ("P2P compilation disabled"), and
an ``autograd.Function`` that calls ``dist.all_to_all_single`` breaks the graph. A custom op is
one opaque node instead: the compiler schedules it like any kernel, its fake (meta) version
gives the output shapes, its adjoint is registered as autograd (an AllToAll's adjoint is the
same AllToAll; a point-to-point exchange's is the reverse exchange), and its Python body runs
on every call, eager or compiled. So the byte accounting (`comm_stats.record`) lives in the
bodies: it counts what runs, and tracing neither drops it nor guards on the counters.

Eager and compiled code use the same ops, so there is one code path to keep exact. Groups
cross the op boundary by name (``ProcessGroup.group_name``), the way
``torch.distributed._functional_collectives`` passes them.

Ops (namespace ``hyena_cp``):

- ``all_to_all(x, group_name)``: equal-split AllToAll along dim 0 (`swap`).
- ``p2p_exchange(sends, send_peers, recv_peers, recv_shapes, recv_ndims, group_name)``: the
  halo exchange's sends and receives in one ``batch_isend_irecv`` (`p2p`); received shapes
  travel flattened (``recv_ndims`` splits them) because a schema has no nested int lists.
- ``agreement_token(values, group_name, what, names, hint, like)``: the cross-rank agreement
  check of a compiled call (`agreement`): all-gathers the signature ``values`` and raises the
  same ``ValueError`` on every rank on a mismatch; returns a zero that the caller adds to its
  input, so the check is ordered before, and never pruned from, the collectives that follow.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.distributed_c10d import _resolve_process_group

from .comm_stats import nbytes, record

__all__ = ["all_to_all", "p2p_exchange_op", "agreement_token", "group_name", "run_body"]


def group_name(group: ProcessGroup) -> str:
    """The name a custom op takes for ``group`` (resolved back inside the op's body)."""
    return group.group_name


# ---------------------------------------------------------------- AllToAll (equal splits, dim 0)

@torch.library.custom_op("hyena_cp::all_to_all", mutates_args=())
def all_to_all(x: Tensor, group_name: str) -> Tensor:
    """``out[src]`` here is ``x[this rank]`` on rank ``src`` (dim 0 holds the P blocks)."""
    return _all_to_all_body(x, group_name)


def _all_to_all_body(x: Tensor, group_name: str) -> Tensor:
    group = _resolve_process_group(group_name)
    world = group.size()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    record("all_to_all", nbytes(x) * (world - 1) // world)
    return out


@all_to_all.register_fake
def _(x: Tensor, group_name: str) -> Tensor:
    return torch.empty_like(x)


def _all_to_all_setup(ctx, inputs, output) -> None:
    ctx.group_name = inputs[1]


def _all_to_all_backward(ctx, grad: Tensor):
    # the equal-split AllToAll permutation is its own adjoint
    return all_to_all(grad.contiguous(), ctx.group_name), None


all_to_all.register_autograd(_all_to_all_backward, setup_context=_all_to_all_setup)


# ---------------------------------------------------------------- point-to-point exchange

def _split_shapes(flat: Sequence[int], ndims: Sequence[int]) -> list[list[int]]:
    shapes, start = [], 0
    for n in ndims:
        shapes.append(list(flat[start:start + n]))
        start += n
    return shapes


@torch.library.custom_op("hyena_cp::p2p_exchange", mutates_args=())
def p2p_exchange_op(sends: list[Tensor], send_peers: list[int], recv_peers: list[int], recv_shapes: list[int],
                    recv_ndims: list[int], group_name: str) -> list[Tensor]:
    """Post every send and receive at once, wait for all; returns the received tensors (dtype
    and device of ``sends[0]``), in the order of ``recv_peers``."""
    return _p2p_exchange_body(sends, send_peers, recv_peers, recv_shapes, recv_ndims, group_name)


def _p2p_exchange_body(sends, send_peers, recv_peers, recv_shapes, recv_ndims, group_name) -> list[Tensor]:
    group = _resolve_process_group(group_name)
    first = sends[0]
    recvs = [torch.empty(s, dtype=first.dtype, device=first.device) for s in _split_shapes(recv_shapes, recv_ndims)]
    sent = [t.contiguous() for t in sends]
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=p) for p, t in zip(send_peers, sent)]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=p) for p, t in zip(recv_peers, recvs)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    for t in sent:
        record("p2p", nbytes(t))
    return recvs


@p2p_exchange_op.register_fake
def _(sends, send_peers, recv_peers, recv_shapes, recv_ndims, group_name):
    first = sends[0]
    return [first.new_empty(s) for s in _split_shapes(recv_shapes, recv_ndims)]


def _p2p_setup(ctx, inputs, output) -> None:
    sends, send_peers, recv_peers, _, _, name = inputs
    ctx.send_peers, ctx.recv_peers, ctx.group_name = list(send_peers), list(recv_peers), name
    ctx.send_shapes = [list(t.shape) for t in sends]


def _p2p_backward(ctx, grads):
    # adjoint: each received tensor's gradient goes back to the rank it came from, where it
    # becomes the gradient of the tensor that rank sent
    grads = [g.contiguous() for g in grads]
    flat = [s for shape in ctx.send_shapes for s in shape]
    back = p2p_exchange_op(grads, ctx.recv_peers, ctx.send_peers, flat, [len(s) for s in ctx.send_shapes],
                           ctx.group_name)
    return list(back), None, None, None, None, None


p2p_exchange_op.register_autograd(_p2p_backward, setup_context=_p2p_setup)


# ---------------------------------------------------------------- agreement check (compiled calls)

@torch.library.custom_op("hyena_cp::agreement_token", mutates_args=())
def agreement_token(values: list[int], group_name: str, what: str, names: str, hint: str,
                    like: Tensor) -> Tensor:
    """Run `agreement.gather_and_compare` on the encoded ``values``; a 0-dim zero of ``like``'s
    dtype and device when the ranks agree (``names``: the field names joined by newlines; a
    schema has no string lists) (the caller adds it to ``like``; pass ``like``
    detached: the token carries no gradient, so the op needs no autograd formula)."""
    return _agreement_token_body(values, group_name, what, names, hint, like)


def _agreement_token_body(values, group_name, what, names, hint, like) -> Tensor:
    from .agreement import gather_and_compare  # agreement imports this module

    gather_and_compare(_resolve_process_group(group_name), what, names.split("\n"), list(values), hint)
    return like.new_zeros(())


@agreement_token.register_fake
def _(values, group_name, what, names, hint, like):
    return like.new_empty(())


_BODIES = {"all_to_all": _all_to_all_body, "p2p_exchange": _p2p_exchange_body,
           "agreement_token": _agreement_token_body}


def run_body(func, args: tuple, kwargs: dict | None = None):
    """Run the Python body of the ``hyena_cp`` op ``func`` (an ``OpOverload``) directly. For a
    ``TorchDispatchMode`` that must see the ``c10d`` ops inside (`bench.measure.CollectiveCounter`):
    a mode sees a custom op as one call, and is off while it handles it; re-entered (``with
    mode:``) around this, it sees what the body dispatches."""
    return _BODIES[func._opname](*args, **(kwargs or {}))
