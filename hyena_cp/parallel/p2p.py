"""Point-to-point exchange with an exact-adjoint backward: the primitive under the halos.

`p2p_exchange` sends some tensors to peers and receives others, in one
``dist.batch_isend_irecv``. Its adjoint sends each received tensor's gradient back to the
rank it came from, where it becomes the gradient of the tensor that rank sent. Slicing
the sent tensors out of a shard (and stacking the received ones into a halo) is ordinary
autograd, so halo gradients are ADDED into the owner's token gradients for free.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from .comm_stats import nbytes, record


def _exchange(
    group: ProcessGroup,
    sends: Sequence[tuple[int, Tensor]],
    recv_specs: Sequence[tuple[int, torch.Size]],
    dtype: torch.dtype,
    device: torch.device,
) -> list[Tensor]:
    """Post every send and receive at once, wait for all; returns the received tensors."""
    recvs = [torch.empty(shape, dtype=dtype, device=device) for _, shape in recv_specs]
    ops = [dist.P2POp(dist.isend, t.contiguous(), group=group, group_peer=p) for p, t in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=p) for (p, _), t in zip(recv_specs, recvs)]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for _, t in sends:
        record("p2p", nbytes(t))
    return recvs


class _Exchange(torch.autograd.Function):
    """Forward: `_exchange`. Backward: the reverse exchange of the gradients (its adjoint)."""

    @staticmethod
    def forward(ctx, group, send_peers, recv_peers, recv_shapes, dtype, device, *tensors):
        ctx.group, ctx.send_peers, ctx.recv_peers = group, send_peers, recv_peers
        ctx.send_shapes = [t.shape for t in tensors]
        ctx.dtype, ctx.device = dtype, device
        specs = list(zip(recv_peers, recv_shapes))
        return tuple(_exchange(group, list(zip(send_peers, tensors)), specs, dtype, device))

    @staticmethod
    def backward(ctx, *grads):
        specs = list(zip(ctx.send_peers, ctx.send_shapes))
        back = _exchange(ctx.group, list(zip(ctx.recv_peers, grads)), specs, ctx.dtype, ctx.device)
        return (None,) * 6 + tuple(back)


def p2p_exchange(
    sends: Sequence[tuple[int, Tensor]],
    recvs: Sequence[tuple[int, Sequence[int]]],
    group: ProcessGroup,
) -> list[Tensor]:
    """Send ``(peer, tensor)`` pairs and receive ``(peer, shape)`` tensors; autograd-exact.

    Peers are ranks within ``group``; each peer appears at most once in ``sends`` and at
    most once in ``recvs`` (messages are matched by peer), never this rank itself. Received
    tensors take the dtype/device of the first sent tensor. Returns the received tensors in
    the order of ``recvs``.

    Backward communicates too, and autograd only runs it on a rank through that rank's
    outputs: so a rank that takes part must both send and receive (true of every halo),
    and must backpropagate through what it received, as with any collective in backward.
    """
    me = group.rank()
    send_peers = [p for p, _ in sends]
    recv_peers = [p for p, _ in recvs]
    for kind, peers in (("send", send_peers), ("recv", recv_peers)):
        if len(set(peers)) != len(peers) or me in peers or not all(0 <= p < group.size() for p in peers):
            raise ValueError(
                f"p2p_exchange: {kind} peers {peers} must be distinct ranks of the group other than {me}"
            )
    if bool(sends) != bool(recvs):
        raise ValueError(
            "p2p_exchange: a rank must both send and receive, or neither (a pure sender has "
            "no output through which its backward could run)"
        )
    if not sends:
        return []
    first = sends[0][1]
    shapes = [torch.Size(s) for _, s in recvs]
    tensors = [t for _, t in sends]
    return list(_Exchange.apply(group, send_peers, recv_peers, shapes, first.dtype, first.device, *tensors))
