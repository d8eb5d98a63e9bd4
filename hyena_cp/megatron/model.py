"""A causal Hyena language model on megatron-core: embedding -> ``TransformerBlock`` (Hyena
or hybrid Hyena/attention layers, final norm) -> output layer.

Context parallelism: each rank of the CP group holds its zigzag shard of every sequence
(`hyena_cp.parallel.shard(tokens, 1, "zigzag", P, rank)`, the same layout as megatron's
``get_batch_on_this_cp_rank``), for ``input_ids`` and ``labels`` alike — shift the labels
(``labels[t] = tokens[t + 1]``) on the GLOBAL sequence before sharding. Per-token losses
come back in the same layout. Hyena and attention layers share this sharding (attention
gathers K/V over CP, `hyena_cp.megatron.attention`).

Tensor parallelism (megatron's): the embedding and the output layer split the vocabulary,
attention splits heads, the MLP its hidden width; activations between layers are replicated
over TP. Per-token losses come from megatron's ``vocab_parallel_cross_entropy`` on the
vocab-sharded logits (float32, equal on every TP rank); logits returned without labels are
gathered over TP. Sequence parallelism is refused: megatron-core's SP gather allocates on CUDA.

Gradient invariant: with ``loss_share = per_token_loss.sum() / global_token_count`` on every
rank, parameter gradients SUMMED over the CP group equal the single-process gradients; TP
ranks hold equal gradients of replicated parameters and exact slices (megatron's partition
attributes, `hyena_cp.parallel.tp_partition`) of the full gradient of sharded ones. Dropout
masks differ between ranks, so parity holds with dropout 0.

Position: attention layers use rotary embeddings by default (``position_embedding="rope"``,
the usual transformer baseline; table from GLOBAL positions of the zigzag shard,
`hyena_cp.megatron.rope`, divided by ``rotary_scaling`` for linearly interpolated RoPE);
``"none"`` gives NoPE attention. Hyena layers ignore it: their causal, position-indexed filters
carry position. There is no learned absolute embedding.

Layers and blocks (`hyena_cp.megatron.specs`): ``layer_pattern`` has one symbol per layer, "A"
for attention and any other for a Hyena layer with that symbol's `HyenaMixerConfig`
(``hyena_config`` one config for "H", or a mapping such as StripedHyena 2's
``{"S": SE, "D": MR, "H": LI}``); ``block="evo2"`` gives StripedHyena 2's norms and gated MLP.
``tie_embeddings`` makes the output layer read the embedding's weight (Evo 2), as megatron's
GPT model does (``share_embeddings_and_output_weights``).

Generation: `HyenaLanguageModel.generate` (CP prefill of the prompt, then exact cached decoding
under the same CP/TP groups; `hyena_cp.megatron.generation`, tested in tests/test_generation.py).

Packed sequences: ``forward(..., cu_seqlens=...)`` (or megatron's ``packed_seq_params=``) with
GLOBAL document boundaries ``[N+1]`` over the b rows laid end to end (every row end among
them; b = 1 is megatron's THD convention), identical on every rank. The whole packed
sequence is zigzag-sharded as usual (`hyena_cp.megatron.packing`: the layout and why). Every
layer then keeps documents apart: Hyena's short and long convs restart at each document,
attention masks per document and RoPE positions restart at 0 in each document, so a packed
document's logits and losses equal that document run alone. Labels that would cross into
the next document should be ``IGNORE_INDEX`` (the data's job: `hyena_cp.data.stdlib_text`).

Cross-rank agreement: before its first collective the model compares the CP ranks' shard
shapes (``input_ids``, ``labels``) and ``cu_seqlens`` once per forward (one small all-gather,
`hyena_cp.parallel.agreement`; policy ``hyena_config.check_agreement``) and runs its layers
inside `hyena_cp.parallel.agreed`: the Hyena layers skip their own checks, and an attention
layer ahead of them never meets mismatched shards in its K/V all-gather.

Tested in tests/test_megatron_lm.py (CP, Hyena and hybrids) and tests/test_megatron_lm_tp.py
(TP and TP x CP), against single-process models built from the same full weights.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.distributed import ProcessGroup

from hyena_cp.data.stdlib_text import IGNORE_INDEX
from hyena_cp.megatron.attention import TorchCoreAttention, check_attention_parallelism
from hyena_cp.megatron.evo2_block import MLP_ACTIVATIONS
from hyena_cp.megatron.generation import generate
from hyena_cp.megatron.compat import (ColumnParallelLinear, LanguageModelEmbedding, MegatronModule, PackedSeqParams,
                                      ProcessGroupCollection, TransformerBlock, TransformerConfig,
                                      cpu_config_defaults, resolve_cp_group,
                                      resolve_pg_collection, vocab_parallel_cross_entropy, with_dp_cp_group)
from hyena_cp.megatron.mixer import HyenaMixerConfig, MegatronHyenaMixer
from hyena_cp.megatron.packing import cu_seqlens_from, make_packed_seq_params
from hyena_cp.megatron.rope import POSITION_EMBEDDINGS, document_rotary_pos_emb, rotary_angles, rotary_pos_emb
from hyena_cp.megatron.specs import ATTENTION, HyenaConfigs, check_layer_pattern, get_hybrid_block_spec, hyena_symbols
from hyena_cp.ops.packing import check_cu_seqlens, is_one_document_per_row
from hyena_cp.parallel import (agreement, check_agreement_policy, check_divisible, gather_from_group, group_size,
                               shape_of)

__all__ = ["IGNORE_INDEX", "HyenaLanguageModel", "build_hyena_lm"]


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of its own, not a view: FSDP2 hooks the root module's output for its
    pre-backward all-gather, and an in-place op on a view of it would drop that hook (FSDP2 warns
    about any view output). The outputs here are a transposition of ``[s, b, ...]``; copying them is
    the cost of returning ``[b, s, ...]``, which the transposed view would pay at its first use."""
    return t.clone(memory_format=torch.contiguous_format) if t._base is not None else t


