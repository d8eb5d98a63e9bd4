"""The operator family, single process, in float64 against references written from the definitions:
kernel generators (SIREN and its multi-ω / block-diagonal / learnable-ω / FiLM forms, random Fourier
features), masks, and a whole mixer with gates, QK-norm, conv norms and every boundary, computed with
direct (non-FFT) sums."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from hyena_cp import Hyena, QKVSequenceMixer
from hyena_cp.ops.filters import KernelGrid
from hyena_cp.ops.masks import AxisExponentialMask, ExponentialMask, GaussianMask, gaussian_std_bounds
from hyena_cp.ops.siren import RandomFourierFilter, SirenFilter
from references import direct_conv_nd, direct_short_conv_nd, expand_groups, rel_err

TOL64 = 1e-10


def offsets(n: int, boundary: str) -> list[int]:
    """Tap offsets of a long kernel, from the boundary's definition."""
    if boundary == "causal":
        return list(range(n))
    if boundary == "linear":
        return list(range(-(n - 1), n))
    half = (n - 1) // 2  # one period, symmetric: an even period's offset n/2 has no tap
    return list(range(-half, half + 1))


def coords(size, boundaries, divisors) -> KernelGrid:
    return KernelGrid(tuple(torch.tensor(offsets(n, b), dtype=torch.float64) / r
                            for n, b, r in zip(size, boundaries, divisors)), tuple(size))


def mesh(grid: KernelGrid) -> torch.Tensor:
    """``[N, D]`` coordinates, row-major over the taps."""
    return torch.cartesian_prod(*grid.coords).reshape(-1, len(grid.coords))


# ---------------------------------------------------------------------------------- generators
def siren_reference(f: SirenFilter, grid: KernelGrid, cond: torch.Tensor | None = None) -> torch.Tensor:
    t = mesh(grid)  # N, D
    pre = t @ f.embedding.weight.t() + f.embedding.bias
    if f.learnable_omega:
        pre = 2 * math.pi * f.omega_0 * f.omega_scale.clamp(f.omega_scale_min, f.omega_scale_max) * pre
    h = torch.sin(pre)
    films = []
    if cond is not None:
        o = f.film.mlp[2](F.gelu(f.film.mlp[0](cond)))  # B, layers * 2 * H
        films = [(o[:, i * 2 * f.hidden_dim: i * 2 * f.hidden_dim + f.hidden_dim, None].transpose(1, 2),
                  o[:, i * 2 * f.hidden_dim + f.hidden_dim: (i + 1) * 2 * f.hidden_dim, None].transpose(1, 2))
                 for i in range(f.film.num_layers)]
    if films and f.film_after_embedding:
        gamma, beta = films.pop(0)
        h = gamma * h + beta
    for layer in f.hidden:
        h = torch.sin(h @ layer.weight.t() + layer.bias)
        if films:
            gamma, beta = films.pop(0)
            h = gamma * h + beta
    k = h @ f.out.weight.t() + f.out.bias  # [B,] N, G
    return k.transpose(-1, -2).reshape(*k.shape[:-2], -1, *grid.shape)


@pytest.mark.parametrize("boundaries,size", [(("causal",), (9,)), (("linear", "circular"), (4, 6)),
                                             (("circular", "linear", "causal"), (5, 3, 4))])
@pytest.mark.parametrize("variant", ["plain", "multi_omega", "block", "learnable", "film"])
def test_siren_filter_matches_its_definition(boundaries, size, variant):
    torch.manual_seed(0)
    dims = len(size)
    kw = dict(L_cache=[7, 5, 6][:dims], embedding_dim=8, hidden_dim=8, num_layers=3)
    kw.update({"multi_omega": dict(omega_0_per_row=torch.linspace(1, 20, 8).tolist()),
               "block": dict(num_blocks=2, schedule="log"),
               "learnable": dict(learnable_omega=True, num_blocks=2),
               "film": dict(cond_dim=3, film_init="small_random", film_init_std=0.5, film_after_embedding=True)}
              .get(variant, {}))
    f = SirenFilter(4, dims, **kw).double()
    grid = coords(size, boundaries, [n - 1 for n in kw["L_cache"]])
    cond = torch.randn(2, 3, dtype=torch.float64) if variant == "film" else None
    k = f(grid, conditioning=cond) if cond is not None else f(grid)
    assert k.shape == ((2,) if cond is not None else ()) + (4, *grid.shape)
    assert rel_err(k, siren_reference(f, grid, cond)) < TOL64
    part = f(grid, slice(1, 3), cond) if cond is not None else f(grid, slice(1, 3))
    torch.testing.assert_close(part, k[..., 1:3, *[slice(None)] * dims], rtol=0, atol=1e-14)


