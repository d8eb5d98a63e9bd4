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
- ``all_to_all_uneven(x, send_counts, recv_counts, group_name)``: forward only, under
  `redistribute`'s autograd.Function.
- ``p2p_exchange(sends, send_peers, recv_peers, recv_shapes, recv_ndims, group_name)``: the
  halo exchange's sends and receives in one ``batch_isend_irecv`` (`p2p`); received shapes
  travel flattened (``recv_ndims`` splits them) because a schema has no nested int lists.
- ``all_reduce_sum``, ``all_gather``, ``reduce_scatter`` (dim 0), ``broadcast``, ``reduce_sum``:
  forward-only, inside the autograd.Functions of `reductions` (dynamo traces those).
- ``all_reduce_max``: forward-only, for values no gradient flows through (`reductions.group_max`).
- ``agreement_token(values, group_name, what, names, hint, like)``: the cross-rank agreement
  check of a compiled call (`agreement`): all-gathers the signature ``values`` and raises the
  same ``ValueError`` on every rank on a mismatch; returns a zero that the caller adds to its
  input, so the check is ordered before, and never pruned from, the collectives that follow.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.distributed_c10d import _resolve_process_group

from .c10d import all_gather_tensor, reduce_scatter_tensor
from .comm_stats import nbytes, record
from .signature import gather_and_compare

__all__ = ["all_to_all", "all_to_all_uneven_op", "p2p_exchange_op", "agreement_token", "all_reduce_sum_op",
           "all_reduce_max_op", "all_gather_op",
           "reduce_scatter_op", "broadcast_op", "reduce_sum_op", "group_name", "run_body"]



_BODIES: dict[str, Callable] = {}  # op name -> its Python body (see `run_body`)


def _collective(name: str) -> Callable[[Callable], Any]:
    """Register ``body`` as the custom op ``hyena_cp::<name>`` (schema from its annotations) and
    keep the plain function for `run_body`."""
    def register(body: Callable):
        _BODIES[name] = body
        return torch.library.custom_op(f"hyena_cp::{name}", mutates_args=())(body)
    return register


def group_name(group: ProcessGroup) -> str:
    """The name a custom op takes for ``group`` (resolved back inside the op's body)."""
    return group.group_name


# ---------------------------------------------------------------- AllToAll (equal splits, dim 0)

@_collective("all_to_all")
def all_to_all(x: Tensor, group_name: str) -> Tensor:
    """``out[src]`` here is ``x[this rank]`` on rank ``src`` (dim 0 holds the P blocks)."""
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


@_collective("all_to_all_uneven")
def all_to_all_uneven_op(x: Tensor, send_counts: list[int], recv_counts: list[int], group_name: str) -> Tensor:
    """``x: [sum(send_counts), ...]``; rows ``send_counts[q]`` go to rank q (in rank order), and
    ``recv_counts[q]`` rows come from it (`redistribute`, which registers the adjoint)."""
    group = _resolve_process_group(group_name)
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), list(recv_counts), list(send_counts), group=group)
    row = nbytes(x) // max(x.shape[0], 1)
    record("all_to_all", row * (sum(send_counts) - send_counts[group.rank()]))
    return out


@all_to_all_uneven_op.register_fake
def _(x, send_counts, recv_counts, group_name):
    return x.new_empty((sum(recv_counts), *x.shape[1:]))


# ---------------------------------------------------------------- point-to-point exchange

def _split_shapes(flat: Sequence[int], ndims: Sequence[int]) -> list[list[int]]:
    shapes, start = [], 0
    for n in ndims:
        shapes.append(list(flat[start:start + n]))
        start += n
    return shapes


@_collective("p2p_exchange")
def p2p_exchange_op(sends: list[Tensor], send_peers: list[int], recv_peers: list[int], recv_shapes: list[int],
                    recv_ndims: list[int], group_name: str) -> list[Tensor]:
    """Post every send and receive at once, wait for all; returns the received tensors (dtype
    and device of ``sends[0]``), in the order of ``recv_peers``."""
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


# ---------------------------------------------------------------- reductions (`reductions`)
# Forward-only ops: `reductions` wraps them in autograd.Functions (dynamo traces those, forward
# and backward), whose adjoints are other collectives of this list.

