"""The training loop under tensor parallelism (dp x tp x cp):

- the loop with `tp_helpers.TinyTPModel` at tp = 2 (with dp or cp) gives the loss curve AND
  the gradient norms of one process, with clipping active (a local-only or TP-summed norm,
  or a loss summed over TP, would change them);
- the tasks give every TP rank of a (dp, cp) position the identical batch;
- configuration errors (tp without megatron, a model without TP parameters) are raised on
  every rank before any collective;
- `LM_TORCHRUN_CASES`: the shipped LM config through ``torchrun launch/train.py`` against
  one process, at cp=2 and at tp=2 x cp=2 (four processes: the TP Hyena mixer and TP LM).
"""
from __future__ import annotations

import json
import subprocess
import sys

import megatron.core.parallel_state  # noqa: F401  (imported before the dist_run workers fork)
import pytest
import torch

from hyena_cp.data.digits import ImageSplits
from hyena_cp.data.stdlib_text import TokenSplits
from hyena_cp.parallel import unshard
from hyena_cp.distributed.mesh import destroy_parallel, init_parallel
from hyena_cp.train.config import ParallelConfig
from hyena_cp.train.tasks import ImageClassification, LanguageModeling
from tp_helpers import run_tiny
from train_helpers import LM, RTOL, ROOT, VISION, run_config

CLIP = 0.05  # tp_helpers.tiny_tp_config's train.clip_grad_norm


def _curve(dist_run, world: int, overrides: list[str], out) -> dict:
    results = dist_run(run_tiny, world, overrides, str(out))
    for r in results:  # every rank logs the global loss and the global norm
        assert r["losses"] == results[0]["losses"] and r["grad_norms"] == results[0]["grad_norms"]
    return results[0]


@pytest.mark.parametrize("dp,tp,cp", [(1, 2, 1), (2, 2, 1), (1, 2, 2)])
def test_tp_trains_like_one_process(dist_run, tmp_path, dp, tp, cp):
    single = _curve(dist_run, 1, [], tmp_path / "single")
    assert min(single["grad_norms"]) > 2 * CLIP  # clipping scales every step
    mesh = _curve(dist_run, dp * tp * cp, [f"parallel.tp={tp}", f"parallel.cp={cp}"], tmp_path / "mesh")
    for key in ("losses", "grad_norms"):
        torch.testing.assert_close(torch.tensor(mesh[key]), torch.tensor(single[key]), rtol=RTOL, atol=0)
    torch.testing.assert_close(mesh["final"]["val_loss"], single["final"]["val_loss"], rtol=RTOL, atol=0)


def _batches(cp: int, tp: int) -> dict:
    groups = init_parallel(cp, tp=tp)
    try:
        gen = torch.Generator().manual_seed(0)
        tokens = TokenSplits(train=torch.randint(0, 256, (8 * 16 + 1,), generator=gen, dtype=torch.uint8),
                             val=torch.randint(0, 256, (2 * 16 + 1,), generator=gen, dtype=torch.uint8), seq_len=16)
        images = ImageSplits(train_images=torch.randn(8, 1, 4, 4, generator=gen), train_labels=torch.arange(8) % 3,
                             val_images=torch.randn(2, 1, 4, 4, generator=gen), val_labels=torch.arange(2),
                             num_classes=3)
        lm = LanguageModeling(data=tokens, global_batch_size=4, groups=groups, seed=0)
        vision = ImageClassification(data=images, global_batch_size=4, groups=groups, seed=0)
        lm_batches = [lm.batch(s) for s in (0, 1)]
        assert all(b.cu_seqlens is None for b in lm_batches)  # unpacked data
        return {"coords": (groups.dp_rank, groups.cp_rank, groups.tp_rank),
                "lm": [(b.input_ids, b.labels) for b in lm_batches],
                "vision": [vision.batch(s) for s in (0, 1)],
                "global": [tokens.samples("train", lm.sampler.indices(s)) for s in (0, 1)]}
    finally:
        destroy_parallel(groups)


