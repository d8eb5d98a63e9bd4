"""Evo 2 (StripedHyena 2) and HyenaDNA checkpoints converted in one call and run by the megatron-core
LM: random checkpoints in the ORIGINAL formats (vortex's keys and interleaved/per-head layouts;
HyenaDNA's HuggingFace keys) against float64 direct-sum references of those models
(tests/striped_references.py) — one process, and under CP=2, TP=2 and TP=2 x CP=2 (logits and every
parameter gradient of a logits functional, against the single-process model). Negative twins undo one
documented permutation each; unmappable configs raise ``ValueError`` naming the key."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state

from hyena_cp import instantiate
from hyena_cp.interop import evo2, hyenadna
from hyena_cp.ops.safari import safari_decays, safari_positional_table
from hyena_cp.parallel import shard, tp_partition, unshard, unshard_tp
from hyena_cp.train.generate import load_full_state
from references import rel_err
from striped_references import (EVO2_TINY, HYENADNA_TINY, evo2_forward, hyenadna_forward, random_evo2_checkpoint,
                                random_hyenadna_checkpoint)

TOL = 1e-10  # float64


def build(cfg: dict, state: dict, tp_group=None):
    """The converted model in float64 with the converted tensors (this TP rank's shards)."""
    cfg = copy.deepcopy(cfg)
    cfg["config_overrides"]["params_dtype"] = torch.float64
    torch.manual_seed(0)  # every weight is overwritten
    model = instantiate(cfg)
    load_full_state(model, state, tp_group)
    return model


def run_converted(cfg: dict, state: dict, ids: torch.Tensor, tp: int = 1, cp: int = 1,
                  weights: torch.Tensor | None = None) -> dict:
    """On a dist_run rank (megatron's order: tp innermost): this rank's zigzag shard of ``ids``
    through the converted model -> logits (gathered over TP) and, with ``weights``, the gradient
    of <logits, weights> for every parameter (this rank's TP shard)."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    try:
        model = build(cfg, state, parallel_state.get_tensor_model_parallel_group())
        cp_rank = dist.get_rank() // tp
        if weights is None:
            with torch.no_grad():
                return {"logits": model(shard(ids, 1, "zigzag", cp, cp_rank))}
        logits = model(shard(ids, 1, "zigzag", cp, cp_rank))
        (logits * shard(weights, 1, "zigzag", cp, cp_rank)).sum().backward()
        return {"logits": logits.detach(), "grads": {n: p.grad for n, p in model.named_parameters()},
                "partitions": {n: tp_partition(p) for n, p in model.named_parameters()}}
    finally:
        parallel_state.destroy_model_parallel()


def logits_of(dist_run, cfg: dict, state: dict, ids: torch.Tensor) -> torch.Tensor:
    return dist_run(run_converted, 1, cfg, state, ids)[0]["logits"]


def evo2_case(**changes) -> tuple[dict, dict]:
    cfg = {**EVO2_TINY, **changes}
    return cfg, random_evo2_checkpoint(cfg, seed=1)


# ------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("changes,length", [
    ({}, 150),  # L > 128: the whole MR filter
    ({}, 37),  # L < 128
    ({"qkv_proj_bias": True, "short_filter_bias": True}, 40),
    ({"hcm_filter_length": 16}, 40),  # vortex decides by length: a 16-tap "medium" filter is SE-like
    ({"use_interpolated_rotary_pos_emb": True, "rotary_emb_scaling_factor": 4, "rotary_emb_base": 1e6}, 40),
])
def test_evo2_logits_equal_the_reference(dist_run, changes, length):
    config, checkpoint = evo2_case(**changes)
    ids = torch.randint(0, config["vocab_size"], (2, length))
    cfg, state = evo2.convert(config, checkpoint)
    assert rel_err(logits_of(dist_run, cfg, state, ids), evo2_forward(config, checkpoint, ids)) < TOL


def test_evo2_other_layouts_convert_to_the_same_model(dist_run):
    """``interleave: False`` (block rows), ``column_split: False`` (vortex's live Wqkv layout) and
    ``hyena_flip_x1x2`` (q and k swapped) are other spellings of one model."""
    config, checkpoint = evo2_case()
    d, heads = config["hidden_size"], config["num_attention_heads"]
    other = {}
    for key, value in checkpoint.items():
        if key.endswith(("projections.weight", "short_filter_weight")):  # interleaved -> blocks [k; q; v]
            value = value.unflatten(0, (d, 3)).transpose(0, 1)[[1, 0, 2]].flatten(0, 1)
        if key.endswith("Wqkv.weight"):  # per head -> [q; k; v] blocks
            value = value.unflatten(0, (heads, 3, d // heads)).transpose(0, 1).flatten(0, 2)
        other[key] = value
    spelling = {**config, "interleave": False, "column_split": False, "hyena_flip_x1x2": True}
    ids = torch.randint(0, config["vocab_size"], (1, 30))
    assert rel_err(logits_of(dist_run, *evo2.convert(spelling, other), ids), evo2_forward(config, checkpoint, ids)) < TOL


@pytest.mark.parametrize("twin", ["unflipped_se", "flipped_mr", "interleaved_projections", "live_wqkv"])
def test_evo2_negative_twins(dist_run, twin):
    """Each documented permutation matters: undo one and the logits move far from the reference."""
    config, checkpoint = evo2_case()
    ids = torch.randint(0, config["vocab_size"], (1, 150))
    cfg, state = evo2.convert(config, checkpoint)
    d, heads = config["hidden_size"], config["num_attention_heads"]
    for key in list(state):
        layer = int(key.split(".")[2]) if key.startswith("decoder.layers.") else -1
        if twin == "unflipped_se" and key.endswith("hyena.filter.h") and layer in config["hcs_layer_idxs"]:
            state[key] = state[key].flip(-1)
        if twin == "flipped_mr" and key.endswith("hyena.filter.h") and layer in config["hcm_layer_idxs"]:
            state[key] = state[key].flip(-1)
        if twin == "interleaved_projections" and key.endswith(("in_proj.weight", "short_conv.weight")):
            state[key] = state[key].unflatten(0, (3, d)).transpose(0, 1).flatten(0, 1)  # the checkpoint's rows again
        if twin == "live_wqkv" and key.endswith("linear_qkv.weight"):
            state[key] = state[key].unflatten(0, (heads, 3, d // heads)).transpose(0, 1).flatten(0, 2)
    assert rel_err(logits_of(dist_run, cfg, state, ids), evo2_forward(config, checkpoint, ids)) > 1e-2


@pytest.mark.parametrize("prefix,head", [("hyena.backbone.", True), ("backbone.", False), ("model.backbone.", True)])
def test_hyenadna_logits_equal_the_reference(dist_run, prefix, head):
    config = dict(HYENADNA_TINY)
    checkpoint = random_hyenadna_checkpoint(config, seed=2, prefix=prefix)
    reference = checkpoint
    if not head:  # the backbone alone: the head is tied to the embedding (hyena-dna's training LM)
        del checkpoint["lm_head.weight"]
        reference = {**checkpoint, "lm_head.weight": checkpoint[prefix + "embeddings.word_embeddings.weight"]}
    elif prefix == "model.backbone.":  # Lightning, trained with checkpoint_mixer / checkpoint_mlp
        checkpoint = {k.replace(".mixer.", ".mixer.layer.").replace(".mlp.", ".mlp.layer."): v
                      for k, v in checkpoint.items()}
    ids = torch.randint(0, config["vocab_size"], (2, 50))
    cfg, state = hyenadna.convert(config, checkpoint)
    want = hyenadna_forward(config, reference, ids, prefix=prefix)
    assert rel_err(logits_of(dist_run, cfg, state, ids), want) < TOL
    # negative twins: the window's shift of the training code, and tables recomputed from their formulas
    assert rel_err(logits_of(dist_run, *hyenadna.convert(config, checkpoint, shift=0.0), ids), want) > 1e-2
    recomputed = {k: fresh_table(cfg, k) if k.endswith(("filter.z", "filter.t", "filter.deltas")) else v
                  for k, v in state.items()}
    assert rel_err(logits_of(dist_run, cfg, recomputed, ids), want) > 1e-3


def fresh_table(cfg: dict, key: str) -> torch.Tensor:
    """The init formula's table of a `SafariFilter` (what a converter that does not load them would use)."""
    options = cfg["hyena"]["filter_options"]
    z, t = safari_positional_table(options["l_max"], options["emb_dim"], torch.float64)
    return {"z": z, "t": t, "deltas": safari_decays(cfg["hidden_size"]).double()}[key.rsplit(".", 1)[1]]


@pytest.mark.parametrize("convert,config,checkpoint,match", [
    (evo2.convert, {**EVO2_TINY, "proj_groups": 2}, None, "proj_groups=2"),
    (evo2.convert, {**EVO2_TINY, "column_split_hyena": True}, None, "column_split_hyena=True"),
    (evo2.convert, {**EVO2_TINY, "tie_embeddings": False}, None, "tie_embeddings=False"),
    (evo2.convert, {**EVO2_TINY, "shiny_new_key": 1}, None, "shiny_new_key"),
    (evo2.convert, {**EVO2_TINY, "hcs_layer_idxs": [0]}, None, "layer 4 is in none of"),
    (evo2.convert, EVO2_TINY, "drop:blocks.2.filter.residues", "lacks 'blocks.2.filter.residues'"),
    (evo2.convert, {**EVO2_TINY, "qkv_proj_bias": True}, None, "lacks 'blocks.0.projections.bias'"),
    (evo2.convert, EVO2_TINY, "add:blocks.0.filter.short_filter_bias",
     "does not use: \\['blocks.0.filter.short_filter_bias'\\]"),
    (evo2.convert, {**EVO2_TINY, "rotary_emb_base": 500}, None, "rotary_emb.inv_freq is not base"),
    (hyenadna.convert, {**HYENADNA_TINY, "hyena_order": 3}, None, "hyena_order=3"),
    (hyenadna.convert, {**HYENADNA_TINY, "short_filter_order": 4}, None, "short_filter_order=4"),
    (hyenadna.convert, {**HYENADNA_TINY, "layer_norm_epsilon": 1e-6}, None, "layer_norm_epsilon=1e-06"),
    (hyenadna.convert, HYENADNA_TINY, "freq", "implicit_filter.3.freq differs"),
    (hyenadna.convert, {**HYENADNA_TINY, "vocab_size": 40}, None, "padded vocabulary 40"),
])
def test_unmappable_input_raises_naming_the_key(convert, config, checkpoint, match):
    state = random_evo2_checkpoint(EVO2_TINY) if convert is evo2.convert else random_hyenadna_checkpoint(HYENADNA_TINY)
    if checkpoint and checkpoint.startswith("drop:"):
        del state[checkpoint[5:]]
    elif checkpoint and checkpoint.startswith("add:"):
        state[checkpoint[4:]] = torch.zeros(3 * EVO2_TINY["hidden_size"])
    elif checkpoint == "freq":
        key = "hyena.backbone.layers.1.mixer.filter_fn.implicit_filter.3.freq"
        state[key] = state[key] + 1
    with pytest.raises(ValueError, match=match):
        convert(config, state)


# ------------------------------------------------------------------------------ TP x CP
def parallel_data(kind: str, length: int):
    if kind == "evo2":
        config, checkpoint = evo2_case()
    else:
        config = dict(HYENADNA_TINY)
        checkpoint = random_hyenadna_checkpoint(config, seed=3)
    gen = torch.Generator().manual_seed(5)
    vocab = config["vocab_size"] if kind == "evo2" else hyenadna.padded_vocab(config)
    ids = torch.randint(0, config["vocab_size"], (2, length), generator=gen)
    return config, checkpoint, ids, torch.randn(2, length, vocab, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("kind,length", [("evo2", 512), ("hyenadna", 64)])  # evo2: CP=2 chunks >= MR's halo 127
@pytest.mark.parametrize("tp,cp", [(1, 2), (2, 1), (2, 2)])
def test_converted_models_under_tp_and_cp(dist_run, kind, length, tp, cp):
    config, checkpoint, ids, weights = parallel_data(kind, length)
    cfg, state = (evo2 if kind == "evo2" else hyenadna).convert(config, checkpoint)
    results = dist_run(run_converted, tp * cp, cfg, state, ids, tp, cp, weights)
    reference = evo2_forward(config, checkpoint, ids) if kind == "evo2" else hyenadna_forward(config, checkpoint, ids)
    logits = unshard([results[c * tp]["logits"] for c in range(cp)], 1, "zigzag")
    assert rel_err(logits, reference) < TOL
    single = dist_run(run_converted, 1, cfg, state, ids, 1, 1, weights)[0]
    for name, want in single["grads"].items():
        per_tp = [sum(results[c * tp + t]["grads"][name] for c in range(cp)) for t in range(tp)]  # CP-summed
        part = results[0]["partitions"][name]
        grad = per_tp[0] if part is None else unshard_tp(per_tp, part.dim, part.stride)
        assert want.norm() > 0, name
        assert rel_err(grad, want) < TOL, name