def test_siren_initialisation_follows_the_recipe():
    """First layer U(+-2π ω0 / D), per row with several ω; hidden and output U(+-sqrt(6/fan_in)), output
    then scaled by sqrt(1/prod(L_cache)); block-diagonal weights scaled off the diagonal; biases 0."""
    torch.manual_seed(0)
    f = SirenFilter(64, 2, L_cache=(16, 9), embedding_dim=256, hidden_dim=256, omega_0=10.0).double()
    bound = 2 * math.pi * 10.0 / 2
    w0 = f.embedding.weight.abs()
    assert w0.max() <= bound and w0.max() > 0.95 * bound and not f.embedding.bias.any()
    hidden = f.hidden[0].weight.abs()
    assert hidden.max() <= math.sqrt(6 / 256) and hidden.max() > 0.95 * math.sqrt(6 / 256)
    out_bound = math.sqrt(6 / 256) * math.sqrt(1 / (16 * 9))
    assert f.out.weight.abs().max() <= out_bound and f.out.weight.abs().max() > 0.9 * out_bound
    multi = SirenFilter(4, 1, L_cache=8, embedding_dim=4, omega_0_per_row=[1.0, 1.0, 50.0, 50.0]).double()
    rows = multi.embedding.weight.abs().max(dim=1).values
    assert rows[:2].max() <= 2 * math.pi and rows[2:].min() > 2 * math.pi  # slow rows stay below the fast bound
    block = SirenFilter(4, 1, L_cache=8, embedding_dim=4, hidden_dim=4, num_blocks=2, off_block_scale=0.0)
    assert not block.hidden[0].weight[:2, 2:].any() and not block.out.weight[2:, :2].any()
    learn = SirenFilter(4, 1, L_cache=8, embedding_dim=4, num_blocks=2, omega_0_min=2.0, omega_0_max=8.0,
                        learnable_omega=True)
    assert learn.omega_0 == 8.0 and torch.allclose(learn.omega_scale, torch.tensor([0.25, 0.25, 1.0, 1.0]))


def test_random_fourier_filter_matches_its_definition():
    torch.manual_seed(0)
    f = RandomFourierFilter(3, 2, L_cache=(6, 4), embedding_dim=8, hidden_dim=8, num_layers=3, omega_0=0.7,
                            activation="gelu").double()
    grid = coords((4, 3), ("linear", "circular"), (5, 3))
    z = mesh(grid) @ f.embedding.weight.t() + f.embedding.bias
    h = torch.cat([torch.cos(z), torch.sin(z)], -1)
    for layer in f.hidden:
        h = F.gelu(h @ layer.weight.t() + layer.bias)
    ref = (h @ f.out.weight.t() + f.out.bias).t().reshape(3, *grid.shape)
    assert rel_err(f(grid), ref) < TOL64


# --------------------------------------------------------------------------------------- masks
def test_masks_match_their_definitions():
    torch.manual_seed(0)
    grid = coords((5, 4), ("linear", "linear"), (4, 3))
    t = mesh(grid)  # N, 2
    radial = ExponentialMask(3, 2, learnable=True).double()
    ref = torch.exp(-radial.decay[:, None] * t.norm(dim=1)[None]).reshape(3, *grid.shape)
    assert rel_err(radial(grid), ref) < TOL64
    axis = AxisExponentialMask(3, 2).double()
    with torch.no_grad():
        axis.decay[0, 1] = -2.0  # a negative rate acts as its magnitude
    ref = torch.exp(-(t.abs() @ axis.decay.abs())).t().reshape(3, *grid.shape)
    assert rel_err(axis(grid), ref) < TOL64
    for kind in ("direct", "log", "softplus"):
        gauss = GaussianMask(3, 2, grid_step=0.25, parametrization=kind, init_extent=(1.0, 0.5)).double()
        sigma = gauss.widths()
        lo, hi = gaussian_std_bounds(0.25)
        assert sigma.min() >= lo - 1e-12 and sigma.max() <= hi + 1e-12
        ref = torch.exp(-0.5 * ((t[:, :, None] / sigma[None]) ** 2).sum(1)).t().reshape(3, *grid.shape)
        assert rel_err(gauss(grid), ref) < TOL64, kind
    with torch.no_grad():
        gauss = GaussianMask(2, 1, parametrization="direct").double()
        gauss.std.fill_(100.0)  # beyond max_std: clamped, the state_dict value is left alone
    assert torch.allclose(gauss.widths(), torch.full((1, 2), gauss.max_std, dtype=torch.float64))
    assert gauss.std.max() == 100.0