@pytest.mark.parametrize("dp,tp,cp", [(1, 2, 2), (2, 2, 1)])
def test_tp_ranks_of_a_position_get_the_identical_batch(dist_run, dp, tp, cp):
    results = dist_run(_batches, dp * tp * cp, cp, tp)
    by_coords = {r["coords"]: r for r in results}
    for (d, c, t), r in by_coords.items():
        for kind in ("lm", "vision"):
            for got, tp0 in zip(r[kind], by_coords[(d, c, 0)][kind]):
                assert all(torch.equal(a, b) for a, b in zip(got, tp0)), (kind, d, c, t)
    for step in (0, 1):  # the (dp, cp) positions of TP rank 0 hold exactly the global batch
        inputs, labels = results[0]["global"][step]
        per_replica = len(inputs) // dp
        for d in range(dp):
            for which, full in enumerate((inputs, labels)):
                shards = [by_coords[(d, c, 0)]["lm"][step][which] for c in range(cp)]
                rebuilt = unshard(shards, 1, "zigzag") if cp > 1 else shards[0]
                assert torch.equal(rebuilt, full[d * per_replica:(d + 1) * per_replica])


def test_tp_needs_megatron_in_the_config():
    assert ParallelConfig(tp=2, megatron=True).tp == 2
    with pytest.raises(ValueError, match="parallel.tp=2 needs parallel.megatron=true"):
        ParallelConfig(tp=2)
    with pytest.raises(ValueError, match="parallel.tp=0 must be >= 1"):
        ParallelConfig(tp=0, megatron=True)


def test_tp_without_megatron_is_refused_on_every_rank(dist_run, tmp_path):
    errors = dist_run(run_tiny, 2, ["parallel.tp=2", "parallel.megatron=false"], str(tmp_path),
                      expect_error=ValueError)
    assert all("parallel.tp=2 needs parallel.megatron=true" in str(e) for e in errors)


def test_tp_with_a_model_without_tp_parameters_is_refused_on_every_rank(dist_run, tmp_path):
    overrides = VISION + ["model.mixers=hyena", "parallel.cp=1", "parallel.tp=2", "parallel.megatron=true"]
    errors = dist_run(run_config, 2, "digits_hyena_tiny.py", overrides, str(tmp_path), expect_error=ValueError)
    assert all("no tensor-parallel parameters" in str(e) for e in errors)


# (processes, tp, cp, layer pattern) of `torchrun launch/train.py configs/lm_tiny.py`
LM_TORCHRUN_CASES = [(2, 1, 2, "H"), (4, 2, 2, "HA")]


@pytest.mark.parametrize("nproc,tp,cp,pattern", LM_TORCHRUN_CASES)
def test_lm_torchrun_trains_like_one_process(dist_run, tmp_path, nproc, tp, cp, pattern):
    overrides = LM + ["train.log_every=1", "parallel.timeout_s=60", f"model.layer_pattern={pattern}",
                      f"model.num_layers={len(pattern)}"]
    single = dist_run(run_config, 1, "lm_tiny.py", overrides + ["parallel.cp=1", "parallel.tp=1"],
                      str(tmp_path / "single"))[0]
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "launch/train.py", "configs/lm_tiny.py", *overrides, f"parallel.tp={tp}", f"parallel.cp={cp}",
           f"train.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)  # 20 s alone; shared CPUs
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "final validation: val_loss=" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    for key, single_key in (("loss", "losses"), ("grad_norm", "grad_norms")):
        torch.testing.assert_close(torch.tensor([r[key] for r in train_records]), torch.tensor(single[single_key]),
                                   rtol=RTOL, atol=0)
    final = json.loads((out / "final.json").read_text())
    torch.testing.assert_close(final["val_loss"], single["final"]["val_loss"], rtol=RTOL, atol=1e-7)