def _all_reduce(x: Tensor, group_name: str, op: dist.ReduceOp) -> Tensor:
    group = _resolve_process_group(group_name)
    out = x.contiguous().clone()
    dist.all_reduce(out, op=op, group=group)
    world = group.size()
    record("all_reduce", 2 * (world - 1) * nbytes(out) // world)  # a ring all-reduce's bytes per rank
    return out


@_collective("all_reduce_sum")
def all_reduce_sum_op(x: Tensor, group_name: str) -> Tensor:
    """Sum of ``x`` over the group, on every rank (a new tensor)."""
    return _all_reduce(x, group_name, dist.ReduceOp.SUM)


@_collective("all_reduce_max")
def all_reduce_max_op(x: Tensor, group_name: str) -> Tensor:
    """Elementwise maximum of ``x`` over the group, on every rank (a new tensor)."""
    return _all_reduce(x, group_name, dist.ReduceOp.MAX)


@_collective("all_gather")
def all_gather_op(x: Tensor, group_name: str) -> Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order."""
    group = _resolve_process_group(group_name)
    world = group.size()
    piece = x.contiguous()
    out = piece.new_empty((world * piece.shape[0], *piece.shape[1:]))
    all_gather_tensor(out, piece, group=group)
    record("all_gather", (world - 1) * nbytes(piece))
    return out


@_collective("reduce_scatter")
def reduce_scatter_op(x: Tensor, group_name: str) -> Tensor:
    """This rank's block (along dim 0) of the sum over ranks of ``x``."""
    group = _resolve_process_group(group_name)
    world = group.size()
    full = x.contiguous()
    out = full.new_empty((full.shape[0] // world, *full.shape[1:]))
    reduce_scatter_tensor(out, full, op=dist.ReduceOp.SUM, group=group)
    record("reduce_scatter", (world - 1) * nbytes(out))
    return out


@_collective("broadcast")
def broadcast_op(x: Tensor, src: int, group_name: str) -> Tensor:
    """``x`` of group rank ``src``, on every rank (a new tensor)."""
    group = _resolve_process_group(group_name)
    out = x.contiguous().clone()
    dist.broadcast(out, group=group, group_src=src)
    record("broadcast", (group.size() - 1) * nbytes(out) if group.rank() == src else 0)
    return out


@_collective("reduce_sum")
def reduce_sum_op(x: Tensor, dst: int, group_name: str) -> Tensor:
    """The sum over ranks of ``x`` on group rank ``dst``; zeros elsewhere."""
    group = _resolve_process_group(group_name)
    out = x.contiguous().clone()
    dist.reduce(out, group=group, group_dst=dst, op=dist.ReduceOp.SUM)
    is_dst = group.rank() == dst
    record("reduce", 0 if is_dst else nbytes(out))
    return out if is_dst else torch.zeros_like(out)


def _like_fake(x: Tensor, *_) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _gather_fake(x: Tensor, group_name: str) -> Tensor:
    world = _resolve_process_group(group_name).size()
    return x.new_empty((world * x.shape[0], *x.shape[1:]))


def _scatter_fake(x: Tensor, group_name: str) -> Tensor:
    world = _resolve_process_group(group_name).size()
    return x.new_empty((x.shape[0] // world, *x.shape[1:]))


for _op in (all_reduce_sum_op, all_reduce_max_op, broadcast_op, reduce_sum_op):
    _op.register_fake(_like_fake)
all_gather_op.register_fake(_gather_fake)
reduce_scatter_op.register_fake(_scatter_fake)


# ---------------------------------------------------------------- agreement check (compiled calls)

@_collective("agreement_token")
def agreement_token(values: list[int], group_name: str, what: str, names: str, hint: str,
                    like: Tensor) -> Tensor:
    """Run `signature.gather_and_compare` on the encoded ``values`` (``names``: the field names
    joined by newlines, as a schema has no string lists). Returns a 0-dim zero of ``like``'s
    dtype and device when the ranks agree, for the caller to add to ``like``; pass ``like``
    detached: the token carries no gradient, so the op needs no autograd formula."""
    gather_and_compare(_resolve_process_group(group_name), what, names.split("\n"), list(values), hint)
    return like.new_zeros(())


@agreement_token.register_fake
def _(values, group_name, what, names, hint, like):
    return like.new_empty(())


def run_body(func, args: tuple, kwargs: dict | None = None):
    """Run the Python body of the ``hyena_cp`` op ``func`` (an ``OpOverload``) directly. For a
    ``TorchDispatchMode`` that must see the ``c10d`` ops inside (`bench.measure.CollectiveCounter`):
    a mode sees a custom op as one call, and is off while it handles it; re-entered (``with
    mode:``) around this, it sees what the body dispatches."""
    return _BODIES[func._opname](*args, **(kwargs or {}))
