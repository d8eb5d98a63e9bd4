"""Parity harness: the megatron Hyena LM under TP x CP against a single-process model built
from the same FULL weights.

Every rank builds the full model (same seed, perturbed weights) as the reference, builds the
TP/CP model, and copies each full tensor into it: `shard_tp` for TP-sharded parameters (their
partition read by `tp_partition` from megatron's attributes), a plain copy for replicas.
`parity_worker` runs both on this rank's zigzag shard and returns everything; `parity_errors`
(in the test process) puts the ranks' pieces together — TP shards with `unshard_tp`, CP
pieces with `unshard` / summed — and returns relative errors against the reference:

- ``fp64`` path: logits (gathered over TP), the loss share from them (float64 cross entropy
  in the test), the grad of the embedding output and EVERY parameter gradient; TP replicas
  must agree across TP ranks. Bar: 1e-10 in float64.
- ``loss`` path: the model's own per-token loss (float32 by contract: megatron's
  ``vocab_parallel_cross_entropy`` under TP), its loss share and the gradients from it.

Rank order is megatron's: tp innermost, then cp. `WeightLayout` variants other than "exact",
``local_keys`` attention and ``no_boundaries`` (a packed case run as if unpacked) are
negative twins: parity must fail for them. ``ParityCase.docs`` packs documents into the rows:
both models then get the same GLOBAL ``cu_seqlens`` (the equality with each document run
alone is tests/test_megatron_packed.py's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

from hyena_cp.megatron import IGNORE_INDEX, HyenaMixerConfig, TorchCoreAttention, build_hyena_lm
from hyena_cp.megatron.compat import ProcessGroupCollection
from hyena_cp.ops.packing import concat_cu_seqlens
from hyena_cp.parallel import shard, shard_tp, tp_partition, unshard, unshard_tp
from references import rel_err

WeightLayout = Literal["exact", "swapped_ranks", "stride_one"]
Variant = Literal["exact", "swapped_ranks", "stride_one", "local_keys", "no_boundaries"]


@dataclass(frozen=True)
class ParityCase:
    pattern: str = "AA"
    tp: int = 1
    cp: int = 1
    seq: int = 32  # global; cp=4 -> 8 zigzag chunks of 4 tokens >= the short-conv halo 2
    batch: int = 2
    vocab: int = 32
    hidden: int = 16
    heads: int = 4  # attention heads
    query_groups: int | None = None  # GQA when < heads
    hyena_heads: int = 4  # divisible by tp * cp
    hyena_norm: str | None = None  # norm on q * y (TP-sharded, statistics over the TP group)
    relative_filters: bool = False  # Hyena max_len=None (else max_len = seq)
    position_embedding: str = "rope"
    glu: bool = False  # SwiGLU MLP: megatron's fc1 is a stride-2 TP partition
    explicit_groups: bool = False  # ProcessGroupCollection instead of parallel_state
    dtype: torch.dtype = torch.float64
    docs: tuple[tuple[int, ...], ...] | None = None  # packed: token counts of each row's documents
    striped: bool = False  # StripedHyena 2 layers (pattern of S, D, H, A) in Evo 2's block

    def cu_seqlens(self) -> torch.Tensor | None:
        """GLOBAL boundaries of ``docs`` over the rows laid end to end, or None (unpacked)."""
        if self.docs is None:
            return None
        return concat_cu_seqlens([torch.tensor([0, *torch.tensor(row).cumsum(0).tolist()]) for row in self.docs],
                                 self.seq)


class LocalKeysAttention(TorchCoreAttention):
    """Negative twin: attends within this rank's shard only (as if there were no CP)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cp_group = None


