"""Cross-rank agreement (`hyena_cp.parallel.agreement`): CP ranks whose inputs are each valid
alone (or invalid on one rank only) but disagree all raise the SAME ``ValueError``, naming
the field, the values and the ranks, within seconds, before any data collective: no gloo
abort, no hang. For the 1-D and 2-D mixers, the Hyena operator and the ViT-5 network, at
P = 2 and 4. Agreeing ranks pay one small control all-gather per outermost call (one per
network forward, however many mixers), and none with ``check_agreement="off"``."""
from __future__ import annotations

import faulthandler

import pytest
import torch
import torch.distributed as dist

from hyena_cp import Hyena, QKVSequenceMixer, ViT5HierarchicalClassificationNet
from hyena_cp.parallel import agreed, agreement, check_agreement_policy, check_ranks_agree, count_comm, shard
from hyena_cp.parallel.agreement import _active

# A missing check would hang until the gloo timeout (60 s in tests) or abort a worker;
# the check answers in well under a second.
TIMEOUT_S = 20.0

# name: (spatial dims, conditioning, kwargs of ranks 0..P-2, kwargs of rank P-1, words of the message).
# kwargs: "x" local shape, "dtype", "num_valid_tokens", "cond" shape, "cu" inner document boundaries.
X1, X2 = (1, 8, 8), (1, 2, 4, 8)
CASES = {
    # Local lengths 8 and 6: each a valid zigzag shard (gloo used to abort: "data size doesn't match").
    "1d_length": (1, None, dict(x=X1), dict(x=(1, 6, 8)), ["x.shape", "(1, 8, 8) on rank", "(1, 6, 8) on rank"]),
    # 8 and 7: 7 is invalid alone (odd), so that rank alone would raise while its peers wait.
    "1d_length_invalid_on_one": (1, None, dict(x=X1), dict(x=(1, 7, 8)), ["x.shape", "(1, 7, 8)"]),
    "1d_batch": (1, None, dict(x=X1), dict(x=(2, 8, 8)), ["x.shape", "(2, 8, 8)"]),
    "1d_dtype": (1, None, dict(x=X1), dict(x=X1, dtype=torch.float32), ["x.dtype", "torch.float64", "torch.float32"]),
    "1d_num_valid": (1, None, dict(x=X1, num_valid_tokens=10), dict(x=X1, num_valid_tokens=12),
                     ["num_valid_tokens", "10 on rank", "12 on rank"]),
    "1d_num_valid_none": (1, None, dict(x=X1, num_valid_tokens=10), dict(x=X1), ["num_valid_tokens", "None on rank"]),
    "1d_cond_shape": (1, "film", dict(x=X1, cond=(1, 5)), dict(x=X1, cond=(1, 3)),
                      ["conditioning.shape", "(1, 5) on rank", "(1, 3) on rank"]),
    "1d_cond_missing": (1, "film", dict(x=X1, cond=(1, 5)), dict(x=X1), ["conditioning.shape", "None on rank"]),
    "1d_cu_seqlens": (1, None, dict(x=X1, cu=(5,)), dict(x=X1, cu=(7,)),
                      ["cu_seqlens", "tensor([0, 5,", "tensor([0, 7,"]),
    "1d_cu_seqlens_missing": (1, None, dict(x=X1, cu=(5,)), dict(x=X1), ["cu_seqlens", "None on rank"]),
    "2d_rows": (2, None, dict(x=X2), dict(x=(1, 3, 4, 8)), ["x.shape", "(1, 2, 4, 8) on rank", "(1, 3, 4, 8) on rank"]),
    "2d_width": (2, None, dict(x=X2), dict(x=(1, 2, 5, 8)), ["x.shape", "(1, 2, 5, 8)"]),
    "2d_num_valid": (2, None, dict(x=X2, num_valid_tokens=13), dict(x=X2, num_valid_tokens=14), ["num_valid_tokens"]),
    "2d_cond_shape": (2, "adaln", dict(x=X2, cond=(1, 5)), dict(x=X2, cond=(2, 5)), ["conditioning.shape", "(2, 5)"]),
}


def _mixer(dims: int, cond: str | None) -> QKVSequenceMixer:
    torch.manual_seed(0)
    hyena = Hyena(hidden_dim=8, num_heads=4, spatial_dims=dims, filter_width=8)
    return QKVSequenceMixer(hidden_dim=8, hyena=hyena, conditioning=cond, cond_dim=5 if cond else None).double()


