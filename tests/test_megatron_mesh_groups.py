"""One route for process groups: the megatron LM built on the run mesh's groups
(`hyena_cp.megatron.groups.mesh_pg_collection`) with megatron's ``parallel_state`` never
initialised runs TP x CP (2 x 2) and equals the single-process model (tests/lm_parity.py: logits,
the model's own vocab-parallel loss, every gradient; greedy generation), builds its sharded state
dict, and every group any of its modules holds
IS one of the mesh's groups (object identity). Negative twins: the same model built from
``parallel_state`` holds groups of the same ranks that are not the mesh's, and the identity
check reports them; a loss reduced over the wrong group differs.

The vocab-parallel loss over a given TP group equals megatron-core's own (which reads
``parallel_state``) to the bit, values and gradients. The trainer's `build_model` hands the mesh's
groups to a model that takes ``pg_collection`` and leaves any other model alone, and the LM's TP x CP
training (losses, gradient norms, evaluation, checkpoints) is the same to the bit without ``parallel_state``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state, tensor_parallel
from torch import nn
from torch.distributed import ProcessGroup

from hyena_cp.distributed.mesh import ParallelGroups, destroy_parallel, init_parallel
from hyena_cp.lazy import LazyCall
from hyena_cp.megatron import build_hyena_lm, compat
from hyena_cp.megatron.compat import ProcessGroupCollection
from hyena_cp.megatron.groups import MESH_PG_FIELDS, mesh_pg_collection
from hyena_cp.parallel import tp_partition
from hyena_cp.train.build_model import build_model as build_run_model
from train_helpers import LM, run_config
from lm_parity import ParityCase, assert_parity, batch, build_model, forward_backward, load_full_weights, perturb

GROUP_ATTRS = ("tp_group", "cp_group", "_tp_group")  # megatron's layers, our wrappers, TE attention


def held_groups(model: nn.Module) -> dict[str, ProcessGroup]:
    """Every process group a module of ``model`` holds, by ``module.attribute`` path."""
    held = {}
    for name, module in model.named_modules():
        for attr in GROUP_ATTRS:
            if isinstance(getattr(module, attr, None), ProcessGroup):
                held[f"{name}.{attr}"] = getattr(module, attr)
        collection = getattr(module, "pg_collection", None)
        for field, group in (vars(collection) if collection is not None else {}).items():
            if isinstance(group, ProcessGroup):
                held[f"{name}.pg_collection.{field}"] = group
    return held


def foreign_groups(model: nn.Module, groups: ParallelGroups) -> list[str]:
    """The paths of `held_groups` that are not one of the mesh's group objects."""
    mesh = [groups.submesh(dim).get_group() for dim in MESH_PG_FIELDS]
    return sorted(path for path, group in held_groups(model).items() if not any(group is g for g in mesh))


def worker_mesh_groups(case: ParityCase) -> dict:
    groups = init_parallel(case.cp, tp=case.tp)  # megatron=False: parallel_state is not initialised
    try:
        assert not parallel_state.model_parallel_is_initialized()
        rank = dist.get_rank()
        singles = [dist.new_group([r]) for r in range(dist.get_world_size())]  # collective: every rank makes all
        reference = build_model(case, ProcessGroupCollection(tp=singles[rank], pp=None, cp=singles[rank]))
        perturb(reference)
        inputs, labels = batch(case)
        model = build_model(case, mesh_pg_collection(groups), tp_size=case.tp)
        load_full_weights(model, reference, case.tp, groups.tp_rank)
        out = {"tp_rank": groups.tp_rank, "cp_rank": groups.cp_rank,
               "ref": forward_backward(reference, inputs, labels, 1, 0) if rank == 0 else None,
               "exact": forward_backward(model, inputs, labels, case.cp, groups.cp_rank),
               "held": sorted(held_groups(model)), "foreign": foreign_groups(model, groups),
               "sharded_keys": len(model.sharded_state_dict()),  # megatron's would read dp_cp from parallel_state
               "generated": model.eval().generate(inputs[:, :20], 4, temperature=0.0),
               "ref_generated": reference.eval().generate(inputs[:, :20], 4, temperature=0.0) if rank == 0 else None,
               "parallel_state_after": parallel_state.model_parallel_is_initialized()}
        out["partitions"] = {n: tp_partition(p) for n, p in model.named_parameters()}
        # negative twin: the same model from parallel_state (same ranks, megatron's own group objects)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=case.tp, context_parallel_size=case.cp)
        try:
            out["foreign_under_parallel_state"] = foreign_groups(build_model(case, None, tp_size=case.tp), groups)
        finally:
            parallel_state.destroy_model_parallel()
        return out
    finally:
        destroy_parallel(groups)


def test_lm_on_mesh_groups_without_parallel_state_matches_reference(dist_run):
    results = dist_run(worker_mesh_groups, 4, ParityCase(pattern="HHA", tp=2, cp=2))
    assert_parity(results)
    for r in results:
        assert not r["parallel_state_after"], "building or running the model initialised parallel_state"
        assert r["foreign"] == [], f"modules hold groups that are not the mesh's: {r['foreign']}"
        assert r["sharded_keys"] > 0
        assert torch.equal(r["generated"], results[0]["ref_generated"])
        paths = r["held"]  # the identity check saw the groups that matter
        assert any(p.endswith("output_layer.tp_group") for p in paths), paths
        assert any("self_attention.cp_group" in p for p in paths), paths  # Hyena mixer and attention
        assert any("linear_fc1.tp_group" in p for p in paths), paths
        assert r["foreign_under_parallel_state"], "the identity check does not see megatron's own groups"
        assert any(p.endswith("output_layer.tp_group") for p in r["foreign_under_parallel_state"])


