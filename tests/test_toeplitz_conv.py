"""The blocked Toeplitz form of the causal depthwise conv (`hyena_cp.ops.toeplitz_conv`), which
runs filters of ``BLOCKED_MIN_TAPS`` taps or more (Hyena-MR's 128): output, input, halo, tap and
bias gradients against the conv's definition in float64, with and without a halo, with packed
documents, for lengths that are and are not whole blocks; float32 within the bound of its sums."""
from __future__ import annotations

import itertools

import pytest
import torch

from hyena_cp.ops import short_conv, toeplitz_conv
from hyena_cp.ops.packing import document_positions
from hyena_cp.ops.short_conv import causal_depthwise_conv1d


def definition(x, weight, bias, left, positions):
    """``y[t] = sum_s weight[:, K-1-s] x[t-s]`` (+ bias), ``x[t-s]`` from the halo before the start and
    zero at or before a document start (``positions[t] < s``)."""
    kernel, length = weight.shape[1], x.shape[-1]
    full = torch.cat([left if left is not None else x.new_zeros(*x.shape[:2], kernel - 1), x], -1)
    y = torch.zeros_like(x) if bias is None else bias[:, None].expand_as(x).clone()
    for s in range(kernel):
        term = full[..., kernel - 1 - s:kernel - 1 - s + length] * weight[:, kernel - 1 - s, None]
        y = y + (term if positions is None else term * (positions[:, None, :] >= s))
    return y


def inputs(batch, channels, length, kernel, halo, bias, packed, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, length, dtype=dtype, generator=g)
    weight = torch.randn(channels, kernel, dtype=dtype, generator=g)
    b = torch.randn(channels, dtype=dtype, generator=g) if bias else None
    left = torch.randn(batch, channels, kernel - 1, dtype=dtype, generator=g) if halo else None
    positions = None
    if packed:  # documents of 1, 3 and 9 tokens, then the rest, in every row
        bounds = [0]
        for row in range(batch):
            bounds += [row * length + n for n in (1, 4, 13) if n < length] + [(row + 1) * length]
        positions = document_positions(torch.tensor(bounds), batch * length).view(batch, length)
    return [t.requires_grad_() if t is not None else None for t in (x, weight, b, left)], positions


def value_and_grads(fn, tensors, positions, upstream):
    y = fn(*tensors, positions)
    wrt = [t for t in tensors if t is not None]
    return [y, *torch.autograd.grad(y, wrt, upstream)]


CASES = list(itertools.product([8, 17, 128], [1, 15, 16, 100, 300], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("kernel,length,halo,bias,packed", CASES)
def test_blocked_conv_is_the_definition(kernel, length, halo, bias, packed):
    assert kernel >= toeplitz_conv.BLOCKED_MIN_TAPS
    tensors, positions = inputs(2, 3, length, kernel, halo, bias, packed)
    upstream = torch.randn(2, 3, length, dtype=torch.float64)
    got = value_and_grads(causal_depthwise_conv1d, tensors, positions, upstream)
    want = value_and_grads(definition, tensors, positions, upstream)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-12 * (1 + b.abs().max()), (a - b).abs().max()


def test_long_filters_take_the_blocked_form(monkeypatch):
    calls = []
    blocked = toeplitz_conv.blocked_causal_conv1d
    monkeypatch.setattr(short_conv, "blocked_causal_conv1d", lambda *a: calls.append(a[1].shape[1]) or blocked(*a))
    for kernel in (3, 7, 8, 128):
        (x, w, _, _), _ = inputs(1, 2, 40, kernel, False, False, False)
        causal_depthwise_conv1d(x, w)
    assert calls == [8, 128]


def test_blocked_conv_without_the_previous_block_fails():
    """Negative twin: output block i must read input block i-1 (T1), else every block's first K-1
    outputs lose their earlier taps."""
    (x, w, _, _), _ = inputs(1, 2, 64, 17, False, False, False)
    m = toeplitz_conv._block(17)
    t1, t0 = toeplitz_conv._toeplitz(w.detach(), m)
    u = toeplitz_conv._blocks(x.detach(), None, m)
    blocks = u.shape[-1] // m - 1
    without = torch.bmm(u[0, :, m:].view(2, blocks, m), t0).flatten(1)[None]
    assert (without - definition(x, w, None, None, None)).abs().max() > 1e-3


def test_float32_blocked_conv_within_its_sums_bound():
    """float32 against float64, element by element: a float32 sum of n products errs by at most
    (n + 2) u times the sum of the products' magnitudes (u = 2^-24; +2 for rounding the inputs),
    which the definition gives when run on the magnitudes. n per output: 2m products of a block
    pair (+1 for the bias) for y, 2m for the input and halo grads, a tap's gradient N * blocks per
    entry of dT then up to 2m entries per diagonal, the bias's N * L."""
    kernel, length, batch = 128, 1000, 2
    (x, w, b, left), _ = inputs(batch, 4, length, kernel, True, True, False)
    upstream = torch.randn(batch, 4, length, dtype=torch.float64)
    want = value_and_grads(causal_depthwise_conv1d, [x, w, b, left], None, upstream)
    single = [t.detach().float().requires_grad_() for t in (x, w, b, left)]
    got = value_and_grads(causal_depthwise_conv1d, single, None, upstream.float())
    magnitudes = value_and_grads(definition, [t.detach().abs().requires_grad_() for t in (x, w, b, left)], None,
                                 upstream.abs())
    m = toeplitz_conv._block(kernel)
    terms = {"y": 2 * m + 1, "x": 2 * m, "w": batch * -(-length // m) + 2 * m, "b": batch * length, "halo": 2 * m}
    for (name, n), a, b_, mag in zip(terms.items(), got, want, magnitudes):
        excess = (a.double() - b_).abs() - (n + 2) * 2 ** -24 * mag
        assert excess.max() <= 0, (name, excess.max().item())


def test_autocast_leaves_the_blocked_conv_in_the_inputs_dtype():
    """Under bf16 autocast the blocked conv, like the shifted taps, computes in x's dtype: a float32
    input gives the float32 result, forward and backward, bit for bit."""
    (x, w, b, left), _ = inputs(1, 3, 100, 40, True, True, False, dtype=torch.float32)
    upstream = torch.randn(1, 3, 100)
    plain = value_and_grads(causal_depthwise_conv1d, [x, w, b, left], None, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = value_and_grads(causal_depthwise_conv1d, [x, w, b, left], None, upstream)
    assert all(a.dtype == torch.float32 and torch.equal(a, p) for a, p in zip(cast, plain))
