"""Cached decoding of converted Evo 2 and HyenaDNA models (float64) against the direct-sum reference
of the full sequence: prefill under CP (P = 1, 2) then one step per token, every position's logits
equal (1e-10) — SE and MR from their last K-1 values of ``z`` (past the MR's 128 taps), LI from the
modal recurrence (O(S) per channel and step), HyenaDNA's safari filter from the ``z`` history.
Greedy ``generate`` equals the recompute loop. The SE/MR/LI caches do not grow with the context.
Negative twins: a modal state prefilled one token short, an FIR tail one token late."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state

from hyena_cp import instantiate
from hyena_cp.interop import evo2, hyenadna
from hyena_cp.megatron.generation import InferenceCache, generate_by_recompute
from hyena_cp.modules import inference
from hyena_cp.modules.inference import HyenaCache
from hyena_cp.parallel import shard, unshard
from hyena_cp.train.generate import load_full_state
from references import rel_err
from striped_references import (EVO2_TINY, HYENADNA_TINY, evo2_forward, hyenadna_forward, random_evo2_checkpoint,
                                random_hyenadna_checkpoint)

TOL = 1e-10
PREFILL = 16


def case(kind: str):
    if kind == "evo2":
        config = dict(EVO2_TINY)
        checkpoint = random_evo2_checkpoint(config, seed=7)
        cfg, state = evo2.convert(config, checkpoint)
        total = 150  # past the MR filter's 128 taps
    else:
        config = dict(HYENADNA_TINY)
        checkpoint = random_hyenadna_checkpoint(config, seed=7)
        cfg, state = hyenadna.convert(config, checkpoint)
        total = 40
    tokens = torch.randint(0, config["vocab_size"], (2, total), generator=torch.Generator().manual_seed(8))
    return config, checkpoint, cfg, state, tokens


def build(cfg: dict, state: dict):
    cfg = copy.deepcopy(cfg)
    cfg["config_overrides"]["params_dtype"] = torch.float64
    torch.manual_seed(0)
    model = instantiate(cfg).eval()
    load_full_state(model, state)
    return model


def twin(name: str):
    """Patch a plausible bug into the decode state; returns the undo."""
    if name == "modal_short":
        exact = inference.modal_state
        inference.modal_state = lambda z, poles: exact(z[..., :-1], poles)
        return lambda: setattr(inference, "modal_state", exact)
    exact = inference.LongConvState.prefill

    def late(self, z):
        exact(self, z)
        if self.kind == "fir":
            self.tensors["tail"] = F.pad(self.tensors["tail"][..., :-1], (1, 0))
    inference.LongConvState.prefill = late
    return lambda: setattr(inference.LongConvState, "prefill", exact)


def worker(kind: str, bug: str | None = None) -> dict:
    cp, rank = dist.get_world_size(), dist.get_rank()
    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    undo = twin(bug) if bug else (lambda: None)
    try:
        _, _, cfg, state, tokens = case(kind)
        model = build(cfg, state)
        cache = InferenceCache(model, batch_size=tokens.shape[0], capacity=tokens.shape[1])
        prefill = cache.prefill(shard(tokens[:, :PREFILL], 1, "zigzag", cp, rank))
        steps = torch.stack([cache.step(tokens[:, t:t + 1]) for t in range(PREFILL, tokens.shape[1])], dim=1)
        out = {"prefill": prefill, "steps": steps}
        if bug is None:
            out["greedy"] = model.generate(tokens[:, :PREFILL + 3], 6, temperature=0.0)
        if bug is None and kind == "evo2":  # SE, MR, LI hold a state of fixed size
            out["bytes"] = {i: c.nbytes() for i, c in enumerate(cache.layers) if isinstance(c, HyenaCache)}
            longer = InferenceCache(model, batch_size=tokens.shape[0], capacity=6 * tokens.shape[1])
            out["bytes_longer"] = {i: c.nbytes() for i, c in enumerate(longer.layers) if isinstance(c, HyenaCache)}
        if bug is None:
            if cp == 1:
                out["recompute"] = generate_by_recompute(model, tokens[:, :PREFILL + 3], 6, temperature=0.0)
        return out
    finally:
        undo()
        parallel_state.destroy_model_parallel()


def errors(kind: str, results: list[dict]) -> float:
    config, checkpoint, _, _, tokens = case(kind)
    ref = evo2_forward(config, checkpoint, tokens) if kind == "evo2" else hyenadna_forward(config, checkpoint, tokens)
    worst = rel_err(unshard([r["prefill"] for r in results], 1, "zigzag"), ref[:, :PREFILL])
    for r in results:  # every rank returns every step's logits
        for i in range(r["steps"].shape[1]):
            worst = max(worst, rel_err(r["steps"][:, i], ref[:, PREFILL + i]))
    return worst


@pytest.mark.parametrize("kind", ["evo2", "hyenadna"])
@pytest.mark.parametrize("cp", [1, 2])
def test_cached_decoding_equals_the_reference(dist_run, kind, cp):
    results = dist_run(worker, cp, kind)
    assert errors(kind, results) < TOL
    greedy = results[0]["greedy"]
    assert all(torch.equal(r["greedy"], greedy) for r in results)
    if cp == 1:
        assert torch.equal(greedy, results[0]["recompute"])
    if kind == "evo2":  # SE, MR and LI: a state independent of the context length
        assert len(results[0]["bytes"]) == 6 and results[0]["bytes"] == results[0]["bytes_longer"]


@pytest.mark.parametrize("bug", ["modal_short", "fir_late"])
def test_decode_state_twins_fail(dist_run, bug):
    assert errors("evo2", dist_run(worker, 2, "evo2", bug)) > 1e-3