# ------------------------------------------------------------------ the vocab-parallel loss
def worker_cross_entropy() -> dict:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    own_tp = dist.new_group([0, 1])  # the same ranks as parallel_state's TP group, another object
    single = [dist.new_group([r]) for r in range(2)][dist.get_rank()]
    try:
        gen = torch.Generator().manual_seed(7)
        full = torch.randn(5, 3, 16, generator=gen) * 4  # s, b, vocab
        target = torch.randint(0, 16, (5, 3), generator=gen)
        local = full.chunk(2, dim=-1)[dist.get_rank()]
        weights = torch.rand(5, 3, generator=gen)
        out = {}
        for name, fn in (("megatron", lambda x: tensor_parallel.vocab_parallel_cross_entropy(x, target)),
                         ("ours", lambda x: compat.vocab_parallel_cross_entropy(x, target, own_tp)),
                         ("wrong_group", lambda x: compat.vocab_parallel_cross_entropy(x, target, single))):
            x = local.clone().requires_grad_()
            loss = fn(x)
            (loss * weights).sum().backward()
            out[name] = (loss.detach(), x.grad)
        return out
    finally:
        parallel_state.destroy_model_parallel()


def test_vocab_parallel_loss_over_a_given_group_is_megatrons_to_the_bit(dist_run):
    for r in dist_run(worker_cross_entropy, 2):
        (loss, grad), (our_loss, our_grad) = r["megatron"], r["ours"]
        assert torch.equal(loss, our_loss) and torch.equal(grad, our_grad)
        assert not torch.allclose(r["wrong_group"][0], loss, rtol=1e-3), "the wrong group's loss is not wrong"


# ------------------------------------------------------------------ the trainer's model builder
class NoGroupsModel(nn.Module):
    """A model whose builder takes no ``pg_collection``: built as configured."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.linear = nn.Linear(width, width)


def worker_build_run_model() -> dict:
    groups = init_parallel(1, megatron=True)
    try:
        lm = build_run_model(LazyCall(build_hyena_lm)(vocab_size=32, max_sequence_length=16, num_layers=1,
                                                      hidden_size=16, layer_pattern="H"), groups, megatron=True)
        plain = build_run_model(LazyCall(NoGroupsModel)(), groups, megatron=True)
        from_parallel_state = build_run_model(LazyCall(build_hyena_lm)(vocab_size=32, max_sequence_length=16,
                                                                       num_layers=1, hidden_size=16,
                                                                       layer_pattern="H"), groups, megatron=False)
        return {"lm": foreign_groups(lm, groups), "lm_held": len(held_groups(lm)), "plain": type(plain).__name__,
                "from_parallel_state": foreign_groups(from_parallel_state, groups)}
    finally:
        destroy_parallel(groups)


def test_trainer_builds_megatron_models_on_the_mesh_groups(dist_run):
    (r,) = dist_run(worker_build_run_model, 1)
    assert r["lm"] == [] and r["lm_held"] > 0, r
    assert r["plain"] == "NoGroupsModel"
    assert r["from_parallel_state"], "without megatron=True the model reads parallel_state: the twin must differ"


# ------------------------------------------------------------------ the training loop
def run_lm(overrides: list[str], output_dir: str, with_parallel_state: bool) -> dict:
    """The shipped LM config through `train`; ``with_parallel_state=False`` skips megatron's
    ``parallel_state`` (init_parallel's private initialiser, patched out in this worker only)."""
    import hyena_cp.distributed.mesh as mesh

    initialise = mesh._init_megatron
    if not with_parallel_state:
        assert not parallel_state.model_parallel_is_initialized()  # a reused pool worker starts clean
        mesh._init_megatron = lambda *args, **kwargs: None
    try:
        summary = run_config("lm_tiny.py", overrides, output_dir)
    finally:
        mesh._init_megatron = initialise
    return {"summary": summary, "checkpoints": sorted(p.name for p in (Path(output_dir) / "checkpoints").iterdir())}


def test_lm_training_needs_no_parallel_state(dist_run, tmp_path):
    """TP x CP training (loss, grad norms, evaluation, checkpoints) reads no group from
    ``parallel_state``: the run without it is the run with it, to the bit."""
    overrides = LM + ["model.layer_pattern=HA", "model.num_layers=2", "parallel.tp=2", "parallel.cp=2",
                      "train.ckpt_every=2"]
    runs = {flag: dist_run(run_lm, 4, overrides, str(tmp_path / str(flag)), flag) for flag in (True, False)}
    with_ps, without = runs[True][0], runs[False][0]
    assert without["checkpoints"] and without["checkpoints"] == with_ps["checkpoints"]
    for key in ("losses", "grad_norms", "final"):
        assert without["summary"][key] == with_ps["summary"][key], key


@pytest.mark.parametrize("fields", [dict(pp=None), dict(tp=None, pp=None), dict(cp=None)])
def test_a_collection_without_a_tp_group_or_pp_is_refused(fields):
    with pytest.raises(ValueError, match="pg_collection needs tp"):
        compat.resolve_pg_collection(ProcessGroupCollection(**fields))
