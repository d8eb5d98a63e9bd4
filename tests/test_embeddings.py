"""Per-layer hidden states of sequences of ANY length under CP (`hyena_cp.megatron.embeddings`,
``launch/embed.py``): a converted Evo 2 and HyenaDNA model (float64) at CP=1, 2 and 4 on lengths
that are not multiples of 2P equal the float64 direct-sum reference of the UNPADDED sequence, layer
by layer, per token and pooled. Negative twin: padding in front instead of at the end."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state
from safetensors.torch import load_file

from hyena_cp import instantiate
from hyena_cp.interop import evo2, hyenadna
from hyena_cp.interop.files import write_converted
from hyena_cp.lazy import LazyConfig
from hyena_cp.megatron import embeddings as embeddings_module
from hyena_cp.megatron.embeddings import hidden_states, padded_length
from hyena_cp.train.embed import embed_sequences, read_sequences, tokenize, with_embed_defaults
from hyena_cp.train.generate import load_full_state
from references import rel_err
from striped_references import (EVO2_TINY, HYENADNA_TINY, evo2_forward, hyenadna_forward, random_evo2_checkpoint,
                                random_hyenadna_checkpoint)

TOL = 1e-10
LAYERS = [0, 1, 3, 4, -1]


def converted(kind: str):
    if kind == "evo2":
        config = dict(EVO2_TINY)
        checkpoint = random_evo2_checkpoint(config, seed=4)
        return config, checkpoint, evo2.convert(config, checkpoint)
    config = {**HYENADNA_TINY, "n_layer": 4}
    checkpoint = random_hyenadna_checkpoint(config, seed=4)
    return config, checkpoint, hyenadna.convert(config, checkpoint)


def worker_states(kind: str, ids: torch.Tensor, pooling: str, front: bool = False) -> dict:
    parallel_state.initialize_model_parallel(context_parallel_size=dist.get_world_size())
    pad = embeddings_module.F.pad
    if front:  # negative twin: padding where real tokens would see it
        embeddings_module.F.pad = lambda x, p: pad(x, (p[1], p[0]))
    try:
        _, _, (cfg, state) = converted(kind)
        cfg = copy.deepcopy(cfg)
        cfg["config_overrides"]["params_dtype"] = torch.float64
        torch.manual_seed(0)
        model = instantiate(cfg)
        load_full_state(model, state)
        return {"states": hidden_states(model, ids, LAYERS, pooling), "padded": padded_length(model, ids.shape[1])}
    finally:
        embeddings_module.F.pad = pad
        parallel_state.destroy_model_parallel()


def reference_states(kind: str, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    config, checkpoint, _ = converted(kind)
    if kind == "evo2":
        outs = evo2_forward(config, checkpoint, ids, hidden=True)
        first = checkpoint["embedding_layer.weight"][ids]
    else:
        outs = hyenadna_forward(config, checkpoint, ids, hidden=True)
        first = checkpoint["hyena.backbone.embeddings.word_embeddings.weight"][ids]
    return {0: first, **{i + 1: o for i, o in enumerate(outs[:-1])}, -1: outs[-1]}


@pytest.mark.parametrize("kind,length,worlds", [("evo2", 37, (1, 2)), ("hyenadna", 37, (1, 2, 4))])
@pytest.mark.parametrize("pooling", ["none", "mean"])
def test_hidden_states_of_any_length_equal_the_unpadded_reference(dist_run, kind, length, worlds, pooling):
    ids = torch.randint(0, 12, (1, length), generator=torch.Generator().manual_seed(6))
    want = reference_states(kind, ids)
    for world in worlds:
        result = dist_run(worker_states, world, kind, ids, pooling)
        padded = result[0]["padded"]
        assert padded == length if world == 1 else (padded % (2 * world) == 0 and padded > length)
        for rank in range(world):  # every rank returns the whole result
            for layer, states in result[rank]["states"].items():
                expected = want[layer] if pooling == "none" else want[layer].mean(1)
                assert rel_err(states, expected) < TOL, (world, rank, layer)


def test_padding_in_front_fails(dist_run):
    ids = torch.randint(0, 12, (1, 37), generator=torch.Generator().manual_seed(6))
    result = dist_run(worker_states, 2, "hyenadna", ids, "none", True)
    assert rel_err(result[0]["states"][-1], reference_states("hyenadna", ids)[-1]) > 1e-2


def worker_launch(config_path: str, overrides: list[str]) -> dict:
    cfg = LazyConfig.apply_overrides(with_embed_defaults(LazyConfig.load(config_path)), overrides)
    return embed_sequences(cfg)


def test_embed_launcher_writes_the_same_embeddings_at_cp1_and_cp2(dist_run, tmp_path):
    _, _, (cfg, state) = converted("hyenadna")
    write_converted(cfg, state, tmp_path, torch.float64)
    (tmp_path / "seqs.fa").write_text(">one first record\nACGTNACGTACG\nGTACCAGTAC\n>two\nggccatatx\n")
    assert [(n, len(s)) for n, s in read_sequences(tmp_path / "seqs.fa")] == [("one", 22), ("two", 9)]
    assert tokenize("acgtnX", "nucleotides").tolist() == [7, 8, 9, 10, 11, 6]
    outputs = {}
    for world in (1, 2):
        out = tmp_path / f"emb{world}.safetensors"
        common = [f"embed.weights={tmp_path}", f"embed.sequences={tmp_path / 'seqs.fa'}", f"embed.out={out}",
                  "embed.layers=[2,-1]", "embed.pooling=none", "embed.alphabet=nucleotides", f"parallel.cp={world}"]
        dist_run(worker_launch, world, str(tmp_path / "model.yaml"), common)
        outputs[world] = load_file(str(out))
    assert sorted(outputs[1]) == ["one/layer-1", "one/layer2", "two/layer-1", "two/layer2"]
    assert outputs[1]["one/layer2"].shape == (22, HYENADNA_TINY["d_model"])
    for key, value in outputs[1].items():
        assert rel_err(outputs[2][key], value) < TOL, key