def _inputs(kw: dict, world: int) -> dict:
    shape = kw["x"]
    x = torch.randn(shape, dtype=kw.get("dtype", torch.float64))
    cond = None if "cond" not in kw else torch.randn(kw["cond"], dtype=torch.float64)
    cu = None
    if "cu" in kw:
        length = shape[1] * world
        cu = torch.tensor([0, *kw["cu"], *range(length, shape[0] * length + 1, length)])
    return dict(x=x, conditioning=cond, num_valid_tokens=kw.get("num_valid_tokens"), cu_seqlens=cu)


def worker_disagree(name: str) -> None:
    dims, cond, others, last, _ = CASES[name]
    group = dist.group.WORLD
    world = group.size()
    kw = last if group.rank() == world - 1 else others
    inputs = _inputs(kw, world)
    _mixer(dims, cond)(inputs.pop("x"), cp_group=group, **inputs)


def _assert_same_error(errors: list, words: list[str], world: int) -> None:
    assert len(errors) == world and all(isinstance(e, ValueError) for e in errors), errors
    message = str(errors[0])
    assert all(str(e) == message for e in errors), "every rank must raise the same message"
    assert "disagree" in message and f"on rank {world - 1}" in message, message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_disagreeing_ranks_all_raise_the_same_error(dist_run, name, world):
    errors = dist_run.run(worker_disagree, world, (name,), expect_error=ValueError, timeout=TIMEOUT_S)
    _assert_same_error(errors, CASES[name][4], world)


def worker_hyena_disagree() -> None:
    """The operator called directly: q, k, v local lengths 8 and 6."""
    group = dist.group.WORLD
    length = 6 if group.rank() == group.size() - 1 else 8
    torch.manual_seed(0)
    hyena = Hyena(hidden_dim=8, num_heads=4, filter_width=8).double()
    q, k, v = torch.randn(3, 1, 8, length, dtype=torch.float64)
    hyena(q, k, v, cp_group=group)


@pytest.mark.parametrize("world", [2, 4])
def test_hyena_operator_ranks_disagree(dist_run, world):
    errors = dist_run.run(worker_hyena_disagree, world, expect_error=ValueError, timeout=TIMEOUT_S)
    _assert_same_error(errors, ["Hyena.forward", "q.shape", "(1, 8, 6)"], world)


# ------------------------------------------------------------------------------- network
def _net(**kw) -> ViT5HierarchicalClassificationNet:
    torch.manual_seed(0)
    return ViT5HierarchicalClassificationNet(
        img_size=20, patch_size=2, in_chans=3, num_classes=5, embed_dim=16, depths=(1, 1, 1), num_heads=(2, 2, 4),
        mixers=("hyena", "attention", "hyena"), hyena=dict(num_heads=4, filter_width=8, filter_bands=2), **kw).double()


def worker_net_disagree(last_shape: tuple) -> None:
    group = dist.group.WORLD
    shape = last_shape if group.rank() == group.size() - 1 else (2, 3, 20, 20)
    _net()(torch.randn(shape, dtype=torch.float64), cp_group=group)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("last_shape,words", [
    ((3, 3, 20, 20), ["images.shape", "(2, 3, 20, 20) on rank", "(3, 3, 20, 20) on rank"]),  # valid alone
    ((2, 3, 16, 16), ["images.shape", "(2, 3, 16, 16)"]),  # invalid on one rank only
])
def test_network_ranks_disagree(dist_run, world, last_shape, words):
    errors = dist_run.run(worker_net_disagree, world, (last_shape,), expect_error=ValueError, timeout=TIMEOUT_S)
    _assert_same_error(errors, ["ViT5HierarchicalClassificationNet.forward", *words], world)


