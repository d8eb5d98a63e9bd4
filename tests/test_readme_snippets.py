"""Every ``python`` block of README.md and docs/*.md runs (a block shown on several pages runs
once, `doc_pages`):

- a whole script (first line ``# name.py: torchrun ...``, the README's ``cp_group`` example) is
  saved under its name and run with that command, as a reader would;
- fragments get the few names they take from their surroundings (the ``spec`` / ``config`` of
  the megatron spec example, the saved checkpoint and inputs of the interop example) and run on
  as many gloo ranks as they say (the TP=2 x CP=2 LM and its packed continuation on 4);
- every other block must be standalone: it runs in one process with nothing defined, from the
  repository root.

A block that fails, or that needs something no case here gives it, fails the test."""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state

from doc_pages import python_blocks, script_blocks
from train_helpers import ROOT

BLOCKS = python_blocks()  # code -> page
SCRIPTS = script_blocks()  # name -> (command, code)


def block(marker: str) -> str:
    """The one python block containing ``marker``."""
    (found,) = [b for b in BLOCKS if marker in b]
    return found


# marker of each fragment -> the test that gives it its surroundings
VISION = 'LazyConfig.load("configs/vit5_hyena_tiny.py")'
MEGATRON_LM = "pg_collection=mesh_pg_collection(groups))"
MEGATRON_SPEC = "spec.submodules.self_attention = ModuleSpec("
PACKED_LM = "loss_share = lm(x, y, packed_seq_params=make_packed_seq_params(cu))"
PACKED_MIXER = "alone = torch.cat([mixer(x[:, a:b])"
INTEROP = 'cfg, state = convert(saved["config"], saved["state_dict"])'
EVO2 = "cfg, state = evo2.convert(config, checkpoint)"
MARKERS = (VISION, MEGATRON_LM, MEGATRON_SPEC, PACKED_LM, PACKED_MIXER, INTEROP, EVO2)


def is_script(code: str) -> bool:
    return any(code == script for _, script in SCRIPTS.values())


STANDALONE = {code: page for code, page in BLOCKS.items() if not is_script(code) and not any(m in code for m in MARKERS)}


def test_every_fragment_has_one_case_and_the_docs_show_the_expected_blocks():
    for code in BLOCKS:
        assert sum(m in code for m in MARKERS) <= 1, f"two cases in tests/test_readme_snippets.py match:\n{code}"
    for marker in MARKERS:
        block(marker)
    assert "cp_hello.py" in SCRIPTS, "the README's self-contained cp_group script"
    assert any(page == "docs/operators.md" for page in STANDALONE.values()), "operators.md's examples"


