"""Hyena as the ``self_attention`` submodule of megatron-core's ``TransformerLayer``.

One line of a layer spec::

    submodules.self_attention = ModuleSpec(module=MegatronHyenaMixer,
                                           params={"hyena_config": HyenaMixerConfig(num_heads=4)})

The layer hands the mixer its pre-normed input ``[s_local, b, h]`` and adds the residual
itself. Under context parallelism ``s_local`` is this rank's shard of the sequence in
Megatron's zigzag layout (2P chunks, rank r holds chunks r and 2P-1-r: what
``get_batch_on_this_cp_rank`` produces and `hyena_cp.parallel.shard(..., "zigzag")` makes),
so Hyena and attention layers share one sharding.

Tensor parallelism (TP group from ``pg_collection.tp``, else ``parallel_state``): in_proj is
megatron's ``ColumnParallelLinear(stride=3, gather_output=False)`` and out_proj its
``RowParallelLinear(input_is_parallel=True)``. The full in_proj weight is ``[q; k; v]``
(3C x C, the single-process layout); with stride 3 megatron cuts it into 3T blocks of C/T
rows and TP rank t holds ``[q_t; k_t; v_t]`` — the same q, k and v channels, so the rank
runs Hyena on its C/T channels with no communication until out_proj's all-reduce. The
short-conv weights (same strided layout), the skip ``D`` and the optional norm's weights
(contiguous) of those channels are TP-sharded too and carry megatron's TP attributes (``tensor_model_parallel``,
``partition_dim``, ``partition_stride``), so `hyena_cp.parallel.shard_tp`/`unshard_tp` map
every parameter between the full model and a TP rank; the implicit filter is replicated
(see `hyena_cp.modules.hyena`). Under CP the AllToAll then moves those C/T channels inside
the CP group: each rank convolves C/(T*P). Every parameter is initialised for the full
width and then cut, so one seed gives the same full model at every TP size.
Sequence parallelism is refused: megatron-core's SP gather allocates on CUDA.

Packed sequences: megatron's ``packed_seq_params`` (``cu_seqlens_q``: GLOBAL document
boundaries over the b rows laid end to end, the whole sequence zigzag-sharded over CP; see
`hyena_cp.megatron.packing` for the layout and why) reaches the mixer through
``TransformerLayer``; the short conv and the long conv then stop at every document start
(`QKVSequenceMixer`), so a packed document equals that document run alone. That needs filters
with absolute positions (``HyenaMixerConfig.max_len``); with ``max_len=None`` packing is refused.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from einops import rearrange
from torch import nn

from hyena_cp.megatron.compat import (ColumnParallelLinear, MegatronModule, ProcessGroupCollection, RowParallelLinear,
                                      TransformerConfig, resolve_cp_group, resolve_tp_group,
                                      set_tensor_model_parallel_attributes)
from hyena_cp.megatron.packing import cu_seqlens_from
from hyena_cp.megatron.sharded_state import tp_sharded_state_dict
from hyena_cp.modules import Hyena, QKVSequenceMixer
from hyena_cp.ops.explicit import ExplicitFilter
from hyena_cp.ops.modal import ModalFilter
from hyena_cp.ops.safari import SafariFilter
from hyena_cp.parallel import group_size

__all__ = ["FILTERS", "HyenaMixerConfig", "MegatronHyenaMixer", "build_hyena"]

# Arguments TransformerLayer passes to self_attention that would change the result if Hyena
# ignored them; the others (masks, rotary embeddings, attention bias) concern attention.
# (packed_seq_params is one too, and is supported.)
_UNSUPPORTED_FORWARD_ARGS = ("inference_context", "inference_params")


def _default_of(cls: type, name: str) -> Any:
    """The default of ``cls``'s constructor argument ``name``: declared there only, so a changed
    default of `Hyena` or `QKVSequenceMixer` is the megatron mixer's too."""
    return inspect.signature(cls).parameters[name].default


_hyena, _mixer = functools.partial(_default_of, Hyena), functools.partial(_default_of, QKVSequenceMixer)


