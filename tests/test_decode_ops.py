"""The math of one decoding step (`hyena_cp.ops.decode`) against float64 references — the
direct causal conv of tests/references.py and SDPA over all keys — and next-token sampling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hyena_cp.ops.decode import attention_partial, causal_conv_step, merge_attention_partials
from hyena_cp.ops.sampling import sample_next
from references import direct_causal_conv1d, expand_groups, rel_err

TOL = 1e-12  # fp64


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_conv_step_is_the_last_output_of_the_causal_conv(groups):
    z, k, d = torch.randn(2, 6, 9, dtype=torch.float64), torch.randn(groups, 9, dtype=torch.float64), torch.randn(6)
    full = direct_causal_conv1d(z, expand_groups(k, 6), d.double())
    for t in range(1, 10):  # every prefix: the step at position t-1
        step = causal_conv_step(z[..., :t], k[:, :t].flip(-1), d)
        assert rel_err(step, full[..., t - 1]) < TOL, t
    wrong = causal_conv_step(z, k.flip(-1).roll(1, -1), d)  # taps one position off
    assert rel_err(wrong, full[..., -1]) > 1e-2


def test_conv_step_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="k_rev"):
        causal_conv_step(torch.randn(1, 4, 5), torch.randn(3, 5))


def test_attention_slices_merge_to_attention_over_all_keys():
    """Keys cut into slices of 3, 0, 4 and 1 (an empty slice, as on a CP rank with no key yet)."""
    q = torch.randn(2, 4, 1, 8, dtype=torch.float64)
    k, v = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v)
    sizes = [3, 0, 4, 1]
    parts = [attention_partial(q, ks, vs, 8 ** -0.5) for ks, vs in zip(k.split(sizes, 2), v.split(sizes, 2))]
    merged = merge_attention_partials(torch.stack([o for o, _ in parts]), torch.stack([lse for _, lse in parts]))
    assert rel_err(merged, ref) < TOL
    naive = torch.stack([o for o, _ in parts]).sum(0) / 3  # averaging slices instead of reweighting
    assert rel_err(naive, ref) > 1e-2


def test_greedy_and_top1_are_argmax_and_draws_repeat_with_the_seed():
    logits = torch.randn(5, 11)
    assert torch.equal(sample_next(logits, 0.0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=torch.Generator().manual_seed(0)),
                       logits.argmax(-1))
    draws = [sample_next(logits, 0.7, 4, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])


def test_sampling_follows_temperature_and_top_k():
    logits = torch.tensor([[0.0, 1.0, 2.0, -5.0]]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(1)
    draws = sample_next(logits, 2.0, top_k=3, generator=gen)
    assert (draws != 3).all(), "a token outside the top 3 was drawn"
    expected = torch.softmax(logits[0, :3] / 2.0, -1)
    observed = torch.bincount(draws, minlength=4)[:3] / len(draws)
    torch.testing.assert_close(observed, expected, rtol=0, atol=0.015)  # ~4 standard deviations


@pytest.mark.parametrize("kwargs,match", [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                                          (dict(top_k=12), "top_k")])
def test_bad_sampling_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_next(torch.randn(2, 11), **kwargs)