def test_cp_group_script_runs_under_torchrun(tmp_path):
    """The README's script, saved under its name and run with the command of its first line."""
    command, code = SCRIPTS["cp_hello.py"]
    (tmp_path / "cp_hello.py").write_text(code)
    words = command.split()
    assert words[0] == "torchrun" and words[-1] == "cp_hello.py", command
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *words[1:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the two ranks share stdout, and an unbuffered print writes its text and its newline apart, so
    # one rank's line may run into the other's: read the reports, not the lines
    reports = sorted(re.findall(r"rank (\d+): x_local (\(.*?\)) -> y_local (\(.*?\)), "
                                r"max \|y_cp - y_one_process\| = (\d\.\de[-+]\d+)", done.stdout))
    assert [r[0] for r in reports] == ["0", "1"], done.stdout
    for _, x_shape, y_shape, err in reports:
        assert x_shape == y_shape == "(2, 8, 12, 64)", done.stdout
        # fp32 round-off of a C=64 layer is ~1e-6; a wrong shard or a missing halo is O(1)
        assert float(err) < 1e-4, done.stdout


@pytest.mark.parametrize("code", list(STANDALONE), ids=[f"{i:02d}-{page}" for i, page in enumerate(STANDALONE.values())])
def test_standalone_block_runs(code, monkeypatch):
    monkeypatch.chdir(ROOT)
    exec(code, {"__name__": "__main__"})


def test_vision_example(monkeypatch):
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(block(VISION), scope)
    assert scope["logits"].shape == (8, 10)


def test_packed_mixer_example_prints_a_round_off_difference():
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(block(PACKED_MIXER), {})
    assert float(printed.getvalue()) < 1e-13, printed.getvalue()


def worker_megatron_lm(code: str) -> float:
    """The TP=2 x CP=2 block and its packed continuation; the block's ``init_parallel`` joins the
    harness's default group (``init_process_group`` is a no-op here should a block call it)."""
    init, dist.init_process_group = dist.init_process_group, lambda *args, **kwargs: None
    try:
        scope: dict = {}
        exec(code, scope)
        return float(scope["loss_share"].detach())
    finally:
        dist.init_process_group = init
        parallel_state.destroy_model_parallel()


def test_megatron_lm_and_packed_examples(dist_run):
    shares = dist_run(worker_megatron_lm, 4, block(MEGATRON_LM) + "\n" + block(PACKED_LM))
    assert all(torch.isfinite(torch.tensor(shares)))


def worker_megatron_spec(code: str) -> int:
    from megatron.core.transformer import TransformerConfig

    from hyena_cp.megatron import HyenaMixerConfig, get_hyena_layer_spec

    parallel_state.initialize_model_parallel()
    try:
        scope = {"spec": get_hyena_layer_spec(HyenaMixerConfig(num_heads=4)),
                 "config": TransformerConfig(num_layers=3, hidden_size=64, num_attention_heads=4,
                                             use_cpu_initialization=True)}
        exec(code, scope)
        return len(scope["block"].layers)
    finally:
        parallel_state.destroy_model_parallel()


def test_megatron_spec_example(dist_run):
    assert dist_run(worker_megatron_spec, 1, block(MEGATRON_SPEC)) == [3]


def worker_interop(code: str, folder: str) -> float:
    """The interop block in a folder holding ``nvsub_mixer.pt`` (an nvSubquadratic 2-D mixer's
    config and state_dict), with the global ``x``, this rank's ``x_local`` and the group."""
    from hyena_cp.parallel import shard

    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 16)
    scope = {"x": x, "x_local": shard(x, 1, "rows", world, rank), "group": dist.group.WORLD}
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        exec(code, scope)
    finally:
        os.chdir(cwd)
    # the converted mixer under CP gives this rank's rows of its single-process output
    return (scope["y_local"] - shard(scope["y"], 1, "rows", world, rank)).abs().max().item()


def test_interop_example(dist_run, tmp_path):
    import nvsub_reference
    from test_interop_nvsubquadratic import vit_recipe

    cfg = vit_recipe(c=16, l_cache=8)  # the ViT-5 Hyena recipe's 2-D mixer
    state = nvsub_reference.random_state_dict(cfg, torch.Generator().manual_seed(0))
    torch.save({"config": cfg, "state_dict": state}, tmp_path / "nvsub_mixer.pt")
    assert re.search(r"torch\.load\(\"nvsub_mixer\.pt\"\)", block(INTEROP))
    errors = dist_run(worker_interop, 2, block(INTEROP), str(tmp_path))
    assert max(errors) < 1e-5, errors  # fp32 round-off; a wrong shard is O(1)


def worker_evo2(code: str, folder: str) -> tuple[tuple, bool]:
    """The Evo 2 conversion block in a folder holding vortex-format files of a tiny random model."""
    import os

    cwd = os.getcwd()
    os.chdir(folder)
    scope: dict = {"__name__": "__main__"}
    try:
        exec(code, scope)
    finally:
        parallel_state.destroy_model_parallel()
        os.chdir(cwd)
    logits = scope["logits"]
    return tuple(logits.shape), bool(torch.isfinite(logits).all())


def test_evo2_conversion_example(dist_run, tmp_path):
    import yaml
    from striped_references import EVO2_TINY, random_evo2_checkpoint

    (tmp_path / "evo2-1b-8k.yml").write_text(yaml.safe_dump(dict(EVO2_TINY)))
    torch.save(random_evo2_checkpoint(dict(EVO2_TINY), seed=1), tmp_path / "evo2_1b_base.pt")
    assert dist_run(worker_evo2, 1, block(EVO2), str(tmp_path)) == [((1, 64, EVO2_TINY["vocab_size"]), True)]