@dataclass(frozen=True)
class HyenaMixerConfig:
    """Hyena settings of a `MegatronHyenaMixer`, passed as ``ModuleSpec`` params
    (``params={"hyena_config": HyenaMixerConfig(...)}``); widths come from ``TransformerConfig``.

    Attributes:
        num_heads: long-filter groups (channels of a group share one filter); must divide
            ``hidden_size`` and be a multiple of TP size x CP size (groups are never split; an
            explicit filter is not split by CP at all: a multiple of the TP size suffices).
        short_kernel_size: K of the causal depthwise conv on q, k, v (halo of K-1 tokens).
        filter: the long filter's generator: ``"fourier"`` (the original Hyena's, from the
            ``filter_*`` fields and ``max_len``, with Hyena's exponential window), ``"explicit"``
            (`ExplicitFilter`: free taps, a direct conv with a halo of K-1 under CP: StripedHyena
            2's SE and MR), ``"modal"`` (`ModalFilter`: StripedHyena 2's LI) or ``"safari"``
            (`SafariFilter`: HyenaDNA's). The last three own their windows.
        filter_options: keyword arguments of that generator's class, e.g. ``{"length": 7}``
            (explicit), ``{"state_size": 16}`` (modal), ``{"l_max": 1026, "emb_dim": 5}`` (safari);
            an unknown key raises when the layer is built. Unused with "fourier".
        filter_bands, filter_width, filter_depth, filter_sin_freq: the "fourier" filter's MLP
            (positional bands -> width x depth sine MLP -> one filter per head).
        max_len: "fourier" only: longest global sequence; filter positions are normalised by it,
            so a model behaves the same at every length up to it. None: length-relative filters, which
            packed sequences (``packed_seq_params``) refuse: a document would not see its own filter.
        skip: the per-channel skip ``D z`` (StripedHyena 2's SE has none).
        norm: "layernorm", "rmsnorm" or None, on ``q * y`` before out_proj. Default None:
            the TransformerLayer already pre-norms the mixer input, as in the Hyena paper.
            Under TP its statistics are summed over the TP group (`hyena_cp.modules.norm`).
        bias: bias of in_proj, short conv and out_proj; None follows ``config.add_bias_linear``.
        in_proj_bias, short_conv_bias, out_proj_bias: override ``bias`` one by one (Evo 2: only
            out_proj has one).
        cp_comm: "alltoall" (default, the communication floor) or "allgather" (baseline).
        short_conv_cp: "halo" (default) or "a2a" (comparison mode), see QKVSequenceMixer.
        check_agreement: "always" (default) or "off": the CP ranks compare their shard shapes
            and ``cu_seqlens`` before the mixer's first collective (see QKVSequenceMixer).

    The defaults of the fields that `Hyena` and `QKVSequenceMixer` also take are read from their
    constructors; only ``filter`` (a name here), ``norm`` and ``bias`` differ, for the reasons above.
    """

    num_heads: int = _hyena("num_heads")
    short_kernel_size: int = _mixer("short_kernel_size")
    filter: Literal["fourier", "explicit", "modal", "safari"] = "fourier"
    filter_options: Mapping[str, Any] = field(default_factory=dict)
    filter_bands: int = _hyena("filter_bands")
    filter_width: int = _hyena("filter_width")
    filter_depth: int = _hyena("filter_depth")
    filter_sin_freq: float = _hyena("filter_sin_freq")
    max_len: int | None = _hyena("max_len")
    skip: bool = _hyena("skip")
    norm: str | None = None  # the TransformerLayer pre-norms
    bias: bool | None = None  # follows config.add_bias_linear
    in_proj_bias: bool | None = _mixer("in_proj_bias")
    short_conv_bias: bool | None = _mixer("short_conv_bias")
    out_proj_bias: bool | None = _mixer("out_proj_bias")
    cp_comm: Literal["alltoall", "allgather"] = _hyena("cp_comm")
    short_conv_cp: Literal["halo", "a2a"] = _mixer("short_conv_cp")
    check_agreement: Literal["always", "off"] = _mixer("check_agreement")


def _check_parallelism(config: TransformerConfig, tp_size: int, cp_size: int, hyena_config: HyenaMixerConfig) -> None:
    """Raise at construction, on every rank, what Hyena cannot run."""
    if config.sequence_parallel:
        raise ValueError("MegatronHyenaMixer does not support sequence_parallel=True (megatron-core's sequence-parallel "
                         "gather allocates on CUDA, untested here); set sequence_parallel=False and use context "
                         "parallelism to split long sequences")
    if config.tensor_model_parallel_size not in (1, tp_size):
        raise ValueError(f"config.tensor_model_parallel_size={config.tensor_model_parallel_size} differs from the TP "
                         f"group size {tp_size}; make them equal (or leave the config at 1 and pass the group)")
    if config.context_parallel_size not in (1, cp_size):
        raise ValueError(f"config.context_parallel_size={config.context_parallel_size} differs from the CP group "
                         f"size {cp_size}; make them equal (or leave the config at 1 and pass the group)")
    if hyena_config.filter not in FILTERS:
        raise ValueError(f"HyenaMixerConfig.filter={hyena_config.filter!r} must be one of {sorted(FILTERS)}")
    # an explicit filter never crosses CP ranks with its channels (a halo, not an AllToAll)
    ranks = tp_size * (1 if hyena_config.filter == "explicit" and hyena_config.short_conv_cp == "halo" else cp_size)
    if hyena_config.num_heads % ranks or config.hidden_size % ranks:
        raise ValueError(f"HyenaMixerConfig.num_heads={hyena_config.num_heads} and hidden_size={config.hidden_size} "
                         f"must be divisible by tensor-parallel size x context-parallel size = {tp_size}x{cp_size}")


