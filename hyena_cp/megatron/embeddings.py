"""Per-layer hidden states (embeddings) of sequences of ANY length, prefilled under context parallelism.

    out = hidden_states(model, ids, layers=(-1,), pooling="mean")   # every rank, the same result

The zigzag layout needs a length that is a multiple of 2P whose chunks hold every halo (the short
conv's K-1 and an explicit filter's K-1 tokens, `min_chunk`). A sequence of any other length is
padded at its END to the shortest such length (`padded_length`): the model is causal — Hyena's
convolutions and attention — so no real token sees a padded one, and the hidden states of the real
tokens equal a one-process run on the unpadded sequence exactly (the tests hold this to float64
round-off). The padding is dropped before pooling: a mean runs over real tokens only.

Layers: 0 is the embedding output, ``i`` in 1..num_layers the output of layer ``i`` (megatron's
1-based numbering), ``-1`` the final norm's output (what the output layer reads). Read with forward
hooks on the model's own modules, so the states are those of `HyenaLanguageModel.forward` itself.
Hidden states are replicated over TP; over CP each rank's zigzag shard is all-gathered and put back
in natural order (`hyena_cp.parallel`), so every rank returns the whole result.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from hyena_cp.megatron.specs import ATTENTION
from hyena_cp.parallel import all_gather_seq, from_rank_major, group_rank, group_size, shard

if TYPE_CHECKING:
    from hyena_cp.megatron.model import HyenaLanguageModel

__all__ = ["POOLINGS", "hidden_states", "min_chunk", "padded_length"]

POOLINGS = ("none", "mean", "last")


def min_chunk(model: HyenaLanguageModel) -> int:
    """The fewest tokens a zigzag chunk may hold: the longest halo of any Hyena layer."""
    halo = 0
    for symbol, layer in zip(model.layer_pattern, model.decoder.layers):
        if symbol != ATTENTION:
            mixer = layer.self_attention.mixer
            halo = max(halo, (mixer.short_kernel_size or 1) - 1, (mixer.hyena.fir_length or 1) - 1)
    return halo


def padded_length(model: HyenaLanguageModel, length: int) -> int:
    """The shortest length >= ``length`` that the model's CP group can shard: a multiple of 2P with
    chunks of at least `min_chunk` tokens (``length`` itself in one process)."""
    world = group_size(model.cp_group)
    if world == 1:
        return length
    parts = 2 * world
    return max(-(-length // parts), min_chunk(model)) * parts


def _check(model: HyenaLanguageModel, ids: Tensor, layers: Sequence[int], pooling: str) -> None:
    if ids.dim() != 2 or ids.dtype != torch.long or 0 in ids.shape:
        raise ValueError(f"input_ids must be a non-empty LongTensor [b, L] (GLOBAL sequences, the same on every "
                         f"rank), got {ids.dtype} {tuple(ids.shape)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} must be one of {POOLINGS}")
    count = len(model.decoder.layers)
    bad = [i for i in layers if not -1 <= i <= count]
    if bad or not layers:
        raise ValueError(f"layers={list(layers)} must be among 0 (embedding), 1..{count} (layer outputs) and -1 "
                         f"(final norm)")
    length = padded_length(model, ids.shape[1])
    if length > model.max_sequence_length:
        raise ValueError(f"sequence length {ids.shape[1]} (padded to {length} for cp_size="
                         f"{group_size(model.cp_group)}) exceeds the model's max_sequence_length="
                         f"{model.max_sequence_length}")


def _modules(model: HyenaLanguageModel, layers: Sequence[int]) -> dict[int, torch.nn.Module]:
    return {i: model.embedding if i == 0 else model.decoder.final_layernorm if i == -1 else model.decoder.layers[i - 1]
            for i in layers}


@torch.no_grad()
def hidden_states(model: HyenaLanguageModel, input_ids: Tensor, layers: Sequence[int] = (-1,),
                  pooling: str = "none") -> dict[int, Tensor]:
    """``{layer: states}`` of the GLOBAL sequences ``input_ids [b, L]`` (any L, the same on every rank):
    ``[b, L, h]`` per token (``pooling="none"``), or ``[b, h]`` — the mean over the L tokens or the last
    token's. Runs the model in eval mode under its CP/TP groups; every rank gets the same result."""
    _check(model, input_ids, layers, pooling)
    world, length = group_size(model.cp_group), input_ids.shape[1]
    padded = F.pad(input_ids, (0, padded_length(model, length) - length))  # at the end: causal, never read
    local = shard(padded, 1, "zigzag", world, group_rank(model.cp_group)) if world > 1 else padded
    captured: dict[int, Tensor] = {}

    def keep(index: int):
        def hook(module, args, output):
            # detached: megatron's layers hand out viewless tensors that may still require grad
            captured[index] = (output[0] if isinstance(output, tuple) else output).detach()  # s_local, b, h
        return hook

    was_training = model.training
    model.eval()
    handles = [module.register_forward_hook(keep(i)) for i, module in _modules(model, layers).items()]
    try:
        model(local)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    out = {}
    for i in layers:
        states = captured[i]  # s_local, b, h (zigzag shard)
        if world > 1:
            states = from_rank_major(all_gather_seq(states.contiguous(), 0, model.cp_group), 0, "zigzag", world)
        states = states[:length].transpose(0, 1)  # b, L, h: the padding dropped
        out[i] = states if pooling == "none" else states.mean(1) if pooling == "mean" else states[:, -1]
    return out
