"""Associative recall (`hyena_cp.data.associative_recall`, `hyena_cp.train.recall`):

- the generator: the Hyena paper's format (keys, values, ``=>``, a key that occurred), one map
  per sample, the answer is the queried key's value, seeded; ``targets="values"`` labels
  exactly the keys an earlier pair determines;
- the loss mask: the training loss of the real LM is the cross-entropy at the query position
  alone (or at the labelled keys, with ``targets="values"``);
- the task on the shipped config, shrunk: CP=2 (Hyena, and attention + RoPE) trains like one
  process over a curriculum of two lengths (losses, gradient norms, accuracy; fp32, 1e-5),
  and the same data cut into contiguous blocks instead of zigzag (a plausible bug) does not.
"""
from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import megatron.core.parallel_state  # noqa: F401  (imported before the dist_run workers fork)
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

from hyena_cp.data.associative_recall import (FreshBatches, associative_recall, noop_token, query_token,
                                              recall_vocab_size)
from hyena_cp.data.stdlib_text import IGNORE_INDEX
from hyena_cp.lazy import LazyConfig, instantiate
from hyena_cp.parallel import shard
from hyena_cp.train.config import with_defaults
from hyena_cp.train.recall import AssociativeRecall
from train_helpers import CONFIGS, QUIET, RTOL, run_config

K, V = 14, 14  # the paper's keys and values (vocabulary 30)
# recall_ar_2k.py shrunk: two curriculum lengths (32 then 64 tokens), dense labels (more of them
# cross ranks), 4 filter groups so CP=2 and CP=4 divide them
TINY = QUIET + ["model.hidden_size=16", "model.ffn_hidden_size=32", "model.max_sequence_length=64",
                "model.hyena.num_heads=4", "model.hyena.filter_width=8", "model.hyena.max_len=64",
                "task.lengths=[32,64]", "task.length_steps=[0,2]", "task.global_batch_size=4", "task.eval_len=64",
                "task.extra_eval_lens=[32]", "task.eval_samples=6", "task.eval_batch_size=4", "task.targets=values",
                "train.steps=4"]


def sample(n: int = 64, seq_len: int = 40, seed: int = 0, targets: str = "query"):
    return associative_recall(n, seq_len, generator=torch.Generator().manual_seed(seed), targets=targets)


def fake_groups(cp: int = 1, dp: int = 1) -> SimpleNamespace:
    """What the task reads of `ParallelGroups` before any collective (rank 0 of each dimension)."""
    return SimpleNamespace(dims=SimpleNamespace(cp=cp, dp=dp, tp=1), cp_rank=0, dp_rank=0, device=torch.device("cpu"))


# ------------------------------------------------------------------------------------ generator
def test_samples_have_the_papers_format_and_the_answer_is_the_queried_value():
    inputs, labels = sample()
    assert inputs.shape == labels.shape == (64, 40) and inputs.dtype == labels.dtype == torch.long
    assert recall_vocab_size(K, V) == 30 and query_token(K, V) == 28 and noop_token(K, V) == 29
    keys, values = inputs[:, 0:38:2], inputs[:, 1:38:2]
    assert ((keys >= 0) & (keys < K)).all() and ((values >= K) & (values < K + V)).all()
    assert (inputs[:, -2] == query_token(K, V)).all() and (inputs[:, -1] < K).all()
    assert (labels[:, :-1] == IGNORE_INDEX).all()
    for b in range(len(inputs)):
        value_of = {}
        for k, v in zip(keys[b].tolist(), values[b].tolist()):
            assert value_of.setdefault(k, v) == v, "one map per sample: a key always has the same value"
        query = int(inputs[b, -1])
        assert query in value_of and int(labels[b, -1]) == value_of[query]
    assert len(set(inputs[:, -1].tolist())) == K  # the query is not always the same key
    assert len(set(labels[:, -1].tolist())) > V // 2  # nor the answer the same value