# ------------------------------------------------------------------------- agreeing ranks
def worker_agree(what: str, policy: str) -> dict:
    """Agreeing ranks: the forward runs; count the control (agreement) and data collectives."""
    group = dist.group.WORLD
    world, rank = group.size(), group.rank()
    with count_comm() as stats:
        if what == "net":
            out = _net(check_agreement=policy)(torch.randn(2, 3, 20, 20, dtype=torch.float64), cp_group=group)
        else:
            mixer = _mixer(1, None)
            mixer.check_agreement = policy
            x = shard(torch.randn(1, 16, 8, dtype=torch.float64), 1, "zigzag", world, rank)
            out = torch.stack([mixer(x, cp_group=group), mixer(x, cp_group=group)])
    return {"out": out.detach(), "control": dict(stats.control_calls), "control_bytes": stats.control_bytes,
            "data": dict(stats.calls)}


@pytest.mark.parametrize("what,checks", [("mixer", 2), ("net", 1)])
def test_agreeing_ranks_pay_one_control_all_gather_per_outermost_call(dist_run, what, checks):
    always = dist_run.run(worker_agree, 2, (what, "always"), timeout=120)
    off = dist_run.run(worker_agree, 2, (what, "off"), timeout=120)
    for a, o in zip(always, off):
        assert a["control"] == {"agreement": checks} and o["control"] == {}
        assert 0 < a["control_bytes"] < 1024 * checks
        assert a["data"] == o["data"]  # the data traffic is untouched
        torch.testing.assert_close(a["out"], o["out"], rtol=0, atol=0)


# ---------------------------------------------------------------------- one process
def test_policy_is_validated_and_single_process_never_communicates():
    with pytest.raises(ValueError, match="check_agreement='first' must be one of"):
        check_agreement_policy("first")
    with pytest.raises(ValueError, match="check_agreement='sometimes'"):
        QKVSequenceMixer(hidden_dim=8, hyena=Hyena(hidden_dim=8), check_agreement="sometimes")
    with pytest.raises(ValueError, match="check_agreement"):
        _net(check_agreement=True)
    with count_comm() as stats:
        check_ranks_agree(None, "test", {"x.shape": (1, 2)})
        with agreed(None):
            check_ranks_agree(None, "test", {"x.shape": (1, 2)})
    assert stats.control_calls == {} and stats.calls == {}


def test_agreement_checks_the_group_first_and_runs_the_body_in_scope():
    x = torch.ones(2)
    with pytest.raises(ValueError, match="cp_group must be a torch.distributed ProcessGroup"):
        with agreement("world", "test", {"x.shape": (2,)}, policy="always", hint="", before=x):
            pytest.fail("the body ran with a group that is not one")
    assert _active() == []
    with agreement(None, "test", {"x.shape": (2,)}, policy="always", hint="", before=x) as y:
        assert y is x and _active() == [None]  # nested checks on this group return at once
    assert _active() == []


def worker_disagree_unchecked() -> None:
    faulthandler.disable()  # gloo aborts this worker on purpose: no thread dump in the test log
    group = dist.group.WORLD
    mixer = _mixer(1, None)
    mixer.check_agreement = "off"
    mixer(torch.randn(1, 6 if group.rank() == group.size() - 1 else 8, 8, dtype=torch.float64), cp_group=group)


def test_without_the_check_disagreeing_ranks_fail_in_the_collectives(dist_run):
    """The negative twin: with check_agreement="off" the same input does not give the clean
    error (gloo aborts a worker or fails the AllToAll), so the tests above are not vacuous."""
    with pytest.raises(AssertionError) as info:
        dist_run.run(worker_disagree_unchecked, 2, expect_error=ValueError, timeout=TIMEOUT_S)
    assert "disagree on their inputs" not in str(info.value)


def test_signature_encoding_never_raises_and_reads_back():
    from hyena_cp.parallel.signature import _WIDTH, _decode, encode as _encode

    cases = {None: "None", 3: "3", (1, 8, 8): "(1, 8, 8)", torch.float64: "torch.float64",
             torch.tensor([0, 5, 16]): "tensor([0, 5, 16])", tuple(range(20)): "<20 values, crc32",
             torch.arange(30): "<30 values, crc32", torch.randn(3): "<3 values, crc32", 2**70: "<1 values, crc32"}
    for value, text in cases.items():
        assert _decode(_encode(value)).startswith(text), value
    odd = [True, 2.5, "x", [1, (2,)], object(), torch.empty(3, device="meta"), torch.bfloat16]
    for value in odd:
        assert len(_encode(value)) == _WIDTH and isinstance(_decode(_encode(value)), str)
    assert _encode(2.5) != _encode(3.5) and _encode(True) != _encode(1)