class HyenaLanguageModel(MegatronModule):
    """Causal LM: ``LanguageModelEmbedding`` (no learned position embedding) -> ``TransformerBlock``
    (one layer per symbol of ``layer_pattern``, then the final norm) -> ``ColumnParallelLinear``.

    Args:
        config: ``TransformerConfig`` (``use_cpu_initialization=True`` on CPU;
            ``sequence_parallel=False``). The model is cast to ``config.params_dtype``.
        vocab_size: output classes (256 for bytes); divisible by the TP size.
        max_sequence_length: longest GLOBAL sequence accepted by `forward`.
        layer_pattern: e.g. ``"HHA"`` ("H" Hyena, "A" attention); default all Hyena (the first
            symbol of ``hyena_config``).
        hyena_config: settings of every Hyena layer ("H"), or a mapping symbol -> settings; the
            ``check_agreement`` policy (equal in all of them) is also the model's (see the module
            docstring).
        block: ``"megatron"`` (default) or ``"evo2"`` (see `hyena_cp.megatron.specs`).
        tie_embeddings: the output layer uses the embedding's weight (no weight of its own).
        position_embedding: ``"rope"`` (default) or ``"none"``, for the attention layers.
        rotary_base: RoPE base (megatron's ``rotary_base``).
        rotary_scaling: positions are divided by it (linearly interpolated RoPE; 1: plain).
        core_attention: the attention layers' core attention (``TEDotProductAttention`` on GPUs).
        pg_collection: process groups (``tp``, ``pp``, ``cp``; ``dp_cp`` for checkpoints), e.g. the run
            mesh's (`hyena_cp.megatron.groups.mesh_pg_collection`), else megatron's ``parallel_state``.
            The groups are fixed here: ``self.tp_group``, ``self.cp_group`` (see
            `hyena_cp.megatron.groups` for why both are bound at construction in this wrapper).

    Raises:
        ValueError: on every rank, before any collective, for what cannot be split (see
            `_check_parallelism`) or an unknown ``position_embedding``.
    """

    def __init__(self, config: TransformerConfig, *, vocab_size: int, max_sequence_length: int,
                 layer_pattern: str | None = None, hyena_config: HyenaConfigs = None, block: str = "megatron",
                 tie_embeddings: bool = False, position_embedding: str = "rope", rotary_base: float = 10000.0,
                 rotary_scaling: float = 1.0, core_attention: type = TorchCoreAttention,
                 pg_collection: ProcessGroupCollection | None = None):
        super().__init__(config=config)
        configs = hyena_symbols(hyena_config)
        pattern = next(iter(configs)) * config.num_layers if layer_pattern is None else layer_pattern
        check_layer_pattern(pattern, config.num_layers, {**{s: "Hyena" for s in configs}, ATTENTION: "attention"})
        self.pg_collection = pg_collection = resolve_pg_collection(pg_collection)
        self.cp_group, self.tp_group = resolve_cp_group(pg_collection), pg_collection.tp
        _check_parallelism(config, pattern, vocab_size, position_embedding, self.tp_group, group_size(self.cp_group))
        if not rotary_scaling > 0:
            raise ValueError(f"rotary_scaling={rotary_scaling} must be > 0 (positions are divided by it)")
        self.vocab_size, self.max_sequence_length, self.layer_pattern = vocab_size, max_sequence_length, pattern
        self.check_agreement = check_agreement_policy(_agreement_policy(configs))
        self.position_embedding, self.rotary_base, self.core_attention = position_embedding, rotary_base, core_attention
        self.rotary_scaling, self.tie_embeddings = float(rotary_scaling), tie_embeddings
        self.embedding = LanguageModelEmbedding(config=config, vocab_size=vocab_size,
                                                max_sequence_length=max_sequence_length,
                                                position_embedding_type="none", tp_group=self.tp_group)
        self.decoder = TransformerBlock(config=config,
                                        spec=get_hybrid_block_spec(pattern, configs, core_attention, block,
                                                                   self.tp_group),
                                        pg_collection=pg_collection)
        self.output_layer = ColumnParallelLinear(config.hidden_size, vocab_size, config=config,
                                                 init_method=config.init_method, bias=False, gather_output=False,
                                                 skip_weight_param_allocation=tie_embeddings, tp_group=self.tp_group)
        self.to(dtype=config.params_dtype)  # megatron's WrappedTorchNorm ignores params_dtype

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """megatron ``dist_checkpointing`` state of the whole model, with true global offsets at
        every TP size (the Hyena mixers place their own shards: `MegatronHyenaMixer.sharded_state_dict`).
        The layers of a hybrid pattern differ, so they are keyed one by one (megatron's
        ``non_homogeneous_layers``); a pattern of one kind keeps megatron's stacked layer axis. The
        replicas of this rank's shards are ``pg_collection.dp_cp``'s ranks unless ``metadata`` names them."""
        metadata = with_dp_cp_group(metadata, self.pg_collection)
        if len(set(self.layer_pattern)) > 1:
            metadata["non_homogeneous_layers"] = True
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)

    def _check(self, input_ids: torch.Tensor, labels: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> None:
        """Every rank runs this before any collective."""
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a LongTensor [b, s_local], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if labels is not None and (labels.shape != input_ids.shape or labels.dtype != torch.long):
            raise ValueError(f"labels must be a LongTensor shaped like input_ids {tuple(input_ids.shape)}, got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        world = group_size(self.cp_group)
        length = input_ids.shape[1] * world
        if length > self.max_sequence_length:
            raise ValueError(f"global sequence length {length} (s_local={input_ids.shape[1]} x cp_size={world}) "
                             f"exceeds max_sequence_length={self.max_sequence_length}")
        check_divisible(length, "zigzag", world, f"global sequence length (s_local={input_ids.shape[1]} x cp_size)")
        if cu_seqlens is None:
            return
        check_cu_seqlens(cu_seqlens, input_ids.shape[0] * length, length)
        for layer in self.decoder.layers:  # here, so that no attention layer gathers K/V first
            if isinstance(layer.self_attention, MegatronHyenaMixer):
                layer.self_attention.mixer.hyena.check_packed_filter(cu_seqlens, input_ids.shape[0], length)
        if "A" in self.layer_pattern and not issubclass(self.core_attention, TorchCoreAttention):
            raise ValueError(f"packed sequences (cu_seqlens) need core_attention=TorchCoreAttention for the attention "
                             f"layers, got {self.core_attention.__name__} (it would not see the whole-sequence zigzag "
                             f"layout's document mask); pass cu_seqlens=None or build with TorchCoreAttention")

    def rotary_pos_emb(self, local_len: int, device: torch.device | None = None,
                       cu_seqlens: torch.Tensor | None = None, batch: int = 1) -> torch.Tensor | None:
        """The attention layers' rotary table for a local shard of ``local_len`` tokens
        (``[s_local, 1, 1, kv_channels]``; ``[s_local, b, 1, kv_channels]`` at each token's
        position in its document for a packed batch of ``batch`` rows), or None (NoPE, or no
        attention layer)."""
        if self.position_embedding == "none" or "A" not in self.layer_pattern:
            return None
        dtype = torch.promote_types(self.config.params_dtype, torch.float32)  # megatron's table is fp32
        common = dict(base=self.rotary_base, cp_group=self.cp_group, dtype=dtype, device=device,
                      scale=self.rotary_scaling)
        if cu_seqlens is not None:
            return document_rotary_pos_emb(cu_seqlens, batch, local_len, self.config.kv_channels, **common)
        return rotary_pos_emb(local_len, self.config.kv_channels, **common)

    def rotary_pos_emb_at(self, positions: torch.Tensor) -> torch.Tensor | None:
        """The rotary table of tokens at GLOBAL ``positions [s]`` (``[s, 1, 1, kv_channels]``), or None
        (generation: one decode step's position)."""
        if self.position_embedding == "none" or "A" not in self.layer_pattern:
            return None
        dtype = torch.promote_types(self.config.params_dtype, torch.float32)  # megatron's table is fp32
        return rotary_angles(positions, self.config.kv_channels, self.rotary_base, self.rotary_scaling).to(dtype)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
        """Logits or per-token losses of this rank's shard.

        Args:
            input_ids: ``[b, s_local]`` token ids, this rank's zigzag shard (the whole sequence
                without CP); the same on every TP rank.
            labels: ``[b, s_local]`` next-token ids in the same layout, ``IGNORE_INDEX`` for
                tokens without loss; or None.
            cu_seqlens: packed documents: integer ``[N+1]`` cumulative GLOBAL document lengths
                over the b rows laid end to end (0 first, ``b*s_local*cp`` last, every row end
                among them), identical on every rank; or None (one document per row).
            packed_seq_params: megatron's ``PackedSeqParams`` instead of ``cu_seqlens`` (its
                ``cu_seqlens_q``; see `hyena_cp.megatron.packing` for the formats accepted).

        Returns:
            logits ``[b, s_local, vocab]`` (the full vocabulary, gathered over TP) when
            ``labels`` is None, else per-token cross-entropy ``[b, s_local]`` in float32 (0
            where ``labels == IGNORE_INDEX``), equal on every TP rank.
        """
        if packed_seq_params is not None:
            if cu_seqlens is not None:
                raise ValueError("pass the document boundaries once: cu_seqlens or packed_seq_params, not both")
            cu_seqlens = cu_seqlens_from(packed_seq_params, where="HyenaLanguageModel", batch=input_ids.shape[0],
                                         cp_size=group_size(self.cp_group), allow_thd=True)
        signature = {"input_ids.shape": shape_of(input_ids), "labels.shape": shape_of(labels), "cu_seqlens": cu_seqlens}
        # every layer's shapes follow from the input: no per-layer check
        with agreement(self.cp_group, "HyenaLanguageModel.forward", signature, policy=self.check_agreement,
                       before=input_ids, hint="Give every CP rank its zigzag shard of the SAME global batch and the "
                                              "same cu_seqlens") as input_ids:
            self._check(input_ids, labels, cu_seqlens)
            return self._forward(input_ids, labels, cu_seqlens)

    def _forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None,
                 cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        batch, length = input_ids.shape[0], input_ids.shape[1] * group_size(self.cp_group)
        if cu_seqlens is not None and is_one_document_per_row(cu_seqlens, batch * length, length):
            cu_seqlens = None  # the documents are the rows: nothing to mask
        packed = None if cu_seqlens is None else make_packed_seq_params(cu_seqlens.to(input_ids.device))
        hidden = self.embedding(input_ids=input_ids, position_ids=None)  # s, b, h
        rotary = (self.rotary_pos_emb(input_ids.shape[1], input_ids.device) if cu_seqlens is None else
                  self.rotary_pos_emb(input_ids.shape[1], input_ids.device, cu_seqlens=cu_seqlens, batch=batch))
        hidden = self.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary,
                              packed_seq_params=packed)
        logits, _ = self.output_layer(hidden, weight=self.output_weight())  # s, b, vocab/tp
        if labels is None:
            return _own(rearrange(gather_from_group(logits, -1, self.tp_group), "s b v -> b s v"))
        return _own(rearrange(self._token_loss(logits, rearrange(labels, "b s -> s b")), "s b -> b s"))

    def output_weight(self) -> torch.Tensor | None:
        """The embedding's weight when tied (``[vocab/tp, h]``, this TP rank's rows), else None (the
        output layer's own)."""
        return self.embedding.word_embeddings.weight if self.tie_embeddings else None

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue the GLOBAL prompts ``input_ids [b, s]`` (equal lengths, the same on every rank)
        by ``max_new_tokens`` tokens under this model's CP and TP groups -> ``[b, s + max_new_tokens]``
        on every rank. ``temperature=0`` is greedy. See `hyena_cp.megatron.generation.generate`."""
        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)

    def _token_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits [s, b, vocab/tp]``, ``target [s, b]`` -> float32 loss ``[s, b]``."""
        if group_size(self.tp_group) == 1:
            loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none",
                                   ignore_index=IGNORE_INDEX)
            return loss.view_as(target)
        # megatron's loss has no ignore index: token 0 stands in, and the mask zeroes its loss and
        # so its gradient. (It also works in place on float32 logits, which are not used again.)
        ignore = target == IGNORE_INDEX
        loss = vocab_parallel_cross_entropy(logits, target.masked_fill(ignore, 0).contiguous(), self.tp_group)
        return loss.masked_fill(ignore, 0.0)


