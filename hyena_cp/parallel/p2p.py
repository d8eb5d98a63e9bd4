"""Point-to-point exchange with an exact-adjoint backward: the primitive under the halos.

`p2p_exchange` sends some tensors to peers and receives others, in one
``dist.batch_isend_irecv`` inside the ``hyena_cp::p2p_exchange`` custom op (`traceable`: so
``torch.compile`` traces through the halos). Its adjoint sends each received tensor's gradient back to the
rank it came from, where it becomes the gradient of the tensor that rank sent. Slicing
the sent tensors out of a shard (and stacking the received ones into a halo) is ordinary
autograd, so halo gradients are ADDED into the owner's token gradients for free.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torch.distributed import ProcessGroup

from .traceable import group_name, p2p_exchange_op


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
    shapes = [list(s) for _, s in recvs]
    flat = [n for shape in shapes for n in shape]
    return p2p_exchange_op([t for _, t in sends], send_peers, recv_peers, flat, [len(s) for s in shapes],
                           group_name(group))
