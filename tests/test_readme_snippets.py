"""Every ``python`` block of README.md runs: standalone ones as they are, fragments with the
few names they take from their surroundings (the input of the ``cp_group`` example, the
``spec`` / ``config`` of the megatron spec example), on as many gloo ranks as they say (the
TP=2 x CP=2 LM and its packed continuation on 4). A block no case here covers fails."""
from __future__ import annotations

import contextlib
import io
import re

import torch
import torch.distributed as dist
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state

from train_helpers import ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)


def block(marker: str) -> str:
    """The one python block containing ``marker``."""
    (found,) = [b for b in BLOCKS if marker in b]
    return found


# marker of each block -> how it is run (the test below fails for a block with no entry)
CP_GROUP = "y_local = mixer(x_local, cp_group=group)"
VISION = 'LazyConfig.load("configs/vit5_hyena_tiny.py")'
MEGATRON_LM = "parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)"
MEGATRON_SPEC = "spec.submodules.self_attention = ModuleSpec("
PACKED_LM = "loss_share = lm(x, y, packed_seq_params=make_packed_seq_params(cu))"
PACKED_MIXER = "alone = torch.cat([mixer(x[:, a:b])"
MARKERS = (CP_GROUP, VISION, MEGATRON_LM, MEGATRON_SPEC, PACKED_LM, PACKED_MIXER)


def test_every_python_block_has_a_case():
    for code in BLOCKS:
        assert sum(m in code for m in MARKERS) == 1, f"no case in tests/test_readme_snippets.py runs:\n{code}"


def worker_cp_group(code: str) -> tuple:
    world, rank = dist.get_world_size(), dist.get_rank()
    scope = {"x": torch.randn(2, 8, 6, 64), "world": world, "rank": rank, "group": dist.group.WORLD}
    exec(code, scope)
    return tuple(scope["y_local"].shape)


def test_cp_group_example(dist_run):
    assert dist_run(worker_cp_group, 2, block(CP_GROUP)) == [(2, 4, 6, 64)] * 2


def test_vision_example():
    scope: dict = {}
    exec(block(VISION), scope)
    assert scope["logits"].shape == (8, 10)


def test_packed_mixer_example_prints_a_round_off_difference():
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(block(PACKED_MIXER), {})
    assert float(printed.getvalue()) < 1e-13, printed.getvalue()


def worker_megatron_lm(code: str) -> float:
    """The TP=2 x CP=2 block and its packed continuation; the harness's group stands in for
    the block's ``init_process_group``."""
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
    from megatron.core.transformer.transformer_block import TransformerBlock

    from hyena_cp.megatron import HyenaMixerConfig, get_hyena_layer_spec

    parallel_state.initialize_model_parallel()
    try:
        scope = {"spec": get_hyena_layer_spec(HyenaMixerConfig(num_heads=4)), "TransformerBlock": TransformerBlock,
                 "config": TransformerConfig(num_layers=3, hidden_size=64, num_attention_heads=4,
                                             use_cpu_initialization=True)}
        exec(code, scope)
        return len(scope["block"].layers)
    finally:
        parallel_state.destroy_model_parallel()


def test_megatron_spec_example(dist_run):
    assert dist_run(worker_megatron_spec, 1, block(MEGATRON_SPEC)) == [3]