def build_model(case: ParityCase, pg_collection: ProcessGroupCollection | None, *, tp_size: int = 1,
                core_attention: type = TorchCoreAttention):
    overrides = {"params_dtype": case.dtype, "tensor_model_parallel_size": tp_size}
    if case.query_groups is not None:
        overrides["num_query_groups"] = case.query_groups
    if case.glu:
        overrides.update(gated_linear_unit=True, activation_func=F.silu)
    torch.manual_seed(1234)
    if case.striped:  # SE, MR and LI as Evo 2 builds them, small enough for the zigzag chunks of case.seq
        common = dict(short_kernel_size=3, bias=False, out_proj_bias=True)
        layers = dict(S=dict(num_heads=case.hyena_heads, filter="explicit", filter_options=dict(length=3), skip=False,
                             **common),
                      D=dict(num_heads=case.hyena_heads, filter="explicit",
                             filter_options=dict(length=4, decay="savanna", L_cache=case.seq), **common),
                      H=dict(num_heads=case.hidden, filter="modal", filter_options=dict(state_size=4), **common))
        return build_hyena_lm(vocab_size=case.vocab, max_sequence_length=case.seq, num_layers=len(case.pattern),
                              hidden_size=case.hidden, ffn_hidden_size=2 * case.hidden,
                              num_attention_heads=case.heads, layer_pattern=case.pattern, hyena_layers=layers,
                              block="evo2", tie_embeddings=True, position_embedding=case.position_embedding,
                              core_attention=core_attention, pg_collection=pg_collection,
                              config_overrides={**overrides, "add_bias_linear": True, "add_qkv_bias": False})
    return build_hyena_lm(vocab_size=case.vocab, max_sequence_length=case.seq, num_layers=len(case.pattern),
                          hidden_size=case.hidden, ffn_hidden_size=2 * case.hidden, num_attention_heads=case.heads,
                          layer_pattern=case.pattern, position_embedding=case.position_embedding,
                          hyena=HyenaMixerConfig(num_heads=case.hyena_heads, filter_width=16, norm=case.hyena_norm,
                                                 max_len=None if case.relative_filters else case.seq),
                          core_attention=core_attention, config_overrides=overrides, pg_collection=pg_collection)


def batch(case: ParityCase) -> tuple[torch.Tensor, torch.Tensor]:
    """GLOBAL inputs and labels (shifted on the global sequence), a few labels ignored; packed,
    the last token of every document has no label (its target starts the next one)."""
    gen = torch.Generator().manual_seed(4321)
    tokens = torch.randint(0, case.vocab, (case.batch, case.seq + 1), generator=gen)
    labels = tokens[:, 1:].clone()
    labels[torch.rand(labels.shape, generator=gen) < 0.15] = IGNORE_INDEX
    if case.docs is not None:
        ends = case.cu_seqlens()[1:] - 1  # GLOBAL last token of each document
        labels.view(-1)[ends] = IGNORE_INDEX
    return tokens[:, :-1], labels


def perturb(model: torch.nn.Module) -> None:
    """Zero biases / unit norm weights would hide some gradient bugs."""
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def load_full_weights(model: torch.nn.Module, full: torch.nn.Module, tp_size: int, tp_rank: int,
                      layout: WeightLayout = "exact") -> None:
    """Copy the FULL model's tensors into ``model`` (this TP rank's pieces of sharded ones)."""
    sources = dict(full.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            src, part = sources[name], tp_partition(param)
            if part is not None:
                stride = 1 if layout == "stride_one" else part.stride
                rank = tp_size - 1 - tp_rank if layout == "swapped_ranks" else tp_rank
                src = shard_tp(src, part.dim, stride, tp_size, rank)
            param.copy_(src)


def forward_backward(model, inputs: torch.Tensor, labels: torch.Tensor, world: int, rank: int,
                     cu_seqlens: torch.Tensor | None = None) -> dict:
    """Both paths on this CP rank's zigzag shard; loss shares are divided by the GLOBAL count."""
    x, y = (shard(t, 1, "zigzag", world, rank) for t in (inputs, labels))
    packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    count = (labels != IGNORE_INDEX).sum()
    captured = {}

    def keep_embedding(module, args, output):
        output.retain_grad()
        captured["embedding"] = output

    hook = model.embedding.register_forward_hook(keep_embedding)
    try:
        logits = model(x, **packed)  # b, s_local, vocab (gathered over TP)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum") / count
        loss.backward()
    finally:
        hook.remove()
    out = {"logits": logits.detach(), "loss": loss.detach(), "embedding_grad": captured["embedding"].grad,
           "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    model.zero_grad(set_to_none=True)
    token_loss = model(x, y, **packed)  # b, s_local, float32
    loss32 = token_loss.sum() / count
    loss32.backward()
    out.update(token_loss=token_loss.detach(), loss32=loss32.detach(),
               grads32={n: p.grad.clone() for n, p in model.named_parameters()})
    return out


def _groups(case: ParityCase) -> tuple[ProcessGroupCollection | None, object, object]:
    tp, cp = parallel_state.get_tensor_model_parallel_group(), parallel_state.get_context_parallel_group()
    if not case.explicit_groups:
        return None, tp, cp
    return ProcessGroupCollection(tp=tp, cp=cp, pp=parallel_state.get_pipeline_model_parallel_group()), tp, cp


def parity_worker(case: ParityCase, variants: tuple[Variant, ...] = ("exact",)) -> dict:
    """On ``case.tp * case.cp`` ranks: the reference (on rank 0) and one TP/CP run per variant."""
    rank = dist.get_rank()
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]  # collective: every rank makes all
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=case.tp, context_parallel_size=case.cp)
    try:
        pgs, tp_group, cp_group = _groups(case)
        reference = build_model(case, ProcessGroupCollection(tp=singles[rank], pp=singles[rank], cp=None))
        perturb(reference)
        inputs, labels = batch(case)
        cu = case.cu_seqlens()
        tp_rank, cp_rank = tp_group.rank(), cp_group.rank()
        out = {"tp_rank": tp_rank, "cp_rank": cp_rank,
               "ref": forward_backward(reference, inputs, labels, 1, 0, cu) if rank == 0 else None}
        for variant in variants:
            core = LocalKeysAttention if variant == "local_keys" else TorchCoreAttention
            model = build_model(case, pgs, tp_size=case.tp, core_attention=core)
            layout = variant if variant in ("swapped_ranks", "stride_one") else "exact"
            load_full_weights(model, reference, case.tp, tp_rank, layout)
            out[variant] = forward_backward(model, inputs, labels, case.cp, cp_rank,
                                            None if variant == "no_boundaries" else cu)
            out.setdefault("partitions", {n: tp_partition(p) for n, p in model.named_parameters()})
        return out
    finally:
        parallel_state.destroy_model_parallel()


