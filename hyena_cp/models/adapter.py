"""ViT5HyenaAdapter: ViT-5's ``[B, T, C]`` token sequences <-> a 2-D mixer's ``[B, H, W, C]``.

Implements the API document of nvSubquadratic's ViT5HyenaAdapter to the letter: a parameter-free
reshape around an inner mixer; ``flop_count`` delegates; forward kwargs go through verbatim.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from hyena_cp.lazy import instantiate

__all__ = ["ViT5HyenaAdapter"]


class ViT5HyenaAdapter(nn.Module):
    """Reshape ``[B, T, C] -> [B, T // grid_w, grid_w, C]``, apply ``inner_mixer``, reshape back.

    Args:
        inner_mixer_cfg: LazyConfig of the 2-D mixer (e.g. ``QKVSequenceMixer`` wrapping a
            2-D ``Hyena``); it must map ``[B, H, W, C]`` to the same shape. An already-built
            ``nn.Module`` is accepted as well, because recursive ``instantiate`` of a config
            that contains this adapter builds nested configs before calling the constructor.
        grid_w: grid width; every ``forward`` needs ``T % grid_w == 0`` (else ``reshape``
            raises ``RuntimeError``). In a hierarchical network the network passes each
            stage's ``grid_w`` (it halves after every 2x2 patch merge).

    Register/CLS tokens and padding are ordinary grid positions here; the network lays
    them out (a register row at the bottom) and pads ``T`` to a multiple of ``grid_w``.
    """

    def __init__(self, inner_mixer_cfg, grid_w: int):
        super().__init__()
        self.grid_w = int(grid_w)
        mixer = inner_mixer_cfg if isinstance(inner_mixer_cfg, nn.Module) else instantiate(inner_mixer_cfg)
        self.inner_mixer: nn.Module = mixer

    def forward(self, x: torch.Tensor, **mixer_kwargs) -> torch.Tensor:
        """``x: [B, T, C]`` (under CP the rank-local ``[B, T_local, C]``) -> ``[B, T, C]``.
        ``mixer_kwargs`` (``conditioning``, ``cp_group``, ...) are forwarded verbatim."""
        if x.dim() != 3:
            raise ValueError(f"ViT5HyenaAdapter expects x of shape [B, T, C], got {tuple(x.shape)}")
        b, t, c = x.shape
        grid = x.reshape(b, t // self.grid_w, self.grid_w, c)  # B, H, W, C (a view when contiguous)
        out = self.inner_mixer(grid, **mixer_kwargs)
        return out.reshape(b, t, c)

    def flop_count(self, num_tokens: int, inference: bool = False) -> int:
        """FLOPs of the inner mixer for a ``(num_tokens // grid_w, grid_w)`` grid; the reshapes
        cost nothing. Raises ``AttributeError`` if the inner mixer has no ``flop_count``."""
        count = self.inner_mixer.flop_count
        # A 2-D mixer needs the grid shape; mixers whose flop_count takes no grid_w get the
        # plain (num_tokens, inference) protocol.
        if "grid_w" in inspect.signature(count).parameters:
            return count(num_tokens, inference=inference, grid_w=self.grid_w)
        return count(num_tokens, inference=inference)
