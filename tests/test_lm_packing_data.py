"""Packed LM data: source files as documents in the stdlib-text windows (boundaries at file
starts, targets crossing into the next file ignored), and the LM task's loss share normalised
by the counted tokens of the replica's batch: with a counting stub one CP rank at a time,
and with the megatron Hyena LM on a packed batch under CP=2 against one process."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
# Imported at module level so the forked dist_run workers inherit megatron (~5 s per import).
from megatron.core import parallel_state
from torch import nn

from hyena_cp.megatron import HyenaMixerConfig, build_hyena_lm
from hyena_cp.parallel import group_sum, unshard
from references import rel_err

from hyena_cp.data.stdlib_text import EOS, IGNORE_INDEX, TokenSplits, load_stdlib_text
from hyena_cp.ops.packing import check_cu_seqlens, document_ids
from hyena_cp.distributed.mesh import ParallelDims, destroy_parallel, init_parallel
from hyena_cp.train.tasks import LanguageModeling


@pytest.fixture(scope="module")
def text() -> TokenSplits:
    return load_stdlib_text(seq_len=32, val_fraction=0.4, max_bytes=60_000)  # a few files in each split


def windows_with_boundaries(text: TokenSplits, split: str) -> torch.Tensor:
    starts = text.train_starts if split == "train" else text.val_starts
    windows = torch.unique(starts[starts > 0] // text.seq_len)
    return windows[windows < text.num_samples(split)]


@pytest.mark.parametrize("split", ["train", "val"])
def test_documents_start_at_file_starts(text, split):
    """Checked against the bytes themselves: a file ends with EOS (which never occurs in Python
    source), so a document starts after every EOS and exactly the EOS targets are ignored."""
    indices = windows_with_boundaries(text, split)
    assert len(indices) >= 1, "no file boundary in the data: the test would be vacuous"
    inputs, labels, cu = text.packed_samples(split, indices)
    plain_inputs, plain_labels = text.samples(split, indices)
    assert torch.equal(inputs, plain_inputs)
    for row, bounds in enumerate(cu):
        check_cu_seqlens(bounds, text.seq_len)
        eos = (inputs[row] == EOS).nonzero().flatten()
        assert bounds[1:-1].tolist() == [t + 1 for t in eos.tolist() if t + 1 < text.seq_len]
        assert (labels[row] == IGNORE_INDEX).nonzero().flatten().tolist() == eos.tolist()
        kept = labels[row] != IGNORE_INDEX
        assert torch.equal(labels[row, kept], plain_labels[row, kept])
    assert (labels == IGNORE_INDEX).any()


def test_val_split_starts_a_document(text):
    assert text.val_starts[0] == 0 and text.train_starts[0] == 0
    assert (text.val_starts.diff() > 0).all() and (text.train_starts.diff() > 0).all()


def groups(cp: int, cp_rank: int) -> SimpleNamespace:
    """What the task reads of `ParallelGroups`, for CP rank ``cp_rank`` of a dp=1 run, in one process
    (no mesh: the task's data layout needs none)."""
    return SimpleNamespace(dims=ParallelDims(world=cp, cp=cp), rank=cp_rank, dp_rank=0, cp_rank=cp_rank,
                           cp_group=None, dp_group=None, grad_group=None, device=torch.device("cpu"))


class CountingModel(nn.Module):
    """Per-token loss 1 on counted tokens (0 on IGNORE_INDEX), and it records what it was given."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, input_ids, labels, cu_seqlens=None):
        self.calls.append({"shape": tuple(input_ids.shape), "cu_seqlens": cu_seqlens})
        return (labels != IGNORE_INDEX).float()


@pytest.mark.parametrize("cp", [1, 2])
def test_loss_share_is_normalised_by_the_counted_tokens(text, cp):
    shares, boundaries = [], []
    for rank in range(cp):
        task = LanguageModeling(data=text, global_batch_size=8, pack=True, groups=groups(cp, rank), seed=0)
        # find a step whose batch holds a document boundary, so some labels are ignored
        step = next(s for s in range(task.sampler.steps_per_epoch) if task.batch(s).counted < 8 * text.seq_len)
        model = CountingModel()
        batch = task.batch(step)
        shares.append(task.loss_share(model, batch))
        boundaries.append(model.calls[0]["cu_seqlens"])
        assert model.calls[0]["shape"] == (8, text.seq_len // cp)
    assert all(torch.equal(b, boundaries[0]) for b in boundaries)  # GLOBAL boundaries, the same on every rank
    check_cu_seqlens(boundaries[0], 8 * text.seq_len, text.seq_len)
    torch.testing.assert_close(sum(shares), torch.tensor(1.0), rtol=0, atol=1e-6)  # mean over counted tokens


def test_unpacked_task_passes_no_boundaries(text):
    task = LanguageModeling(data=text, global_batch_size=4, groups=groups(1, 0), seed=0)
    model = CountingModel()
    assert task.loss_share(model, task.batch(0)) == 1.0 and model.calls[0]["cu_seqlens"] is None


def test_evaluate_counts_only_counted_tokens(text):
    task = LanguageModeling(data=text, global_batch_size=4, eval_samples=None, pack=True, groups=groups(1, 0), seed=0)
    metrics = task.evaluate(CountingModel())
    assert metrics["val_loss"] == pytest.approx(1.0)  # the ignored targets are in neither sum


def test_packing_needs_document_starts():
    plain = TokenSplits(train=torch.zeros(100, dtype=torch.uint8), val=torch.zeros(100, dtype=torch.uint8), seq_len=8)
    with pytest.raises(ValueError, match="task.pack=false"):
        plain.packed_samples("train", torch.tensor([0]))


def test_windows_of_any_length_are_padded_to_what_cp_shards(text):
    """seq_len=30 at cp=4: windows padded at the end to 32 (8 zigzag chunks of 4), inputs 0, labels
    ignored there; the counted tokens, and the packed boundaries up to the last document, unchanged."""
    data = TokenSplits(train=text.train, val=text.val, seq_len=30, train_starts=text.train_starts,
                       val_starts=text.val_starts)
    for pack in (False, True):
        shards = [LanguageModeling(data=data, global_batch_size=4, pack=pack, groups=groups(4, r), seed=0).batch(0)
                  for r in range(4)]
        assert all(b.input_ids.shape == (4, 8) for b in shards)
        labels = unshard([b.labels for b in shards], 1, "zigzag")  # b, 32
        assert (labels[:, 30:] == IGNORE_INDEX).all() and shards[0].counted == int((labels != IGNORE_INDEX).sum())
        one = LanguageModeling(data=data, global_batch_size=4, pack=pack, groups=groups(1, 0), seed=0).batch(0)
        assert one.input_ids.shape == (4, 30) and torch.equal(labels[:, :30], one.labels)
        if pack:  # the same documents, the last one of each row running into its padding
            assert torch.equal(shards[0].cu_seqlens[:-1] // 32, one.cu_seqlens[:-1] // 30)
            assert shards[0].cu_seqlens[-1] == 4 * 32


def test_document_ids_follow_the_files(text):
    indices = windows_with_boundaries(text, "train")[:4]
    inputs, _, cu = text.packed_samples("train", indices)
    for row, bounds in enumerate(cu):
        ids = document_ids(bounds, text.seq_len)
        eos = (inputs[row] == EOS).nonzero().flatten()
        # a new document begins right after every EOS inside the window
        for t in eos.tolist():
            if t + 1 < text.seq_len:
                assert ids[t + 1] == ids[t] + 1


def worker_task_with_lm(pack: bool, seq_len: int = 32, count_padding: bool = False) -> dict:
    """The task's packed batch of a step with document boundaries through the real LM (HAH)."""
    g = init_parallel(dist.get_world_size(), megatron=True)  # the run's mesh and parallel_state, cp = world
    cp_group = g.cp_group
    try:
        text = load_stdlib_text(seq_len=seq_len, val_fraction=0.4, max_bytes=60_000)
        task = LanguageModeling(data=text, global_batch_size=4, pack=pack, groups=g, seed=0)
        step = next(s for s in range(task.sampler.steps_per_epoch)
                    if len(LanguageModeling(data=text, global_batch_size=4, pack=True, groups=g, seed=0)
                           .batch(s).cu_seqlens) > 5)  # the same step packed or not: one with boundaries
        torch.manual_seed(0)
        model = build_hyena_lm(vocab_size=256, max_sequence_length=32, num_layers=3, hidden_size=16,
                               ffn_hidden_size=32, num_attention_heads=2, layer_pattern="HAH",
                               hyena=HyenaMixerConfig(num_heads=2, filter_width=8, max_len=32))
        batch = task.batch(step)
        if count_padding:  # twin: the padding's tokens counted in the normalisation
            batch = batch._replace(counted=batch.input_ids.shape[0] * task.shard_len)
        share = task.loss_share(model, batch)
        share.backward()
        return {"loss": float(group_sum(share.detach(), cp_group)),
                "grads": {n: group_sum(p.grad, cp_group) for n, p in model.named_parameters()}}
    finally:
        destroy_parallel(g)


def test_packed_task_under_cp2_trains_like_one_process(dist_run):
    single, cp2 = dist_run(worker_task_with_lm, 1, True)[0], dist_run(worker_task_with_lm, 2, True)[0]
    assert abs(cp2["loss"] - single["loss"]) < 1e-5 * single["loss"]
    for name, grad in single["grads"].items():
        assert rel_err(cp2["grads"][name], grad) < 1e-5, name  # float32
    plain = dist_run(worker_task_with_lm, 1, False)[0]  # the same windows, unpacked
    assert abs(plain["loss"] - single["loss"]) > 1e-4, "packing changed nothing: the test would be vacuous"


@pytest.mark.parametrize("pack", [False, True])
def test_windows_not_a_multiple_of_2cp_train_like_one_process(dist_run, pack):
    """30-token windows: padded to 32 at CP=2, not padded in one process; the same loss and gradients."""
    single, cp2 = dist_run(worker_task_with_lm, 1, pack, 30)[0], dist_run(worker_task_with_lm, 2, pack, 30)[0]
    assert abs(cp2["loss"] - single["loss"]) < 1e-5 * single["loss"]
    for name, grad in single["grads"].items():
        assert rel_err(cp2["grads"][name], grad) < 1e-5, name  # float32
    twin = dist_run(worker_task_with_lm, 2, pack, 30, True)[0]
    assert abs(twin["loss"] - single["loss"]) > 1e-2 * single["loss"], "counting the padding must show"


def test_padded_windows_longer_than_the_model_are_refused_naming_the_settings(text):
    from hyena_cp.train.loop import _check_padded_windows
    data = TokenSplits(train=text.train, val=text.val, seq_len=30)
    task = LanguageModeling(data=data, global_batch_size=4, groups=groups(2, 0), seed=0)  # padded to 32
    _check_padded_windows(SimpleNamespace(max_sequence_length=32), task, 2)
    with pytest.raises(ValueError, match=r"task.data.seq_len=30 is padded to 32 .* model.max_sequence_length=31"):
        _check_padded_windows(SimpleNamespace(max_sequence_length=31), task, 2)
