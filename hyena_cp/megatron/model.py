"""A causal Hyena language model on megatron-core: embedding -> ``TransformerBlock`` (Hyena
or hybrid Hyena/attention layers, final norm) -> output layer.

Context parallelism: each rank of the CP group holds its zigzag shard of every sequence
(`hyena_cp.parallel.shard(tokens, 1, "zigzag", P, rank)`, the same layout as megatron's
``get_batch_on_this_cp_rank``), for ``input_ids`` and ``labels`` alike — shift the labels
(``labels[t] = tokens[t + 1]``) on the GLOBAL sequence before sharding. Per-token losses
come back in the same layout. Gradient invariant: with ``loss_share = per_token_loss.sum() /
global_token_count`` on every rank, parameter gradients SUMMED over the CP group equal the
single-process gradients. Dropout masks differ between ranks, so parity holds with dropout 0.
No position embedding: the Hyena layers' causal, position-indexed filters carry position,
and attention layers in a hybrid use none (NoPE), so no position ids need sharding.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from hyena_cp.megatron.compat import (ColumnParallelLinear, LanguageModelEmbedding, MegatronModule,
                                      ProcessGroupCollection, TransformerBlock, TransformerConfig,
                                      cpu_config_defaults, resolve_cp_group, resolve_pg_collection)
from hyena_cp.megatron.mixer import HyenaMixerConfig
from hyena_cp.megatron.specs import check_layer_pattern, get_hybrid_block_spec
from hyena_cp.parallel import group_size

__all__ = ["IGNORE_INDEX", "HyenaLanguageModel", "build_hyena_lm"]

IGNORE_INDEX = -100  # label of tokens that get zero loss (padding), as torch's cross_entropy


class HyenaLanguageModel(MegatronModule):
    """Causal LM: ``LanguageModelEmbedding`` (no position embedding) -> ``TransformerBlock``
    (one layer per symbol of ``layer_pattern``, then the final norm) -> ``ColumnParallelLinear``.

    Args:
        config: ``TransformerConfig`` (``use_cpu_initialization=True`` on CPU); tensor and
            sequence parallelism are not supported.
        vocab_size: output classes (256 for bytes).
        max_sequence_length: longest GLOBAL sequence accepted by `forward`.
        layer_pattern: e.g. ``"HHA"`` ("H" Hyena, "A" attention); default all Hyena.
            Attention layers run without CP only (ValueError at construction otherwise).
        hyena_config: settings of every Hyena layer.
        pg_collection: process groups (``tp``, ``pp``, ``cp``), else megatron's ``parallel_state``.
            The CP group is fixed here; it is ``self.cp_group``.
    """

    def __init__(self, config: TransformerConfig, *, vocab_size: int, max_sequence_length: int,
                 layer_pattern: str | None = None, hyena_config: HyenaMixerConfig | None = None,
                 pg_collection: ProcessGroupCollection | None = None):
        super().__init__(config=config)
        pattern = "H" * config.num_layers if layer_pattern is None else layer_pattern
        check_layer_pattern(pattern, config.num_layers)
        pg_collection = resolve_pg_collection(pg_collection)
        self.cp_group = resolve_cp_group(pg_collection)
        tp_size = group_size(pg_collection.tp)
        if tp_size > 1:
            raise ValueError(f"HyenaLanguageModel is not tensor parallel (TP group size {tp_size}); use "
                             f"tensor_model_parallel_size=1 and context parallelism for long sequences")
        if "A" in pattern and max(group_size(self.cp_group), config.context_parallel_size) > 1:
            raise ValueError(f"layer_pattern={pattern!r} has attention layers, which have no context parallelism "
                             f"here (CP size {group_size(self.cp_group)}); use an all-'H' pattern with CP or "
                             f"context_parallel_size=1")
        self.vocab_size, self.max_sequence_length, self.layer_pattern = vocab_size, max_sequence_length, pattern
        self.embedding = LanguageModelEmbedding(config=config, vocab_size=vocab_size,
                                                max_sequence_length=max_sequence_length,
                                                position_embedding_type="none", tp_group=pg_collection.tp)
        self.decoder = TransformerBlock(config=config, spec=get_hybrid_block_spec(pattern, hyena_config),
                                        pg_collection=pg_collection)
        self.output_layer = ColumnParallelLinear(config.hidden_size, vocab_size, config=config,
                                                 init_method=config.init_method, bias=False, gather_output=False,
                                                 tp_group=pg_collection.tp)

    def _check(self, input_ids: torch.Tensor, labels: torch.Tensor | None) -> None:
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
        if world > 1 and input_ids.shape[1] % 2:
            raise ValueError(f"s_local={input_ids.shape[1]} must be even (zigzag: two chunks per rank); pad the "
                             f"global sequence to a multiple of 2*cp_size={2 * world}")

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits or per-token losses of this rank's shard.

        Args:
            input_ids: ``[b, s_local]`` token ids, this rank's zigzag shard (the whole sequence
                without CP).
            labels: ``[b, s_local]`` next-token ids in the same layout, ``IGNORE_INDEX`` for
                tokens without loss; or None.

        Returns:
            logits ``[b, s_local, vocab]`` when ``labels`` is None, else per-token cross-entropy
            ``[b, s_local]`` in float32 (0 where ``labels == IGNORE_INDEX``).
        """
        self._check(input_ids, labels)
        hidden = self.embedding(input_ids=input_ids, position_ids=None)  # s, b, h
        hidden = self.decoder(hidden_states=hidden, attention_mask=None)
        logits, _ = self.output_layer(hidden)  # s, b, vocab
        logits = rearrange(logits, "s b v -> b s v")
        if labels is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none",
                               ignore_index=IGNORE_INDEX)
        return loss.view_as(labels)


