"""Packed LM data: source files as documents in the stdlib-text windows (boundaries at file
starts, targets crossing into the next file ignored), and the LM task's loss share normalised
by the counted tokens of the replica's batch. In one process: the CP ranks' shares are taken
one rank at a time (their sum is the replica's loss)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hyena_cp.data.stdlib_text import EOS, IGNORE_INDEX, TokenSplits, load_stdlib_text
from hyena_cp.ops.packing import check_cu_seqlens, document_ids
from hyena_cp.parallel.dims import ParallelDims, ParallelGroups
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


def groups(cp: int, cp_rank: int) -> ParallelGroups:
    return ParallelGroups(dims=ParallelDims(world=cp, cp=cp), rank=cp_rank, dp_rank=0, cp_rank=cp_rank,
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
