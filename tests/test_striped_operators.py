"""The StripedHyena 2 and safari/HyenaDNA operators as filters of the one mixer, in one process,
against float64 direct sums written from their definitions (no FFT, none of the package's helpers):

- explicit FIR (Evo 2's SE: K = 7, no skip; MR: K = 128 with skip, plain or with Savanna's decay),
  run as a direct causal conv: ``y[t] = q[t] (sum_{j<K} h[g(c), j] u[t-j] + D u[t])``, ``u = k v``;
- modal (LI): ``h[c, j] = sum_s R[c, s] exp(λ[c, s] j)`` at integer positions, both parametrizations,
  its hand-written adjoint (gradcheck), the recurrence state and step against the direct sum;
- safari/HyenaDNA: the positional table against its formula, the filter (shared sine frequency,
  loaded table, window with shift) against the direct formula.
Negative twins: a plausible bug in each definition moves the result well beyond the tolerance.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from hyena_cp import Hyena, QKVSequenceMixer
from hyena_cp.ops.explicit import ExplicitFilter, savanna_decay
from hyena_cp.ops.filters import kernel_grid
from hyena_cp.ops.modal import ModalFilter, modal_kernel, modal_state, modal_step
from hyena_cp.ops.safari import SafariFilter, safari_decays, safari_positional_table
from references import rel_err

TOL = 1e-11  # float64: sums of a few hundred terms


def causal_sum(u: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """``y[b, c, t] = sum_j taps[c, j] u[b, c, t - j]`` by a loop over the taps."""
    y = torch.zeros_like(u)
    length = u.shape[-1]
    for j in range(min(taps.shape[1], length)):
        y[..., j:] += taps[:, j, None] * u[..., :length - j]
    return y


def mixer_reference(mixer: QKVSequenceMixer, x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The mixer (no norm) by direct sums: ``taps [C, T]`` per channel in time order."""
    p = (x @ mixer.in_proj.weight.T + mixer.in_proj.bias).transpose(1, 2)  # B, 3C, L
    w = mixer.short_conv.weight[:, 0]  # 3C, K: w[:, -1] multiplies the current token
    s = causal_sum(p, w.flip(-1)) + mixer.short_conv.bias[:, None]
    q, k, v = s.chunk(3, dim=1)
    u = k * v
    y = causal_sum(u, taps)
    if mixer.hyena.skip is not None:
        y = y + mixer.hyena.skip[:, None] * u
    return (q * y).transpose(1, 2) @ mixer.out_proj.weight.T + mixer.out_proj.bias


def build(filter_factory, channels: int = 8, heads: int = 4, skip: bool = True) -> QKVSequenceMixer:
    torch.manual_seed(3)
    hyena = Hyena(hidden_dim=channels, num_heads=heads, filter=filter_factory, mask=None, skip=skip)
    mixer = QKVSequenceMixer(hidden_dim=channels, hyena=hyena, norm=None).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))  # non-zero biases and taps everywhere
    return mixer


# ------------------------------------------------------------------ explicit FIR (SE, MR)
@pytest.mark.parametrize("length,seq,skip", [(7, 40, False), (128, 150, True), (128, 37, True)])
def test_explicit_fir_mixer_equals_direct_sum(length, seq, skip):
    mixer = build(functools.partial(ExplicitFilter, length=length), skip=skip)
    x = torch.randn(2, seq, 8, dtype=torch.float64)
    taps = mixer.hyena.filter.h.repeat_interleave(2, dim=0)  # groups are contiguous channel blocks (C/G = 2)
    assert rel_err(mixer(x), mixer_reference(mixer, x, taps)) < TOL
    # negative twins: taps in the wrong order, groups tiled instead of blocked
    assert rel_err(mixer(x), mixer_reference(mixer, x, taps.flip(-1))) > 1e-2
    assert rel_err(mixer(x), mixer_reference(mixer, x, mixer.hyena.filter.h.repeat(2, 1))) > 1e-2