def _agreement_policy(configs: Mapping[str, HyenaMixerConfig]) -> str:
    """The one ``check_agreement`` policy of the Hyena configs (the model checks once for all layers)."""
    policies = {c.check_agreement for c in configs.values()}
    if len(policies) != 1:
        raise ValueError(f"the Hyena configs' check_agreement differ ({sorted(policies)}); the model checks its "
                         f"input once for every layer: give them one policy")
    return policies.pop()


def _check_parallelism(config: TransformerConfig, pattern: str, vocab_size: int, position_embedding: str,
                       tp_group: ProcessGroup | None, cp_size: int) -> None:
    """Raise, on every rank before anything is built, what this model cannot split or run on CPU.
    Hyena layers check their own constraints (`MegatronHyenaMixer`)."""
    tp_size = group_size(tp_group)
    if config.sequence_parallel:
        raise ValueError("sequence_parallel=True is not supported: megatron-core's sequence-parallel gather "
                         "(tensor_parallel.mappings) allocates on CUDA; set sequence_parallel=False")
    for name, value, size in (("tensor_model_parallel_size", config.tensor_model_parallel_size, tp_size),
                              ("context_parallel_size", config.context_parallel_size, cp_size)):
        if value not in (1, size):
            raise ValueError(f"config.{name}={value} differs from the process group size {size}; make them "
                             f"equal (or leave the config at 1 and pass the groups)")
    for name, value in (("vocab_size", vocab_size), ("ffn_hidden_size", config.ffn_hidden_size)):
        if value % tp_size:
            raise ValueError(f"{name}={value} must be divisible by the tensor-parallel size {tp_size} (megatron "
                             f"splits it over TP ranks); pad it to a multiple of {tp_size} or change the TP size")
    if "A" in pattern:
        check_attention_parallelism(config, tp_size=tp_size)
    if position_embedding not in POSITION_EMBEDDINGS:
        raise ValueError(f"position_embedding={position_embedding!r}; use one of {POSITION_EMBEDDINGS}")
    if position_embedding == "rope" and config.rotary_interleaved:
        raise ValueError("position_embedding='rope' builds megatron's non-interleaved table; set "
                         "rotary_interleaved=False")