def test_samples_are_a_function_of_the_seed():
    torch.testing.assert_close(sample(seed=3), sample(seed=3), rtol=0, atol=0)
    assert not torch.equal(sample(seed=3)[0], sample(seed=4)[0])
    steps = FreshBatches(global_batch_size=2, seed=5)
    assert torch.equal(torch.randint(9, (8,), generator=steps.generator(7)),
                       torch.randint(9, (8,), generator=FreshBatches(global_batch_size=2, seed=5).generator(7)))
    assert steps.generator(7).initial_seed() != steps.generator(8).initial_seed()
    assert steps.generator(7).initial_seed() != FreshBatches(global_batch_size=2, seed=6).generator(7).initial_seed()


def test_values_targets_label_the_keys_an_earlier_pair_determines():
    inputs, labels = sample(targets="values")
    query_inputs, query_labels = sample(targets="query")
    assert torch.equal(inputs, query_inputs) and torch.equal(labels[:, -1], query_labels[:, -1])
    assert (labels[:, 1:-1:2] == IGNORE_INDEX).all()  # values and the marker: never labelled
    for b in range(len(inputs)):
        row, seen = inputs[b].tolist(), set()
        for i in range(0, 38, 2):
            expected = row[i + 1] if row[i] in seen else IGNORE_INDEX
            assert int(labels[b, i]) == expected, (b, i)
            seen.add(row[i])


@pytest.mark.parametrize("kwargs,match", [(dict(seq_len=7), "even"), (dict(seq_len=2), ">= 4"),
                                          (dict(targets="all"), "targets"), (dict(num_samples=0), "num_samples")])
def test_bad_generator_arguments_raise(kwargs, match):
    args = dict(num_samples=2, seq_len=8, generator=torch.Generator(), targets="query") | kwargs
    with pytest.raises(ValueError, match=match):
        associative_recall(**args)


# ------------------------------------------------------------------------------------ task
def make_task(**kwargs) -> AssociativeRecall:
    args = dict(lengths=[32, 64], length_steps=[0, 5], global_batch_size=4, groups=fake_groups(), seed=0) | kwargs
    return AssociativeRecall(**args)


