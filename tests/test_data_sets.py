"""Embedded data sets and their sharding: digits, stdlib bytes, global batches, DP/CP shares."""
from __future__ import annotations

import pytest
import torch

from hyena_cp.data import (GlobalBatchSampler, cp_shard_tokens, dp_slice, eval_range, load_digits_splits,
                           load_stdlib_text)
from hyena_cp.parallel.layouts import unshard


@pytest.fixture(scope="module")
def digits():
    return load_digits_splits(img_size=16, val_fraction=0.2, seed=0)


def test_digits_shapes_and_normalisation(digits):
    assert digits.train_images.shape[1:] == (1, 16, 16) and digits.val_images.shape[1:] == (1, 16, 16)
    assert len(digits.train_images) + len(digits.val_images) == 1797
    assert digits.num_classes == 10 and digits.train_labels.dtype == torch.int64
    torch.testing.assert_close(digits.train_images.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(digits.train_images.std(), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_digits_split_is_stratified_seeded_and_disjoint(digits):
    again = load_digits_splits(img_size=16, val_fraction=0.2, seed=0)
    assert torch.equal(again.val_images, digits.val_images)
    other = load_digits_splits(img_size=16, val_fraction=0.2, seed=1)
    assert not torch.equal(other.val_labels, digits.val_labels)
    counts = torch.bincount(digits.val_labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ~20% of each class of ~180
    train_rows = {tuple(x.flatten().tolist()) for x in digits.train_images[:, :, ::4, ::4]}
    overlap = sum(tuple(x.flatten().tolist()) in train_rows for x in digits.val_images[:, :, ::4, ::4])
    assert overlap < 5  # only accidental duplicates of the raw data set itself


@pytest.mark.parametrize("bad", [dict(img_size=4), dict(val_fraction=1.0)])
def test_digits_bad_arguments(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        load_digits_splits(**bad)


def test_stdlib_text_samples_are_shifted_windows():
    text = load_stdlib_text(seq_len=32, val_fraction=0.1, max_bytes=20_000)
    assert len(text.train) + len(text.val) == 20_000 and text.vocab_size == 256
    assert text.train.dtype == torch.uint8
    inputs, labels = text.samples("train", torch.tensor([0, 5]))
    assert inputs.shape == labels.shape == (2, 32) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    assert torch.equal(inputs[1], text.train[5 * 32:6 * 32].long())
    assert text.num_samples("val") == (len(text.val) - 1) // 32
    assert bytes(text.train[:20].tolist()).isascii()  # real Python source
    assert torch.equal(load_stdlib_text(seq_len=32, val_fraction=0.1, max_bytes=20_000).val, text.val)


def test_stdlib_text_bad_arguments():
    with pytest.raises(ValueError, match="max_bytes"):
        load_stdlib_text(seq_len=64, max_bytes=100)


def test_sampler_epochs_are_permutations_and_depend_only_on_step():
    sampler = GlobalBatchSampler(num_samples=50, global_batch_size=8, seed=3)
    assert sampler.steps_per_epoch == 6
    epoch0 = torch.cat([sampler.indices(s) for s in range(6)])
    assert len(set(epoch0.tolist())) == 48  # no repeats; the last 2 samples of the permutation are dropped
    epoch1 = torch.cat([sampler.indices(s) for s in range(6, 12)])
    assert not torch.equal(epoch0, epoch1) and sampler.epoch(6) == 1
    fresh = GlobalBatchSampler(num_samples=50, global_batch_size=8, seed=3)  # e.g. after a resume
    assert torch.equal(fresh.indices(9), sampler.indices(9))
    with pytest.raises(ValueError, match="global_batch_size"):
        GlobalBatchSampler(num_samples=5, global_batch_size=8, seed=0)


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_dp_slices_partition_the_global_batch(dp):
    batch = torch.arange(100, 108)
    assert torch.equal(torch.cat([dp_slice(batch, dp, r) for r in range(dp)]), batch)
    with pytest.raises(ValueError, match="divisible by the data-parallel size"):
        dp_slice(torch.arange(6), 4, 0)


@pytest.mark.parametrize("n,dp", [(10, 3), (360, 2), (2, 4)])
def test_eval_ranges_cover_every_sample_once(n, dp):
    covered = [i for r in range(dp) for i in eval_range(n, dp, r)]
    assert covered == list(range(n))


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_cp_token_shards_are_the_zigzag_layout(cp):
    tokens = torch.arange(2 * 16).reshape(2, 16)
    pieces = [cp_shard_tokens(tokens, cp, r) for r in range(cp)]
    assert all(p.shape == (2, 16 // cp) for p in pieces)
    assert torch.equal(unshard(pieces, 1, "zigzag"), tokens)
    if cp == 2:  # chunks of 4: rank 0 holds chunks 0 and 3
        assert pieces[0][0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]


def test_stdlib_text_as_nucleotides_is_the_same_text_four_bases_per_byte():
    from hyena_cp.data.stdlib_text import as_nucleotides

    text = load_stdlib_text(seq_len=16, max_bytes=6000)
    bases = load_stdlib_text(seq_len=16, max_bytes=6000, alphabet="nucleotides")
    assert bases.vocab_size == 12 and set(bases.train.unique().tolist()) <= {7, 8, 9, 10}  # A, C, G, T
    assert torch.equal(bases.train[:4000], as_nucleotides(text.train[:1000]))
    assert torch.equal(bases.train_starts, 4 * text.train_starts)
    digits = (bases.train[:4000].long() - 7).view(-1, 4)  # two bits per base, most significant first
    assert torch.equal((digits * torch.tensor([64, 16, 4, 1])).sum(1), text.train[:1000].long())