def build_hyena_lm(*, vocab_size: int = 256, max_sequence_length: int = 1024, num_layers: int = 2,
                   hidden_size: int = 64, ffn_hidden_size: int | None = None, num_attention_heads: int = 4,
                   layer_pattern: str | None = None, hyena: HyenaMixerConfig | Mapping[str, Any] | None = None,
                   normalization: str = "RMSNorm", hidden_dropout: float = 0.0, init_method_std: float = 0.02,
                   config_overrides: dict[str, Any] | None = None,
                   pg_collection: ProcessGroupCollection | None = None) -> HyenaLanguageModel:
    """`HyenaLanguageModel` from flat, config-file-friendly arguments.

    Builds ``TransformerConfig(use_cpu_initialization=True, ...)`` (`cpu_config_defaults`):
    ``ffn_hidden_size`` defaults to 4 x hidden, attention dropout = ``hidden_dropout``,
    ``num_attention_heads`` matters only for "A" layers, and ``config_overrides`` sets any
    other field (e.g. ``{"bf16": True, "params_dtype": torch.bfloat16}``).
    ``hyena``: a `HyenaMixerConfig` or a dict of its fields (what a config file gives:
    omegaconf turns a dataclass ``_target_`` into a config node, so ``LazyCall(HyenaMixerConfig)``
    fails); default ``HyenaMixerConfig(max_len=max_sequence_length)``.
    Seed with ``torch.manual_seed`` first: every CP rank must build the same weights.
    """
    config = TransformerConfig(num_layers=num_layers, hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size,
                               num_attention_heads=num_attention_heads, normalization=normalization,
                               hidden_dropout=hidden_dropout, attention_dropout=hidden_dropout,
                               init_method_std=init_method_std,
                               **{**cpu_config_defaults(), **(config_overrides or {})})
    if hyena is None:
        hyena = HyenaMixerConfig(max_len=max_sequence_length)
    elif not isinstance(hyena, HyenaMixerConfig):
        hyena = HyenaMixerConfig(**hyena)  # an unknown key raises TypeError
    return HyenaLanguageModel(config, vocab_size=vocab_size, max_sequence_length=max_sequence_length,
                              layer_pattern=layer_pattern, hyena_config=hyena, pg_collection=pg_collection)