def test_curriculum_sets_each_steps_length():
    task = make_task(lengths=[8, 32, 64], length_steps=[0, 3, 10])
    assert [task.seq_len(s) for s in (0, 2, 3, 9, 10, 500)] == [8, 8, 32, 32, 64, 64]
    assert task.batch(9).input_ids.shape == (4, 32) and task.items_per_step == 4 * 32
    assert torch.equal(task.batch(9).input_ids, make_task(lengths=[8, 32, 64], length_steps=[0, 3, 10]).batch(9).input_ids)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lengths=[32, 64], length_steps=[0]), "equal length"),
    (dict(lengths=[32, 64], length_steps=[1, 5]), "start at 0"),
    (dict(lengths=[32, 64], length_steps=[0, 0]), "increase"),
    (dict(lengths=[30], length_steps=[0], groups=fake_groups(cp=4)),
     r"task.lengths=30 must be divisible by 2\*parallel.cp=8 .*pad it"),
    (dict(lengths=[31], length_steps=[0]), "task.lengths=31 must be even and >= 4"),
    (dict(eval_len=36, groups=fake_groups(cp=4)), "eval_len"),
    (dict(targets="all"), "targets"),
    (dict(global_batch_size=6, groups=fake_groups(dp=4)), "divisible by the data-parallel size"),
])
def test_bad_task_settings_raise_before_any_collective(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_task(**kwargs)


@pytest.mark.parametrize("name", ["recall_ar_2k.py", "recall_ar_2k_attention.py", "recall_ar_8k.py",
                                  "recall_ar_8k_attention.py", "recall_ar_32k.py"])
def test_shipped_configs_build_their_task(name):
    cfg = with_defaults(LazyConfig.load(CONFIGS / name))
    task = instantiate(cfg.task, groups=fake_groups(cp=cfg.parallel.cp), seed=0)
    model = cfg.model.get("model", cfg.model)  # the model's call, inside warm_start for continued runs
    assert max(task.lengths + task.eval_lens) <= model.max_sequence_length <= model.hyena.max_len
    assert model.vocab_size == recall_vocab_size(K, V)


# ------------------------------------------------------------------------------------ loss mask
def worker_loss_mask(overrides: list[str]) -> dict:
    """One process: the task's loss share of a batch, and the cross-entropy of the model's logits
    at the query (and at every labelled) position, computed here from the full logits."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=1)
    try:
        cfg = LazyConfig.apply_overrides(with_defaults(LazyConfig.load(CONFIGS / "recall_ar_2k.py")), overrides)
        torch.manual_seed(0)
        model, task = instantiate(cfg.model), instantiate(cfg.task, groups=fake_groups(), seed=0)
        batch = task.batch(3)
        with torch.no_grad():
            share = task.loss_share(model, batch)
            logits = model(batch.input_ids)  # b, s, vocab
        labelled = batch.labels != IGNORE_INDEX
        return {"share": share, "counted": batch.counted, "labelled": labelled,
                "query": F.cross_entropy(logits[:, -1], batch.labels[:, -1]),
                "labelled_ce": F.cross_entropy(logits[labelled], batch.labels[labelled]),
                "every_next_token": F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.input_ids[:, 1:].flatten())}
    finally:
        parallel_state.destroy_model_parallel()


def test_only_the_query_position_counts(dist_run):
    (out,) = dist_run(worker_loss_mask, 1, TINY + ["task.targets=query"])
    assert out["counted"] == 4 and out["labelled"][:, -1].all() and out["labelled"].sum() == 4
    torch.testing.assert_close(out["share"], out["query"], rtol=1e-6, atol=0)
    # the twin: a loss on every next token (an LM's) is another number
    assert (out["share"] - out["every_next_token"]).abs() > 1e-3


def test_values_targets_count_every_labelled_key_and_the_query(dist_run):
    (out,) = dist_run(worker_loss_mask, 1, TINY + ["task.targets=values"])
    assert out["counted"] == int(out["labelled"].sum()) > 4
    torch.testing.assert_close(out["share"], out["labelled_ce"], rtol=1e-6, atol=0)
    assert (out["share"] - out["query"]).abs() > 1e-4


# ------------------------------------------------------------------------------------ CP == one process
def run_config_rows_layout(name: str, overrides: list[str], output_dir: str) -> dict:
    """`run_config` with the task's data cut into contiguous blocks instead of zigzag chunks."""
    rows = lambda tokens, world, rank: shard(tokens, 1, "rows", world, rank)  # noqa: E731
    with mock.patch("hyena_cp.train.recall.cp_shard_tokens", rows):
        return run_config(name, overrides, output_dir)


def _curve(dist_run, fn, world: int, overrides: list[str], out) -> dict:
    results = dist_run(fn, world, "recall_ar_2k.py", overrides, str(out))
    assert all(r["losses"] == results[0]["losses"] for r in results)
    return results[0]


def _same_curve(a: dict, b: dict) -> None:
    for key in ("losses", "grad_norms"):
        torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), rtol=RTOL, atol=0)
    assert a["final"].keys() == b["final"].keys() == {"val_loss", "val_acc", "val_loss_32", "val_acc_32"}
    for key in a["final"]:
        torch.testing.assert_close(a["final"][key], b["final"][key], rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("pattern,targets,cp", [("HH", "values", 2), ("HH", "query", 2), ("AH", "values", 2),
                                                ("HH", "values", 4)])
def test_cp_trains_like_one_process(dist_run, tmp_path, pattern, targets, cp):
    overrides = TINY + [f"model.layer_pattern={pattern}", f"task.targets={targets}"]
    single = _curve(dist_run, run_config, 1, overrides + ["parallel.cp=1"], tmp_path / "p1")
    sharded = _curve(dist_run, run_config, cp, overrides + [f"parallel.cp={cp}"], tmp_path / "cp")
    _same_curve(sharded, single)


def test_data_in_contiguous_blocks_does_not_train_like_one_process(dist_run, tmp_path):
    """The negative twin: the model reads zigzag shards, so blocks scramble each sequence."""
    single = _curve(dist_run, run_config, 1, TINY + ["parallel.cp=1"], tmp_path / "p1")
    blocks = _curve(dist_run, run_config_rows_layout, 2, TINY + ["parallel.cp=2"], tmp_path / "rows")
    with pytest.raises(AssertionError):
        _same_curve(blocks, single)
    assert abs(blocks["losses"][0] - single["losses"][0]) > 1e-4 * abs(single["losses"][0])
