"""Packed-sequence math in one process (float64): boundary helpers, the per-document FFT long
conv and the document-masked short conv against each document convolved alone."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from hyena_cp.ops.fftconv import fft_causal_conv1d
from hyena_cp.ops.packing import (DocumentBuckets, check_cu_seqlens, concat_cu_seqlens, document_ids,
                                  document_positions, fft_segment_length, is_one_document_per_row)
from hyena_cp.ops.short_conv import causal_depthwise_conv1d
from references import direct_causal_conv1d, expand_groups, rel_err

TOL64 = 1e-10

# Two rows of 20: documents of 1, 2, 17 | 5, 1, 1, 6, 7 tokens; the one of 17 pads to a bucket of
# 24 > L, longer than the filter.
ROWS = [torch.tensor([0, 1, 3, 20]), torch.tensor([0, 5, 6, 7, 13, 20])]
LENGTH = 20


def cu_two_rows() -> torch.Tensor:
    return concat_cu_seqlens(ROWS, LENGTH)


def doc_spans(cu: torch.Tensor, length: int):
    """``(row, start, stop)`` in row coordinates for every non-empty document."""
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if b > a:
            yield a // length, a % length, a % length + (b - a)


# ------------------------------------------------------------------ boundary helpers
def test_concat_and_positions():
    cu = cu_two_rows()
    assert cu.tolist() == [0, 1, 3, 20, 25, 26, 27, 33, 40]
    pos = document_positions(cu, 40)
    assert pos[:4].tolist() == [0, 0, 1, 0] and pos[19].item() == 16 and pos[20:28].tolist() == [0, 1, 2, 3, 4, 0, 0, 0]
    assert document_ids(cu, 40)[[0, 1, 2, 3, 20, 25, 39]].tolist() == [0, 1, 1, 2, 3, 4, 7]


@pytest.mark.parametrize("cu,total,row,match", [
    (torch.tensor([0.0, 4.0]), 4, None, "integer tensor"),
    (torch.tensor([[0, 4]]), 4, None, "1-D integer tensor"),
    (torch.tensor([0]), 4, None, "at least 2 entries"),
    (torch.tensor([1, 4]), 4, None, "start at 0 and end at the global token count B\\*L=4"),
    (torch.tensor([0, 3]), 4, None, "first 0 and last 3"),
    (torch.tensor([0, 3, 2, 4]), 4, None, "non-decreasing"),
    (torch.tensor([0, 3, 8]), 8, 4, "missing \\[4\\]"),
])
def test_bad_cu_seqlens_raise(cu, total, row, match):
    with pytest.raises(ValueError, match=match) as info:
        check_cu_seqlens(cu, total, row)
    assert "cu_seqlens" in str(info.value)


def test_good_cu_seqlens_pass():
    check_cu_seqlens(cu_two_rows(), 40, LENGTH)
    check_cu_seqlens(torch.tensor([0, 0, 4, 4, 8], dtype=torch.int32), 8, 4)  # empty documents are allowed


def test_fft_segment_length_grid():
    assert [fft_segment_length(n) for n in range(1, 14)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
    for n in range(1, 5000):
        m = fft_segment_length(n)
        assert n <= m < 1.5 * n or n <= 2, n
        assert m & (m - 1) == 0 or (m % 3 == 0 and (m // 3) & (m // 3 - 1) == 0), m


def test_buckets_gather_and_scatter_every_token_once():
    cu = cu_two_rows()
    buckets = DocumentBuckets.build(cu, 40)
    assert len(buckets.lengths) <= 2 * 6  # at most 2 log2(L) buckets
    tokens = torch.cat([torch.arange(40), torch.tensor([-1])])  # position-encoded, -1 = the zero slot
    slots = tokens[buckets.gather]
    assert torch.equal(slots[buckets.scatter], torch.arange(40))
    offsets = buckets.offsets
    assert offsets[-1] == len(slots)
    for i, (m, count) in enumerate(zip(buckets.lengths, buckets.counts)):
        for doc in slots[offsets[i]:offsets[i + 1]].view(count, m):  # one document per row, then zero slots
            real = doc[doc >= 0]
            assert (doc[len(real):] == -1).all() and torch.equal(real, torch.arange(real[0], real[0] + len(real)))


def test_one_document_per_row():
    assert is_one_document_per_row(torch.tensor([0, 4, 4, 8]), 8, 4)
    assert not is_one_document_per_row(torch.tensor([0, 1, 4, 8]), 8, 4)


# ------------------------------------------------------------------------ long conv
def per_document_long_conv(u, k, d, cu):
    """Each document through the direct reference alone (its first n filter taps)."""
    y = torch.zeros_like(u)
    for row, a, b in doc_spans(cu, u.shape[-1]):
        taps = expand_groups(k, u.shape[1])[:, :b - a]  # the document sees the filter from tap 0
        y[row:row + 1, :, a:b] = direct_causal_conv1d(u[row:row + 1, :, a:b], taps, d)
    return y


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("cu,length", [
    (cu_two_rows(), LENGTH),
    (torch.tensor([0, 1, 2, 3, 4, 5, 6]), 6),  # every token its own document
    (torch.tensor([0, 7, 9, 16]), 16),
    (torch.tensor([0, 6, 12]), 6),  # one document per row: the plain path
])
def test_packed_long_conv_equals_each_document_alone(cu, length):
    rows = (int(cu[-1]) // length)
    g = torch.Generator().manual_seed(length)
    u = torch.randn(rows, 4, length, generator=g, dtype=torch.float64)
    k = torch.randn(2, length, generator=g, dtype=torch.float64)
    d = torch.randn(4, generator=g, dtype=torch.float64)
    grad_out = torch.randn(rows, 4, length, generator=g, dtype=torch.float64)
    y, grads = _grads(lambda u, k, d: fft_causal_conv1d(u, k, d, cu_seqlens=cu), [u, k, d], grad_out)
    y_ref, grads_ref = _grads(lambda u, k, d: per_document_long_conv(u, k, d, cu), [u, k, d], grad_out)
    assert rel_err(y, y_ref) < TOL64
    for name, a, b in zip("ukd", grads, grads_ref):
        assert rel_err(a, b) < TOL64, name


def test_packed_long_conv_ignoring_boundaries_fails():
    """Negative twin: the whole-row conv is not the per-document one."""
    cu = cu_two_rows()
    u = torch.randn(2, 4, LENGTH, dtype=torch.float64)
    k = torch.randn(2, LENGTH, dtype=torch.float64)
    assert rel_err(fft_causal_conv1d(u, k), per_document_long_conv(u, k, None, cu)) > 1e-2


def test_packed_long_conv_runs_in_float32_under_autocast():
    cu = cu_two_rows()
    u = torch.randn(2, 4, LENGTH, dtype=torch.bfloat16)
    k = torch.randn(2, LENGTH)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fft_causal_conv1d(u, k, cu_seqlens=cu)
    assert y.dtype == torch.bfloat16
    ref = per_document_long_conv(u.double(), k.double(), None, cu)
    assert rel_err(y.double(), ref) < 1e-2


# ----------------------------------------------------------------------- short conv
def per_document_short_conv(x, w, b, cu):
    """Each document through F.conv1d alone with K-1 zeros before it."""
    kernel, y = w.shape[1], torch.zeros_like(x)
    for row, a, stop in doc_spans(cu, x.shape[-1]):
        y[row:row + 1, :, a:stop] = F.conv1d(F.pad(x[row:row + 1, :, a:stop], (kernel - 1, 0)), w[:, None], b,
                                             groups=x.shape[1])
    return y


@pytest.mark.parametrize("kernel", [2, 3, 5])
def test_masked_short_conv_equals_each_document_alone(kernel):
    cu = cu_two_rows()
    g = torch.Generator().manual_seed(kernel)
    x = torch.randn(2, 3, LENGTH, generator=g, dtype=torch.float64)
    w = torch.randn(3, kernel, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    grad_out = torch.randn(2, 3, LENGTH, generator=g, dtype=torch.float64)
    positions = document_positions(cu, 2 * LENGTH).view(2, LENGTH)
    y, grads = _grads(lambda x, w, b: causal_depthwise_conv1d(x, w, b, positions=positions), [x, w, b], grad_out)
    y_ref, grads_ref = _grads(lambda x, w, b: per_document_short_conv(x, w, b, cu), [x, w, b], grad_out)
    assert rel_err(y, y_ref) < TOL64
    for name, a_, b_ in zip("xwb", grads, grads_ref):
        assert rel_err(a_, b_) < TOL64, name
    assert rel_err(causal_depthwise_conv1d(x, w, b), y_ref) > 1e-3  # negative twin: taps cross documents


@pytest.mark.parametrize("cut", [4, 7, 12])
def test_masked_short_conv_with_a_halo(cut):
    """A chunk starting at ``cut`` with its K-1 preceding tokens as the halo equals the slice
    of the whole row's per-document conv, gradients of the halo included."""
    kernel, cu = 5, torch.tensor([0, 1, 3, 4, 10, 20])  # documents of 1, 2, 1 (< the halo K-1=4), 6, 10
    g = torch.Generator().manual_seed(cut)
    x = torch.randn(1, 3, LENGTH, generator=g, dtype=torch.float64)
    w = torch.randn(3, kernel, generator=g, dtype=torch.float64)
    grad_out = torch.randn(1, 3, LENGTH - cut, generator=g, dtype=torch.float64)
    positions = document_positions(cu, LENGTH).view(1, LENGTH)

    def chunked(x, w):
        halo = x[..., cut - (kernel - 1):cut]
        return causal_depthwise_conv1d(x[..., cut:], w, None, halo, positions[:, cut:])

    y, grads = _grads(chunked, [x, w], grad_out)
    y_ref, grads_ref = _grads(lambda x, w: per_document_short_conv(x, w, None, cu)[..., cut:], [x, w], grad_out)
    assert rel_err(y, y_ref) < TOL64
    for name, a_, b_ in zip("xw", grads, grads_ref):
        assert rel_err(a_, b_) < TOL64, name


def test_short_conv_positions_shape_is_checked():
    with pytest.raises(ValueError, match=re.escape("positions must be [N, L] = (1, 4)")):
        causal_depthwise_conv1d(torch.randn(1, 2, 4), torch.randn(2, 3), positions=torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("length", [1, 2, 3])
def test_short_conv_backward_on_a_sequence_shorter_than_the_taps(length):
    """A 2- or 3-token document with K=5 (the weight grad used to slice with a negative stop)."""
    g = torch.Generator().manual_seed(length)
    x = torch.randn(2, 3, length, generator=g, dtype=torch.float64)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    grad_out = torch.randn(2, 3, length, generator=g, dtype=torch.float64)
    y, grads = _grads(lambda x, w: causal_depthwise_conv1d(x, w), [x, w], grad_out)
    y_ref, grads_ref = _grads(lambda x, w: F.conv1d(F.pad(x, (4, 0)), w[:, None], groups=3), [x, w], grad_out)
    assert rel_err(y, y_ref) < TOL64
    for name, a_, b_ in zip("xw", grads, grads_ref):
        assert rel_err(a_, b_) < TOL64, name
