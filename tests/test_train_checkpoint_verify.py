"""Verified checkpoints (`hyena_cp.train.verify`, `Checkpointer.resume_step`), on 2 ranks of the
`dist_run` pool with a tiny model, three checkpoints (steps 1, 2, 3) and the newest damaged:

- a bit flip inside a tensor's bytes (same file size), a truncated shard, a missing ``.metadata``
  or ``meta.json``: rank 0 warns, naming the folder and what is wrong, sets it aside
  (``step_00000003.unverified-1``) and every rank resumes from step 2, bitwise;
- a ``latest`` pointer that is not UTF-8 is reported, and the folders are scanned instead;
- with no checkpoint that verifies the resume refuses on every rank, naming the folder,
  and moves nothing; ``resume=false`` then sets them aside and starts from scratch;
- a save of a step whose folder is in the way sets that folder aside; rotation never deletes
  the checkpoint just saved for a newer folder from another timeline;
- `load_model_state` (export, generation) refuses a damaged folder.

The bit flip is shown to matter: read without verification, the damaged tensor differs
(nothing else would have noticed).
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from hyena_cp.distributed.decisions import broadcast_text
from hyena_cp.distributed.mesh import barrier, destroy_parallel, init_parallel
from hyena_cp.train.checkpoint import CheckpointError, Checkpointer, load_model_state
from hyena_cp.train.verify import read_pointer, verify_folder
from train_helpers import DAMAGE, damage, tiny_model_and_optimizer, tiny_steps

PROGRESS = {"epoch": 0, "global_batch_size": 8}
STEPS = (1, 2, 3)


def _save(root: str, steps: tuple[int, ...] = STEPS, keep: int = 3) -> dict[int, list[torch.Tensor]]:
    """Checkpoints at ``steps`` of the tiny model; the parameters saved at each."""
    groups = init_parallel(1)  # dp = 2 on 2 ranks
    try:
        model, optimizer = tiny_model_and_optimizer(0)
        ckpt, saved = Checkpointer(root, groups, keep=keep), {}
        for step in steps:
            tiny_steps(model, optimizer, 1)
            ckpt.save(step, model, optimizer, {**PROGRESS, "step": step})
            saved[step] = [p.detach().clone() for p in model.parameters()]
        return saved
    finally:
        destroy_parallel(groups)


def _resume(root: str, resume: bool = True) -> dict:
    """`Checkpointer.resume_step` and the load, as the trainer does; what each rank saw."""
    groups = init_parallel(1)
    try:
        model, optimizer = tiny_model_and_optimizer(7)
        ckpt = Checkpointer(root, groups)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                step, error = ckpt.resume_step(resume), None
            except CheckpointError as e:
                step, error = None, str(e)
            if step is not None and step >= 0:
                ckpt.load(step, model, optimizer)
        barrier(groups)
        return {"step": step, "error": error, "warnings": [str(w.message) for w in caught],
                "params": [p.detach() for p in model.parameters()], "listing": sorted(os.listdir(root))}
    finally:
        destroy_parallel(groups)


@pytest.fixture(scope="module")
def three(dist_run, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("three")
    saved = dist_run(_save, 2, str(root))[0]
    return root, saved


def _copy(three, tmp_path) -> Path:
    root = tmp_path / "checkpoints"
    shutil.copytree(three[0], root)
    return root


WHAT = {"bitflip": "is corrupt (its SHA-256 differs", "truncate": "is truncated", "no_metadata": ".metadata is missing",
        "no_meta_json": "meta.json is missing"}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_newest_checkpoint_is_named_set_aside_and_the_previous_one_resumes(dist_run, three, tmp_path, kind):
    root = _copy(three, tmp_path)
    name = damage(root / "step_00000003", kind)
    r0, r1 = dist_run(_resume, 2, str(root))
    assert r0["step"] == r1["step"] == 2 and r0["error"] is None
    (warning,) = r0["warnings"]  # rank 0 reports, once
    assert str(root / "step_00000003") in warning and WHAT[kind] in warning and "resuming from step_00000002" in warning
    assert name in warning and "step_00000003.unverified-1" in warning and not r1["warnings"]
    for r in (r0, r1):
        assert all(torch.equal(a, b) for a, b in zip(r["params"], three[1][2]))
    assert r0["listing"] == ["latest", "step_00000001", "step_00000002", "step_00000003.unverified-1"]
    assert (root / "latest").read_text() == "step_00000002\n"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_bit_flip_changes_a_tensor_that_only_the_checksum_notices(three, tmp_path):
    """The negative twin of the bit flip above: read past the checksums, DCP loads the damaged
    tensor without complaint, and it differs from the saved one."""
    root = _copy(three, tmp_path)
    folder = root / "step_00000003"
    before = load_model_state(folder)
    damage(folder, "bitflip")
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_model_state(folder)
    raw = {f"model/{k}": torch.empty_like(v) for k, v in before.items()}
    dcp.load(raw, checkpoint_id=str(folder), no_dist=True)  # what a load without checksums gets
    changed = [k for k, v in before.items() if not torch.equal(raw[f"model/{k}"], v)]
    assert len(changed) == 1


def test_a_pointer_that_is_not_text_is_reported_and_the_folders_scanned(dist_run, three, tmp_path):
    root = _copy(three, tmp_path)
    (root / "latest").write_bytes(b"\xff\xfe\x00step\x80")
    r0, r1 = dist_run(_resume, 2, str(root))
    assert r0["step"] == r1["step"] == 3
    (warning,) = r0["warnings"]
    assert str(root / "latest") in warning and "not UTF-8" in warning and "step_* folders" in warning
    assert (root / "latest").read_text() == "step_00000003\n"  # repaired


@pytest.mark.parametrize("content,problem", [
    (b"\xff\xfe\x00step\x80", "is not UTF-8 text (8 bytes, starting b'\\xff\\xfe\\x00step\\x80')"),
    (b"hello world\n", "does not name a checkpoint folder (it holds 'hello world', not step_<N>)"),
    (b"step_00000009\n", "names step_00000009, which does not exist"),
    (b"step_00000002\n", None),
])
def test_the_pointer_is_read_as_text_naming_an_existing_folder(tmp_path, content, problem):
    (tmp_path / "step_00000002").mkdir()
    (tmp_path / "latest").write_bytes(content)
    name, found = read_pointer(tmp_path)
    assert found == (None if problem is None else f"{tmp_path / 'latest'} {problem}")
    assert name == (None if problem else "step_00000002")


def test_with_none_verified_the_resume_refuses_on_every_rank_and_moves_nothing(dist_run, three, tmp_path):
    root = _copy(three, tmp_path)
    for step in STEPS:
        damage(root / f"step_{step:08d}", "no_meta_json")
    listing = sorted(os.listdir(root))
    r0, r1 = dist_run(_resume, 2, str(root))
    assert r0["error"] == r1["error"] and r0["step"] is None
    assert f"no checkpoint in {root} verifies" in r0["error"] and "train.resume=false" in r0["error"]
    assert all(f"step_{s:08d}: meta.json is missing" in r0["error"] for s in STEPS)
    assert sorted(os.listdir(root)) == listing
    # train.resume=false: start afresh, the unverifiable folders kept aside, none overwritten
    r0, r1 = dist_run(_resume, 2, str(root), False)
    assert r0["step"] == r1["step"] == -1 and len(r0["warnings"]) == 3
    assert r0["listing"] == ["latest"] + [f"step_{s:08d}.unverified-1" for s in STEPS]


def test_resume_false_still_refuses_a_verified_checkpoint(dist_run, three, tmp_path):
    root = _copy(three, tmp_path)
    with pytest.raises(Exception, match="train.resume=true"):
        dist_run(_resume, 2, str(root), False)


def _save_over(root: str) -> list[str]:
    """Resume from step 1 (``latest`` set back) and save steps 2 and 3 again with keep=1."""
    groups = init_parallel(1)
    try:
        model, optimizer = tiny_model_and_optimizer(0)
        ckpt = Checkpointer(root, groups, keep=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ckpt.load(ckpt.resume_step(), model, optimizer)
            tiny_steps(model, optimizer, 1)
            ckpt.save(2, model, optimizer, {**PROGRESS, "step": 2})
            listing = sorted(os.listdir(root))
        return [listing, [str(w.message) for w in caught]]
    finally:
        destroy_parallel(groups)


def test_a_save_sets_aside_the_folder_in_its_way_and_rotation_keeps_the_new_one(dist_run, three, tmp_path):
    root = _copy(three, tmp_path)
    damage(root / "step_00000003", "truncate")  # an unverifiable newer folder, never examined on resume
    (root / "latest").write_text("step_00000001\n")
    (listing, warned), (_, quiet) = dist_run(_save_over, 2, str(root))
    # keep=1: step 1 goes; step 3 (newer: another timeline) stays; the old step 2 is kept aside
    assert listing == ["latest", "step_00000002", "step_00000002.replaced-1", "step_00000003"]
    assert any("step_00000002 was in the way" in w and "step_00000002.replaced-1" in w for w in warned)
    assert not quiet
    assert verify_folder(root / "step_00000002") is None and (root / "latest").read_text() == "step_00000002\n"


def test_load_model_state_refuses_a_damaged_folder_naming_it(three, tmp_path):
    root = _copy(three, tmp_path)
    damage(root / "step_00000002", "no_metadata")
    with pytest.raises(CheckpointError, match=r"step_00000002 failed verification: \.metadata is missing"):
        load_model_state(root / "step_00000002")


def _broadcast_texts() -> list[str]:
    groups = init_parallel(1)
    try:
        return [broadcast_text(f"{text} from rank {groups.rank}" if text else "", groups)
                for text in ("", "step_00000003: meta.json is missing; é")]
    finally:
        destroy_parallel(groups)


def test_rank_0s_decision_text_reaches_every_rank_even_when_empty(dist_run):
    """The resume's outcome travels as rank 0's text (`broadcast_text`), "" included."""
    assert dist_run(_broadcast_texts, 2) == [["", "step_00000003: meta.json is missing; é from rank 0"]] * 2