FILTERS = {"fourier": None, "explicit": ExplicitFilter, "modal": ModalFilter, "safari": SafariFilter}


def build_hyena(config: TransformerConfig, cfg: HyenaMixerConfig, tp_group) -> Hyena:
    """The `Hyena` operator of a layer: the "fourier" filter from the ``filter_*`` fields, or another
    generator class from ``filter_options`` (windowless: those own their windows)."""
    common = dict(hidden_dim=config.hidden_size, num_heads=cfg.num_heads, spatial_dims=1, skip=cfg.skip,
                  cp_comm=cfg.cp_comm, tp_group=tp_group)
    if cfg.filter == "fourier":
        if cfg.filter_options:
            raise ValueError(f"HyenaMixerConfig.filter_options={dict(cfg.filter_options)} is for the 'explicit', "
                             f"'modal' and 'safari' filters; the 'fourier' filter takes the filter_* fields")
        return Hyena(filter_bands=cfg.filter_bands, filter_width=cfg.filter_width, filter_depth=cfg.filter_depth,
                     filter_sin_freq=cfg.filter_sin_freq, max_len=cfg.max_len, **common)
    if cfg.max_len is not None:
        raise ValueError(f"HyenaMixerConfig.max_len is the 'fourier' filter's; the {cfg.filter!r} filter's length "
                         f"settings go in filter_options")
    return Hyena(filter=functools.partial(FILTERS[cfg.filter], **dict(cfg.filter_options)), mask=None, **common)


def _plain_linear(in_features: int, out_features: int, bias: bool, init_method, config: TransformerConfig) -> nn.Linear:
    """``nn.Linear`` initialised exactly as megatron's parallel linears on CPU: one float32 draw
    of the full weight with ``init_method``, zero bias (so the same seed gives the same weights)."""
    linear = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias)
    if config.perform_initialization:
        with torch.no_grad():
            master = torch.empty(out_features, in_features, dtype=torch.float32)
            init_method(master)
            linear.weight.copy_(master)
            if bias:
                linear.bias.zero_()
    return linear