def test_savanna_decay_window_is_the_definition():
    groups, length, cache = 8, 16, 100
    got = savanna_decay(groups, length, cache, -2.0, 2.0, num_decay_repeats=2)
    for g in range(groups):
        r = 10 ** (-2.0 + 4.0 * (g % 4) / 3)  # 4 log-spaced rates, tiled twice
        want = torch.tensor([math.exp(-r * n / (cache - 1)) for n in range(length)], dtype=torch.float64)
        assert rel_err(got[g], want) < 1e-14


def test_explicit_filter_with_decay_bakes_into_the_plain_form():
    torch.manual_seed(0)
    trained = build(functools.partial(ExplicitFilter, length=16, decay="savanna", L_cache=64, decay_preset="weak"))
    plain = build(functools.partial(ExplicitFilter, length=16))
    plain.load_state_dict({**trained.state_dict(), "hyena.filter.h": trained.hyena.filter.baked_taps().detach()},
                          strict=False)
    assert set(trained.state_dict()) - set(plain.state_dict()) == {"hyena.filter.decay"}  # a buffer, in state_dict
    x = torch.randn(1, 30, 8, dtype=torch.float64)
    assert rel_err(plain(x), trained(x)) < TOL
    window = trained.hyena.filter.decay  # built in the default dtype (float32), as a checkpoint stores it
    assert rel_err(window, savanna_decay(4, 16, 64, -2.0, 2.0)) < 1e-7
    taps = (trained.hyena.filter.h * window).repeat_interleave(2, dim=0)
    assert rel_err(trained(x), mixer_reference(trained, x, taps)) < TOL


def test_explicit_filter_zero_beyond_its_length():
    f = ExplicitFilter(2, length=3).double()
    grid = kernel_grid((range(0, 5),), (5,), (1.0,), device=torch.device("cpu"), dtype=torch.float64)
    k = f(grid)
    assert torch.equal(k[:, :3], f.h) and torch.equal(k[:, 3:], torch.zeros(2, 2, dtype=torch.float64))


# --------------------------------------------------------------------------- modal (LI)
def modal_taps(log_poles: torch.Tensor, residues: torch.Tensor, length: int) -> torch.Tensor:
    return torch.stack([sum(residues[:, s] * torch.exp(log_poles[:, s] * j) for s in range(residues.shape[1]))
                        for j in range(length)], dim=1)


@pytest.mark.parametrize("parametrization", ["poles", "savanna"])
def test_modal_mixer_equals_direct_sum(parametrization):
    mixer = build(functools.partial(ModalFilter, state_size=4, parametrization=parametrization), heads=8)
    f = mixer.hyena.filter
    poles = f.log_poles if parametrization == "poles" else -torch.exp(f.p) * torch.exp(f.gamma)
    x = torch.randn(2, 50, 8, dtype=torch.float64)
    assert rel_err(mixer(x), mixer_reference(mixer, x, modal_taps(poles, f.residues, 50))) < TOL
    # negative twin: positions normalised by L - 1, as implicit filters usually are
    wrong = modal_taps(poles / 49, f.residues, 50)
    assert rel_err(mixer(x), mixer_reference(mixer, x, wrong)) > 1e-3


@pytest.mark.parametrize("block", [None, 1, 3, 20])  # sqrt-sized, one position, 7 blocks (the last shorter), one
def test_modal_kernel_adjoint(monkeypatch, block):
    from hyena_cp.ops import modal
    if block is not None:
        monkeypatch.setattr(modal, "_block", lambda length: block)
    torch.manual_seed(1)
    poles = (-torch.rand(3, 4, dtype=torch.float64) * 0.3).requires_grad_()
    residues = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: modal_kernel(a, b, 20), (poles, residues))
    assert rel_err(modal_kernel(poles, residues, 20), modal_taps(poles, residues, 20)) < 1e-14


