"""Hyena as the ``self_attention`` submodule of megatron-core's ``TransformerLayer``.

One line of a layer spec::

    submodules.self_attention = ModuleSpec(module=MegatronHyenaMixer,
                                           params={"hyena_config": HyenaMixerConfig(num_heads=4)})

The layer hands the mixer its pre-normed input ``[s_local, b, h]`` and adds the residual
itself. Under context parallelism ``s_local`` is this rank's shard of the sequence in
Megatron's zigzag layout (2P chunks, rank r holds chunks r and 2P-1-r: what
``get_batch_on_this_cp_rank`` produces and `hyena_cp.parallel.shard(..., "zigzag")` makes),
so Hyena and attention layers share one sharding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from einops import rearrange
from torch import nn

from hyena_cp.megatron.compat import MegatronModule, ProcessGroupCollection, TransformerConfig, resolve_cp_group
from hyena_cp.modules import Hyena, QKVSequenceMixer
from hyena_cp.parallel import group_size

__all__ = ["HyenaMixerConfig", "MegatronHyenaMixer"]

# Arguments TransformerLayer passes to self_attention that would change the result if Hyena
# ignored them; the others (masks, rotary embeddings, attention bias) concern attention.
_UNSUPPORTED_FORWARD_ARGS = ("inference_context", "inference_params", "packed_seq_params")


@dataclass(frozen=True)
class HyenaMixerConfig:
    """Hyena settings of a `MegatronHyenaMixer`, passed as ``ModuleSpec`` params
    (``params={"hyena_config": HyenaMixerConfig(...)}``); widths come from ``TransformerConfig``.

    Attributes:
        num_heads: long-filter groups (channels of a group share one filter); must divide
            ``hidden_size`` and be a multiple of the CP size (groups are never split).
        short_kernel_size: K of the causal depthwise conv on q, k, v (halo of K-1 tokens).
        filter_bands, filter_width, filter_depth, filter_sin_freq: implicit filter MLP
            (positional bands -> width x depth sine MLP -> one filter per head).
        max_len: longest global sequence; filter positions are normalised by it, so a model
            behaves the same at every length up to it. None: length-relative filters.
        norm: "layernorm", "rmsnorm" or None, on ``q * y`` before out_proj. Default None:
            the TransformerLayer already pre-norms the mixer input, as in the Hyena paper.
        bias: bias of in_proj, short conv and out_proj; None follows ``config.add_bias_linear``.
        cp_comm: "alltoall" (default, the communication floor) or "allgather" (baseline).
        short_conv_cp: "halo" (default) or "a2a" (comparison mode), see QKVSequenceMixer.
    """

    num_heads: int = 1
    short_kernel_size: int = 3
    filter_bands: int = 8
    filter_width: int = 64
    filter_depth: int = 2
    filter_sin_freq: float = 1.0
    max_len: int | None = None
    norm: str | None = None
    bias: bool | None = None
    cp_comm: Literal["alltoall", "allgather"] = "alltoall"
    short_conv_cp: Literal["halo", "a2a"] = "halo"


def _check_parallelism(config: TransformerConfig, pg_collection: ProcessGroupCollection | None,
                       cp_size: int, hyena_config: HyenaMixerConfig) -> None:
    """Raise at construction, on every rank, what Hyena cannot run."""
    tp_size = group_size(getattr(pg_collection, "tp", None)) if pg_collection is not None else 1
    if max(tp_size, config.tensor_model_parallel_size) > 1 or config.sequence_parallel:
        raise ValueError("MegatronHyenaMixer is not tensor/sequence parallel: set tensor_model_parallel_size=1 "
                         "and sequence_parallel=False (use context parallelism to split long sequences)")
    if config.context_parallel_size not in (1, cp_size):
        raise ValueError(f"config.context_parallel_size={config.context_parallel_size} differs from the CP group "
                         f"size {cp_size}; make them equal (or leave the config at 1 and pass the group)")
    if hyena_config.num_heads % cp_size or config.hidden_size % cp_size:
        raise ValueError(f"HyenaMixerConfig.num_heads={hyena_config.num_heads} and hidden_size={config.hidden_size} "
                         f"must be divisible by the context-parallel size {cp_size}")


class MegatronHyenaMixer(MegatronModule):
    """`QKVSequenceMixer` (1-D causal Hyena) behind megatron's self-attention interface.

    Args:
        config: the model's ``TransformerConfig`` (``hidden_size``, ``add_bias_linear``,
            ``init_method``/``output_layer_init_method``, ``params_dtype``).
        layer_number: 1-based layer index (megatron's convention; unused by Hyena).
        pg_collection: process groups; the CP group is ``pg_collection.cp`` when present,
            else ``parallel_state.get_context_parallel_group()`` when initialised, else one
            process. Fixed at construction.
        hyena_config: Hyena settings (see `HyenaMixerConfig`).
        cp_comm_type, pp_layer_offset, name: what ``TransformerLayer`` also passes to every
            ``self_attention`` (see `hyena_cp.megatron.compat`), accepted and not used: Hyena's
            CP communication is ``hyena_config.cp_comm``; pipeline offsets and module names
            do not change the mixer.

    in_proj/out_proj weights are initialised with ``config.init_method`` /
    ``config.output_layer_init_method`` and biases with zeros (as megatron's linear layers);
    the implicit filter and short conv keep `Hyena`'s own initialisation.
    """

    def __init__(self, config: TransformerConfig, layer_number: int = 1,
                 pg_collection: ProcessGroupCollection | None = None,
                 hyena_config: HyenaMixerConfig | None = None, cp_comm_type: str | None = None,
                 pp_layer_offset: int | None = None, name: str | None = None):
        super().__init__(config=config)
        hyena_config = HyenaMixerConfig() if hyena_config is None else hyena_config
        self.layer_number, self.hyena_config = layer_number, hyena_config
        self.cp_group = resolve_cp_group(pg_collection)
        _check_parallelism(config, pg_collection, group_size(self.cp_group), hyena_config)
        h, cfg = config.hidden_size, hyena_config
        hyena = Hyena(hidden_dim=h, num_heads=cfg.num_heads, spatial_dims=1, filter_bands=cfg.filter_bands,
                      filter_width=cfg.filter_width, filter_depth=cfg.filter_depth,
                      filter_sin_freq=cfg.filter_sin_freq, max_len=cfg.max_len, cp_comm=cfg.cp_comm)
        bias = config.add_bias_linear if cfg.bias is None else cfg.bias
        self.mixer = QKVSequenceMixer(hidden_dim=h, hyena=hyena, short_kernel_size=cfg.short_kernel_size,
                                      norm=cfg.norm, bias=bias, short_conv_cp=cfg.short_conv_cp)
        if config.perform_initialization:
            self._init_projections(config)
        self.mixer.to(dtype=config.params_dtype)

    @torch.no_grad()
    def _init_projections(self, config: TransformerConfig) -> None:
        config.init_method(self.mixer.in_proj.weight)
        config.output_layer_init_method(self.mixer.out_proj.weight)
        for proj in (self.mixer.in_proj, self.mixer.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        """Mix the local shard.

        Args:
            hidden_states: ``[s_local, b, h]``, this rank's zigzag shard of the (pre-normed)
                sequence; the whole sequence without CP.
            attention_mask: ignored: Hyena is causal by construction (the mask is for
                attention layers sharing the block).
            **kwargs: the rest of megatron's self-attention call (rotary embeddings,
                attention bias, ...), which varies between megatron-core versions and is
                ignored; a non-None ``inference_context`` or ``packed_seq_params`` raises.

        Returns:
            ``(output [s_local, b, h], None)``: no separate bias (it is added inside).
        """
        unsupported = sorted(k for k in _UNSUPPORTED_FORWARD_ARGS if kwargs.get(k) is not None)
        if unsupported:
            raise ValueError(f"MegatronHyenaMixer does not support {unsupported} (no KV-cache inference or "
                             f"packed sequences); pass None")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(f"hidden_states must be [s, b, h] with h=hidden_size={self.config.hidden_size}, "
                             f"got {tuple(hidden_states.shape)}")
        x = rearrange(hidden_states, "s b h -> b s h")
        y = self.mixer(x, cp_group=self.cp_group)
        return rearrange(y, "b s h -> s b h").contiguous(), None

    def flop_count(self, num_tokens: int, inference: bool = False) -> int:
        """FLOPs of the mixer for one sample of ``num_tokens`` GLOBAL tokens (see QKVSequenceMixer)."""
        return self.mixer.flop_count(num_tokens, inference=inference)