def test_mask_and_decay_settings_live_in_the_state_dict():
    h = Hyena(hidden_dim=8, num_heads=2, spatial_dims=2)
    assert "mask.decay" in h.state_dict()
    g = Hyena(hidden_dim=8, num_heads=2, spatial_dims=2, mask=GaussianMask)
    assert "mask.std" in dict(g.named_parameters())


# ------------------------------------------------------------------------------ whole mixer
def reference_mixer(m: QKVSequenceMixer, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """The mixer's math written out: direct short and long convolutions, norms by their formulas."""
    hy, c = m.hyena, m.hidden_dim
    dims = x.dim() - 2
    u = m.in_proj(x).movedim(-1, 1)  # B, 3C, *S
    if m.short_conv is not None:
        w = m.short_conv.weight[:, 0]
        u = direct_short_conv_nd(u, w, m.short_conv.bias, m.geometry.short_boundaries)
    q, k, v = u.chunk(3, dim=1)
    act = {"silu": F.silu, "sigmoid": torch.sigmoid, None: lambda t: t}
    inner, outer = hy.gating.names

    def per_token(t, kind, weight=None, bias=None, eps=None):
        t = t.movedim(1, -1)
        eps = torch.finfo(t.dtype).eps if eps is None else eps  # torch's RMSNorm default
        if kind == "l2":
            t = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        elif kind == "rmsnorm":
            t = t / torch.sqrt((t * t).mean(-1, keepdim=True) + eps) * weight
        else:
            mu = t.mean(-1, keepdim=True)
            t = (t - mu) / torch.sqrt(((t - mu) ** 2).mean(-1, keepdim=True) + eps) * weight + bias
        return t.movedim(-1, 1)

    kinds = {torch.nn.RMSNorm: "rmsnorm", torch.nn.LayerNorm: "layernorm"}
    if hy.gating.k_norm is not None:
        kind = kinds.get(type(hy.gating.k_norm), "l2")
        k = per_token(k, kind, getattr(hy.gating.k_norm, "weight", None), eps=hy.gating.k_norm.__dict__.get("eps"))
        if hy.gating.v_norm is not None:
            v = per_token(v, kind, getattr(hy.gating.v_norm, "weight", None), eps=hy.gating.v_norm.__dict__.get("eps"))
    z = k * act[inner](v)
    cn = hy.gating.conv_norm
    if cn is not None and type(cn) in kinds:
        z = per_token(z, kinds[type(cn)], cn.weight, getattr(cn, "bias", None), cn.eps)
    elif cn is not None:  # group norm over channel groups and every position
        zg = z.reshape(z.shape[0], cn.num_groups, -1)
        zg = (zg - zg.mean(-1, keepdim=True)) / torch.sqrt(zg.var(-1, unbiased=False, keepdim=True) + cn.eps)
        z = zg.reshape(z.shape) * cn.weight.reshape(1, -1, *[1] * dims) + cn.bias.reshape(1, -1, *[1] * dims)
    size = tuple(x.shape[1:-1])
    h = hy.build_filter(size, slice(None), cond)
    h = expand_groups(h.transpose(0, 1), c).transpose(0, 1) if h.dim() == dims + 2 else expand_groups(h, c)
    y = direct_conv_nd(z, h, hy.skip, hy.geometry.boundaries)
    y = act[outer](q) * y
    return m.out_proj(m.norm(y.movedim(1, -1)))


MIXERS = {
    "vit_recipe_2d": dict(spatial_dims=2, shape=(2, 5, 4, 8), hyena=dict(
        filter=functools.partial(SirenFilter, L_cache=(5, 4)), mask=None, inner_gate="silu", outer_gate="sigmoid",
        qk_norm="l2", conv_norm="rmsnorm", norm_eps=1e-6), mixer=dict(norm="rmsnorm", norm_eps=1e-6, bias=False)),
    "circular_film_gauss_2d": dict(spatial_dims=2, shape=(2, 6, 5, 8), hyena=dict(
        boundary="circular", filter=functools.partial(SirenFilter, L_cache=(3, 3), cond_dim=3,
                                                       film_init="small_random", film_init_std=0.5),
        mask=functools.partial(GaussianMask, grid_step=0.5), qk_norm="rmsnorm", conv_norm="groupnorm",
        conv_norm_groups=2), mixer=dict(short_conv_boundary="linear", norm=None)),
    "mixed_3d_rff": dict(spatial_dims=3, shape=(1, 3, 4, 5, 8), hyena=dict(
        boundary=("causal", "circular", "linear"), filter=functools.partial(RandomFourierFilter, L_cache=4, omega_0=0.5),
        mask=AxisExponentialMask, conv_norm="layernorm"), mixer=dict(short_kernel_size=3)),
    "causal_1d_no_short_conv": dict(spatial_dims=1, shape=(2, 12, 8), hyena=dict(
        filter=functools.partial(SirenFilter, L_cache=16, learnable_omega=True), outer_gate="silu", skip=False),
        mixer=dict(short_kernel_size=None, in_proj_init="small", out_proj_init="wang", init_num_layers=4)),
}


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_family_matches_direct_reference(name):
    spec = MIXERS[name]
    torch.manual_seed(0)
    mixer_kw = dict(spec["mixer"])
    hyena = Hyena(hidden_dim=8, num_heads=mixer_kw.pop("num_heads", 8), spatial_dims=spec["spatial_dims"], **spec["hyena"])
    m = QKVSequenceMixer(hidden_dim=8, hyena=hyena, **mixer_kw).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(*spec["shape"], dtype=torch.float64, requires_grad=True)
    cond = torch.randn(x.shape[0], m.cond_dim, dtype=torch.float64, requires_grad=True) if m.cond_dim else None
    kw = {} if cond is None else {"conditioning": cond}
    y = m(x, **kw)
    ref = reference_mixer(m, x, cond)
    assert rel_err(y, ref) < TOL64
    g = torch.randn_like(y)
    leaves = [x, *([cond] if cond is not None else []), *m.parameters()]
    grads = torch.autograd.grad(y, leaves, g, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, leaves, g, allow_unused=True)
    names = ["x", *(["cond"] if cond is not None else []), *[n for n, _ in m.named_parameters()]]
    for n, a, b in zip(names, grads, grads_ref):
        assert (a is None) == (b is None), n
        if a is not None:
            assert rel_err(a, b) < TOL64, n


def test_a_causal_axis_stays_causal_in_3d():
    torch.manual_seed(0)
    hyena = Hyena(hidden_dim=8, num_heads=2, spatial_dims=3, boundary=("causal", "circular", "linear"))
    m = QKVSequenceMixer(hidden_dim=8, hyena=hyena).double()
    x = torch.randn(1, 6, 3, 4, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 4:] = torch.randn_like(x2[:, 4:])  # change the future frames
    torch.testing.assert_close(m(x)[:, :4], m(x2)[:, :4], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(filter=functools.partial(SirenFilter, L_cache=8), max_len=64), "max_len / max_grid configure the default"),
    (dict(filter=SirenFilter(3, 1, L_cache=8)), "num_groups, spatial_dims\\)=\\(3, 1\\)"),
    (dict(inner_gate="swish"), "inner_gate='swish' must be None or one of"),
    (dict(qk_norm="layernorm"), "qk_norm='layernorm' must be None or one of"),
    (dict(boundary=("causal", "periodic")), "boundary=\\('causal', 'periodic'\\) must give one of"),
    (dict(filter=functools.partial(SirenFilter, L_cache=1)), "L_cache=1 must be an int >= 2"),
])
def test_bad_operator_settings_name_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Hyena(hidden_dim=8, num_heads=2, spatial_dims=kwargs.pop("dims", 1), **kwargs)


def test_conditioning_is_required_exactly_when_the_filter_is_conditioned():
    hyena = Hyena(hidden_dim=8, num_heads=2, spatial_dims=2, filter=functools.partial(SirenFilter, L_cache=4, cond_dim=3))
    m = QKVSequenceMixer(hidden_dim=8, hyena=hyena)
    x = torch.randn(2, 4, 4, 8)
    with pytest.raises(ValueError, match="needs `conditioning=` tensor"):
        m(x)
    with pytest.raises(ValueError, match="conditioning must be \\[B, cond_dim\\] = \\[2, 3\\]"):
        m(x, conditioning=torch.randn(2, 4))
    assert m(x, conditioning=torch.randn(2, 3)).shape == x.shape