def test_modal_kernel_float32_error_is_that_of_one_exponential():
    """The factored exponentials exp(λ k m) exp(λ n) keep float32's accuracy at 16k positions: within a
    few ulps of the float64 filter, relative to the largest tap (the filter is a sum of S terms)."""
    torch.manual_seed(3)
    poles, residues = -torch.rand(8, 16, dtype=torch.float64) * 0.01, torch.randn(8, 16, dtype=torch.float64)
    exact = modal_kernel(poles, residues, 16384)
    fp32 = modal_kernel(poles.float(), residues.float(), 16384).double()
    scale = residues.abs().sum(1, keepdim=True)  # bounds every tap: |h| <= sum |R| for stable poles
    # per term, relative to |R|, in units of u = 2^-24: λ's and R's rounding to float32 (an argument error
    # x u moves exp(-x) by x e^-x u <= u/e, and R by u), the argument products λ k m and λ n (u/e each),
    # the two exponentials and their product (3u), the residue product (u); then the sum of 16 terms
    # (<= 15u of the sum's bound): < 22u; 32u leaves room for an exp within a few ulps.
    assert ((fp32 - exact).abs() / scale).max() < 32 * 2 ** -24


@pytest.mark.parametrize("block", [None, 4])
def test_modal_recurrence_equals_the_convolution(monkeypatch, block):
    from hyena_cp.ops import modal
    if block is not None:
        monkeypatch.setattr(modal, "_block", lambda length: block)  # the prefill of 11 tokens in 3 blocks
    torch.manual_seed(2)
    poles, residues = -torch.rand(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    d, z = torch.randn(6, dtype=torch.float64), torch.randn(2, 6, 30, dtype=torch.float64)
    full = causal_sum(z, modal_taps(poles, residues, 30)) + d[:, None] * z
    state = modal_state(z[..., :11], poles)  # prefill of 11 tokens
    assert rel_err(torch.einsum("bcs,cs->bc", state, residues) + d * z[..., 10], full[..., 10]) < 1e-13
    for t in range(11, 30):
        y, state = modal_step(state, z[..., t], poles, residues, d)
        assert rel_err(y, full[..., t]) < 1e-13, t


# ------------------------------------------------------------------ safari / HyenaDNA filter
def test_safari_positional_table_is_the_definition():
    z, t = safari_positional_table(10, 5, torch.float64)
    n = torch.arange(10, dtype=torch.float64)
    f = torch.tensor([1e-4, 1.0], dtype=torch.float64)  # bands = 2: a band at 1e-4, then 1
    w = 2 * math.pi * n / 10  # by N, while t is by N - 1
    want = torch.stack([n / 9, torch.cos(f[0] * w), torch.cos(f[1] * w), -torch.sin(f[0] * w), -torch.sin(f[1] * w)], 1)
    assert rel_err(z, want) < 1e-15 and rel_err(t, n / 9) < 1e-15
    slow, fast = math.log(1e-2) / 1.5, math.log(1e-2) / 0.3  # linear from the slow rate (group 0) to the fast one
    assert rel_err(safari_decays(3), torch.tensor([slow, (slow + fast) / 2, fast])) < 1e-6


@pytest.mark.parametrize("shift", [0.0, 0.05])
def test_safari_filter_equals_its_formula_on_loaded_tables(shift):
    mixer = build(functools.partial(SafariFilter, l_max=40, emb_dim=5, width=7, sin_freq=10.0, shift=shift),
                  channels=6, heads=6)
    f = mixer.hyena.filter
    with torch.no_grad():  # a trained table and window differ from the init formulas: they must be read
        f.z.add_(0.1 * torch.randn_like(f.z))
        f.t.add_(0.01 * torch.randn_like(f.t))
        f.deltas.add_(torch.randn_like(f.deltas))
        f.freq.add_(torch.randn_like(f.freq))
    length = 33
    a = f.z[:length]
    for layer in f.layers:
        a = torch.sin(f.freq * (a @ layer.weight.T + layer.bias))
    want = (a @ f.out.weight.T) * (torch.exp(-f.t[:length, None] * f.deltas.abs()) + shift)  # L, G
    grid = kernel_grid((range(0, length),), (length,), f.reference((length,)), device=torch.device("cpu"),
                       dtype=torch.float64)
    assert rel_err(f(grid), want.T) < 1e-14
    assert rel_err(f(grid, slice(2, 4)), want.T[2:4]) < 1e-14
    x = torch.randn(2, length, 6, dtype=torch.float64)
    assert rel_err(mixer(x), mixer_reference(mixer, x, want.T)) < TOL
    with pytest.raises(ValueError, match="l_max=40"):
        mixer(torch.randn(1, 41, 6, dtype=torch.float64))