def build_hyena_lm(*, vocab_size: int = 256, max_sequence_length: int = 1024, num_layers: int = 2,
                   hidden_size: int = 64, ffn_hidden_size: int | None = None, num_attention_heads: int = 4,
                   layer_pattern: str | None = None, hyena: HyenaMixerConfig | Mapping[str, Any] | None = None,
                   hyena_layers: Mapping[str, HyenaMixerConfig | Mapping[str, Any]] | None = None,
                   block: str = "megatron", tie_embeddings: bool = False, activation: str = "gelu",
                   position_embedding: str = "rope", rotary_base: float = 10000.0, rotary_scaling: float = 1.0,
                   normalization: str = "RMSNorm", hidden_dropout: float = 0.0, init_method_std: float = 0.02,
                   core_attention: type = TorchCoreAttention, config_overrides: dict[str, Any] | None = None,
                   pg_collection: ProcessGroupCollection | None = None) -> HyenaLanguageModel:
    """`HyenaLanguageModel` from flat, config-file-friendly arguments.

    Builds ``TransformerConfig(use_cpu_initialization=True, ...)`` (`cpu_config_defaults`):
    ``ffn_hidden_size`` defaults to 4 x hidden, attention dropout = ``hidden_dropout``;
    ``num_attention_heads``, ``position_embedding`` ("rope" or "none"), ``rotary_base``,
    ``rotary_scaling`` and ``core_attention`` matter only for "A" layers. ``activation``: the MLP's
    (`hyena_cp.megatron.evo2_block.MLP_ACTIVATIONS`; the "evo2" block has its own rule).
    ``config_overrides`` sets any other field (e.g. ``{"params_dtype": torch.float64}``,
    ``{"num_query_groups": 2}`` for GQA, ``{"tensor_model_parallel_size": 2}``, ``{"add_bias_linear":
    False}``).
    ``hyena``: a `HyenaMixerConfig` or a dict of its fields (what a config file gives:
    omegaconf turns a dataclass ``_target_`` into a config node, so ``LazyCall(HyenaMixerConfig)``
    fails) for every "H" layer; default ``HyenaMixerConfig(max_len=max_sequence_length)``.
    ``hyena_layers``: instead, one config (or dict) per layer symbol, e.g. StripedHyena 2's
    ``{"S": ..., "D": ..., "H": ...}`` with ``layer_pattern="SDHA..."``.
    ``block`` ("megatron" or "evo2") and ``tie_embeddings``: see `HyenaLanguageModel`.
    Seed with ``torch.manual_seed`` first: every rank must build the same (full) weights.
    """
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"activation={activation!r} must be one of {sorted(MLP_ACTIVATIONS)}")
    config = TransformerConfig(num_layers=num_layers, hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size,
                               num_attention_heads=num_attention_heads, normalization=normalization,
                               hidden_dropout=hidden_dropout, attention_dropout=hidden_dropout,
                               init_method_std=init_method_std,
                               **{"activation_func": MLP_ACTIVATIONS[activation], **cpu_config_defaults(),
                                  **(config_overrides or {})})
    if hyena is not None and hyena_layers is not None:
        raise ValueError("pass hyena (one config, for 'H' layers) or hyena_layers (one per symbol), not both")
    as_config = lambda c: c if isinstance(c, HyenaMixerConfig) else HyenaMixerConfig(**c)  # noqa: E731 (unknown keys raise)
    if hyena_layers is not None:
        configs: HyenaConfigs = {symbol: as_config(c) for symbol, c in hyena_layers.items()}
    else:
        configs = HyenaMixerConfig(max_len=max_sequence_length) if hyena is None else as_config(hyena)
    return HyenaLanguageModel(config, vocab_size=vocab_size, max_sequence_length=max_sequence_length,
                              layer_pattern=layer_pattern, hyena_config=configs, block=block,
                              tie_embeddings=tie_embeddings, position_embedding=position_embedding,
                              rotary_base=rotary_base, rotary_scaling=rotary_scaling, core_attention=core_attention,
                              pg_collection=pg_collection)