def _grad_errors(prefix: str, key: str, grid: list[list[dict]], ref: dict, partitions: dict) -> dict[str, float]:
    errors = {}
    for name, g_ref in ref[key].items():
        assert g_ref.norm() > 0, f"reference grad of {name} is zero: the comparison would be vacuous"
        part, total = partitions[name], 0
        for row in grid:  # one CP rank: its TP ranks in order
            pieces = [r[key][name] for r in row]
            if part is None:
                errors[f"{prefix} TP replicas of {name}"] = max(rel_err(p, pieces[0]) for p in pieces)
                total = total + pieces[0]
            else:
                total = total + unshard_tp(pieces, part.dim, part.stride)
        errors[f"{prefix} {name}"] = rel_err(total, g_ref)
    return errors


def parity_errors(results: list[dict], variant: Variant = "exact") -> dict[str, dict[str, float]]:
    """Relative errors of ``variant`` against the reference: ``{"fp64": {...}, "loss": {...}}``."""
    ref, partitions = results[0]["ref"], results[0]["partitions"]
    tp = 1 + max(r["tp_rank"] for r in results)
    grid = [[None] * tp for _ in range(1 + max(r["cp_rank"] for r in results))]
    for r in results:
        grid[r["cp_rank"]][r["tp_rank"]] = r[variant]

    def replicas(key: str) -> float:
        return max(rel_err(r[key], row[0][key]) for row in grid for r in row)

    def cp_joined(key: str, dim: int) -> torch.Tensor:
        return unshard([row[0][key] for row in grid], dim, "zigzag")

    fp64 = {"logits": rel_err(cp_joined("logits", 1), ref["logits"]), "TP replicas of logits": replicas("logits"),
            "loss": rel_err(sum(row[0]["loss"] for row in grid), ref["loss"]),
            "embedding grad": rel_err(cp_joined("embedding_grad", 0), ref["embedding_grad"]),
            "TP replicas of embedding grad": replicas("embedding_grad"),
            **_grad_errors("grad of", "grads", grid, ref, partitions)}
    loss = {"per-token loss": rel_err(cp_joined("token_loss", 1), ref["token_loss"]),
            "TP replicas of per-token loss": replicas("token_loss"),
            "loss share sum": rel_err(sum(row[0]["loss32"] for row in grid), ref["loss32"]),
            **_grad_errors("loss-path grad of", "grads32", grid, ref, partitions)}
    return {"fp64": fp64, "loss": loss}


TOL = {"fp64": 1e-10, "loss": 1e-5}  # the model's loss is float32 by contract


def assert_parity(results: list[dict], variant: Variant = "exact") -> dict[str, float]:
    """Fail on any error above `TOL`; returns the worst error of each path."""
    errors = parity_errors(results, variant)
    for path, errs in errors.items():
        bad = {k: v for k, v in errs.items() if not v < TOL[path]}
        assert not bad, f"{variant}: {path} parity fails (tolerance {TOL[path]}): {bad}"
    return {path: max(errs.values()) for path, errs in errors.items()}


def assert_parity_fails(results: list[dict], variant: Variant) -> float:
    """A negative twin must miss the fp64 bar by far; returns its worst fp64 error."""
    worst = max(parity_errors(results, variant)["fp64"].values())
    assert worst > 1e-3, f"{variant}: parity should fail but the worst fp64 error is {worst:.2e}"
    return worst


__all__ = ["LocalKeysAttention", "ParityCase", "assert_parity", "assert_parity_fails", "parity_errors",
           "parity_worker"]