def _projections(config: TransformerConfig, tp_group, in_bias: bool, out_bias: bool) -> tuple[nn.Module, nn.Module]:
    """in_proj (C -> [q_t; k_t; v_t]) and out_proj (C/T -> C): megatron's TP linears, or plain
    ``nn.Linear`` when there is no process group at all (megatron's linears need one)."""
    h = config.hidden_size
    if tp_group is None:
        return (_plain_linear(h, 3 * h, in_bias, config.init_method, config),
                _plain_linear(h, h, out_bias, config.output_layer_init_method, config))
    in_proj = ColumnParallelLinear(h, 3 * h, config=config, init_method=config.init_method, bias=in_bias,
                                   gather_output=False, stride=3, skip_bias_add=False, tp_group=tp_group)
    out_proj = RowParallelLinear(h, h, config=config, init_method=config.output_layer_init_method, bias=out_bias,
                                 input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
    return in_proj, out_proj


class MegatronHyenaMixer(MegatronModule):
    """`QKVSequenceMixer` (1-D causal Hyena) behind megatron's self-attention interface.

    Args:
        config: the model's ``TransformerConfig`` (``hidden_size``, ``add_bias_linear``,
            ``init_method``/``output_layer_init_method``, ``params_dtype``).
        layer_number: 1-based layer index (megatron's convention; unused by Hyena).
        pg_collection: process groups; the CP group is ``pg_collection.cp`` when present,
            else ``parallel_state.get_context_parallel_group()`` when initialised, else one
            process; the TP group likewise (``pg_collection.tp``). Fixed at construction.
        hyena_config: Hyena settings (see `HyenaMixerConfig`).
        cp_comm_type, pp_layer_offset, name: what ``TransformerLayer`` also passes to every
            ``self_attention`` (see `hyena_cp.megatron.compat`), accepted and not used: Hyena's
            CP communication is ``hyena_config.cp_comm``; pipeline offsets and module names
            do not change the mixer.

    in_proj/out_proj weights are initialised with ``config.init_method`` /
    ``config.output_layer_init_method`` and biases with zeros (megatron's linear layers);
    the implicit filter and short conv keep `Hyena`'s own initialisation. Without any
    process group (no ``pg_collection.tp``, no ``parallel_state``) the projections are plain
    ``nn.Linear`` with the same parameter names and initialisation.
    """

    def __init__(self, config: TransformerConfig, layer_number: int = 1,
                 pg_collection: ProcessGroupCollection | None = None,
                 hyena_config: HyenaMixerConfig | None = None, cp_comm_type: str | None = None,
                 pp_layer_offset: int | None = None, name: str | None = None):
        super().__init__(config=config)
        hyena_config = HyenaMixerConfig() if hyena_config is None else hyena_config
        self.layer_number, self.hyena_config = layer_number, hyena_config
        self.cp_group, self.tp_group = resolve_cp_group(pg_collection), resolve_tp_group(pg_collection)
        _check_parallelism(config, group_size(self.tp_group), group_size(self.cp_group), hyena_config)
        h, cfg = config.hidden_size, hyena_config
        hyena = build_hyena(config, cfg, self.tp_group)
        bias = config.add_bias_linear if cfg.bias is None else cfg.bias
        pick = lambda own: bias if own is None else own  # noqa: E731
        in_proj, out_proj = _projections(config, self.tp_group, pick(cfg.in_proj_bias), pick(cfg.out_proj_bias))
        self.mixer = QKVSequenceMixer(hidden_dim=h, hyena=hyena, short_kernel_size=cfg.short_kernel_size,
                                      norm=cfg.norm, bias=bias, short_conv_bias=pick(cfg.short_conv_bias),
                                      short_conv_cp=cfg.short_conv_cp, in_proj=in_proj, out_proj=out_proj,
                                      check_agreement=cfg.check_agreement)
        if self.tp_group is not None:
            self._mark_tp_sharded()
        self.mixer.to(dtype=config.params_dtype)
        self.inference_cache = None  # set during generation only: a `hyena_cp.modules.inference.HyenaCache`

    def _mark_tp_sharded(self) -> None:
        """megatron's TP attributes on the mixer's own per-channel parameters (the linears set theirs)."""
        conv, norm = self.mixer.short_conv, self.mixer.norm
        tp_norm = group_size(self.tp_group) > 1 and not isinstance(norm, nn.Identity)  # else a replica
        params = [(conv.weight, 3), (conv.bias, 3), (self.mixer.hyena.skip, 1)]
        params += [(norm.weight, 1), (norm.bias, 1)] if tp_norm else []
        for param, stride in params:
            if param is not None:
                set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=stride)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """megatron ``dist_checkpointing`` state with true global offsets: the stride-3 in_proj and
        short conv as ``[3, C, ...]`` views split on their channel axis, ``D`` and the norm split
        by channel, out_proj by input channel, the filter replicated
        (`hyena_cp.megatron.sharded_state`). Needs the TP group this mixer was built with."""
        if self.tp_group is None:
            raise ValueError("MegatronHyenaMixer.sharded_state_dict needs a tensor-parallel group (its layout on "
                             "disk is megatron's): build the mixer with pg_collection.tp or after "
                             "parallel_state.initialize_model_parallel(...)")
        return tp_sharded_state_dict(self.mixer, f"{prefix}mixer.", self.tp_group, sharded_offsets, metadata)

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
                ignored, except ``packed_seq_params`` (packed documents, see the module
                docstring); a non-None ``inference_context`` raises.

        Returns:
            ``(output [s_local, b, h], None)``: no separate bias (it is added inside).
        """
        unsupported = sorted(k for k in _UNSUPPORTED_FORWARD_ARGS if kwargs.get(k) is not None)
        if unsupported:
            raise ValueError(f"MegatronHyenaMixer does not support {unsupported} (no KV-cache inference); pass None")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(f"hidden_states must be [s, b, h] with h=hidden_size={self.config.hidden_size}, "
                             f"got {tuple(hidden_states.shape)}")
        cu_seqlens = cu_seqlens_from(kwargs.get("packed_seq_params"), where="MegatronHyenaMixer",
                                     cp_size=group_size(self.cp_group), batch=hidden_states.shape[1], allow_thd=True)
        x = rearrange(hidden_states, "s b h -> b s h")
        if self.inference_cache is not None:  # generation: prefill of the prompt, or one decode step
            if cu_seqlens is not None:
                raise ValueError("generation does not take packed sequences (packed_seq_params): prompts are one "
                                 "document per row; pass packed_seq_params=None")
            y = self.inference_cache(x)
        else:
            y = self.mixer(x, cp_group=self.cp_group, cu_seqlens=cu_seqlens)
        return rearrange(y, "b s h -> s b h").contiguous(), None

    def flop_count(self, num_tokens: int, inference: bool = False) -> int:
        """FLOPs of the mixer for one sample of ``num_tokens`` GLOBAL tokens (see QKVSequenceMixer)."""
        return self.mixer.flop_count(num_tokens, inference=inference)
