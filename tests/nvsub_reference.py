"""A float64 reference of nvSubquadratic 0.2.0's modules, written from their definitions, for the
converter's tests: plain config (nested dicts with ``__target__``) + state_dict in nvSubquadratic's key
layout in, output out. Every long convolution is an explicit sum over (output, input) pairs (no FFT);
nvSubquadratic itself is never imported. Also `random_state_dict`: random parameters in its key
layout for a config, inside the ranges its forward pre-hooks clamp to.

Definitions (nvSubquadratic 0.2.0):
- kernel taps on axis a at ``t = d / (L_a - 1)`` for offsets d; ``L_a = L_cache_a`` on a zero-padded
  axis and ``(L_cache_a + 1) // 2`` on a circular one; grid half-width ``n_a = N_a`` (zero) or
  ``(N_a + 1) // 2`` (circular), offsets ``-(n_a - 1) .. n_a - 1``;
- convolution ``y[i] = sum_j u[j] k(i - j)``: zero axes sum every j of the grid, causal sums j <= i,
  circular takes ``i - j`` modulo N with representative in ``[-(n-1), n-1]`` (none for N/2, N even);
  then ``+ shortcut * u``;
- Hyena: ``y = O(conv(P(N_q(q) σ1(N_k(k)))) σ2(v))``, N_k only when σ1 is Identity;
- QKVSequenceMixer: ``q, k, v = chunk(x W_qkv^T, 3)``, out_proj after.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

T64 = torch.float64


def name(cfg) -> str | None:
    return cfg["__target__"].rsplit(".", 1)[-1] if isinstance(cfg, dict) and "__target__" in cfg else None


def sub(sd: dict, prefix: str) -> dict:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix + ".")}


def lin(x, sd, key):
    return F.linear(x, sd[key + ".weight"], sd.get(key + ".bias"))


def per_axis(value, dims):
    return list(value) if isinstance(value, (list, tuple)) else [value] * dims


def act(cfg, x):
    return {"GELU": F.gelu, "SiLU": F.silu, "ReLU": F.relu, "Identity": lambda t: t, "Sigmoid": torch.sigmoid,
            "Tanh": torch.tanh}[name(cfg)](x)


# ------------------------------------------------------------------------------------------ kernels
def periodic_axes(cfg) -> list[bool]:
    pad, dims = cfg["fft_padding"], cfg["data_dim"]
    return [pad == "circular"] * dims if isinstance(pad, str) else [m == "circular" for m in pad]


def grid_extent(cfg) -> list[int]:
    """L per axis after CKConvND halves L_cache on single-grid (circular) axes."""
    single = periodic_axes(cfg)
    return [(L + 1) // 2 if s else L for L, s in zip(per_axis(cfg["kernel_cfg"]["L_cache"], cfg["data_dim"]), single)]


def kernel_grid(sizes, cfg) -> torch.Tensor:
    """``[*K, D]`` tap coordinates for an input of ``sizes``."""
    single, extent = periodic_axes(cfg), grid_extent(cfg)
    axes = []
    for n_in, s, L in zip(sizes, single, extent):
        n = (n_in + 1) // 2 if s else n_in
        axes.append((torch.arange(2 * n - 1, dtype=T64) - (n - 1)) / (L - 1))
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def film_pairs(cfg, sd, cond):
    out = lin(F.gelu(lin(cond, sd, "mlp.0")), sd, "mlp.2")  # B, layers * 2H, chunks [γ | β]
    width = cfg["kernel_hidden_dim"]
    return [(c[:, :width], c[:, width:]) for c in out.chunk(cfg["num_film_layers"], dim=-1)]


def learnable_omega(cfg) -> float:
    if name(cfg) == "LearnableOmegaSIRENKernelND":
        return cfg["omega_0"]
    if cfg.get("omega_0_per_block") is not None:
        return max(cfg["omega_0_per_block"])
    nb, lo, hi = cfg.get("num_blocks", 8), cfg.get("omega_0_min", 1.0), cfg.get("omega_0_max", 12.0)
    if cfg.get("schedule", "linear") == "log":
        return float(torch.logspace(math.log10(lo), math.log10(hi), nb, dtype=T64).max())
    return float(torch.linspace(lo, hi, nb, dtype=T64).max())


def kernel_values(cfg, sd, grid, cond):
    """``[1|B, *K, out]``."""
    dims = grid.shape[-1]
    t = grid.reshape(1, -1, dims)  # 1, N, D
    z = lin(t, sd, "positional_embedding.linear")
    if name(cfg) == "RandomFourierKernelND":
        h = torch.cat([torch.cos(z), torch.sin(z)], dim=-1)
        for i in range(cfg["num_layers"] - 1):
            h = act(cfg["nonlinear_cfg"], lin(h, sd, f"kernel_network.{2 * i}"))
        return lin(h, sd, "out_linear").reshape(1, *grid.shape[:-1], -1)
    if "LearnableOmega" in name(cfg):
        scale = sd["positional_embedding.omega_0_scale"].to(T64)
        scale = scale.clamp(cfg.get("omega_0_scale_min", 1e-2), cfg.get("omega_0_scale_max", 2.0))
        z = 2 * math.pi * learnable_omega(cfg) * scale * z
    h = torch.sin(z)
    pairs = film_pairs(cfg["film_cfg"], sub(sd, "film_generator"), cond) \
        if cfg.get("film_cfg") is not None and cond is not None else None
    if pairs and cfg.get("film_after_pos_embed", False):
        g, b = pairs.pop(0)
        h = g[:, None] * h + b[:, None]
    for i in range(cfg["num_layers"] - 1):
        h = torch.sin(lin(h, sd, f"hidden_linears.{i}"))
        if pairs:
            g, b = pairs[i]
            h = g[:, None] * h + b[:, None]
    k = lin(h, sd, "out_linear")
    return k.reshape(k.shape[0], *grid.shape[:-1], -1)


def mask_values(cfg, sd, grid, k, extent):
    kind = name(cfg)
    if kind == "Identity":
        return k
    if kind == "ExponentialModulationND":
        return k * torch.exp(-(grid.abs().unsqueeze(-1) * sd["weight"].abs()).sum(-2))
    par = cfg.get("parametrization", "direct")
    p = sd["std_param"]
    std = {"direct": lambda s: s, "log": torch.exp, "softplus": F.softplus}[par](p)
    sig = lambda a, x: x * math.sqrt(-1.0 / (2.0 * math.log(a)))  # noqa: E731
    lo = sig(cfg.get("min_attenuation_at_step", 0.1), 1.0 / (max(extent) - 1))
    std = std.clamp(lo, sig(cfg.get("max_attenuation_at_limit", 0.95), 1.0))
    return k * torch.exp(-0.5 * (grid.square().unsqueeze(-1) / std.square()).sum(-2))


def tap_index(n_in: int, taps: int, mode: str) -> torch.Tensor:
    """``[N, N]`` kernel index of offset i - j for output i, input j, or -1 for no term."""
    i, j = torch.arange(n_in)[:, None], torch.arange(n_in)[None, :]
    if mode == "causal":
        idx = i - j  # the causal kernel is cropped to offsets 0..n-1
    elif mode == "zero":
        idx = i - j + taps // 2
    else:  # circular: representative of i - j in [-(n-1), n-1], n = (N+1)//2
        half = (taps - 1) // 2
        idx = (i - j + half) % n_in
    return torch.where((idx >= 0) & (idx < taps), idx, torch.full_like(idx, -1))


def direct_conv(u, k, modes):
    """``u [B, C, *N]``, ``k [1|B, C, *K]`` -> ``sum_j u[j] k[idx(i, j)]`` per axis (a gather, no FFT)."""
    dims = u.dim() - 2
    m = k.expand(u.shape[0], *k.shape[1:])
    m = F.pad(m, (0, 1) * dims)  # index -1 reads an appended zero
    for axis, mode in enumerate(modes):
        dim = 2 + 2 * axis
        idx = tap_index(u.shape[2 + axis], k.shape[2 + axis], mode)
        m = m.index_select(dim, idx.reshape(-1) % m.shape[dim]).unflatten(dim, idx.shape)
    outs, ins = "ikm"[:dims], "jln"[:dims]
    pairs = "".join(a + b for a, b in zip(outs, ins))
    return torch.einsum(f"bc{pairs},bc{ins}->bc{outs}", m, u)


def ckconv(cfg, sd, u, cond=None):
    """``u [B, C, *N]`` channels first."""
    grid = kernel_grid(u.shape[2:], cfg)
    extent = grid_extent(cfg)
    k = kernel_values(cfg["kernel_cfg"], sub(sd, "kernel"), grid, cond)
    k = mask_values(cfg["mask_cfg"], sub(sd, "mask"), grid, k, extent)
    causal = cfg.get("is_causal", False)
    if causal:
        k = k[:, k.shape[1] // 2:]
    k = k.movedim(-1, 1)
    modes = ["causal"] if causal else ["circular" if p else "zero" for p in periodic_axes(cfg)]
    return direct_conv(u, k, modes) + sd["shortcut"].view(1, -1, *[1] * (u.dim() - 2)) * u


# ------------------------------------------------------------------------------------ norms, Hyena
def norm(cfg, sd, x):
    """Channels-first ``x [B, C, *S]``; every norm but GroupNorm is per position over the channels."""
    kind = name(cfg)
    if cfg is None or kind == "Identity":
        return x
    if kind == "GroupNorm":
        return F.group_norm(x, cfg["num_groups"], sd["weight"], sd["bias"], cfg.get("eps", 1e-5))
    y = x.movedim(1, -1)
    if kind == "L2Norm":
        y = F.normalize(y, dim=-1, eps=cfg.get("eps", 1e-12))
    elif kind == "LayerNorm":
        y = F.layer_norm(y, (y.shape[-1],), sd["weight"], sd["bias"], cfg.get("eps", 1e-5))
    else:  # RMSNorm, RMSNormChannelFirst, torch's RMSNorm
        eps = cfg.get("eps", 1e-6 if cfg["__target__"].startswith("nvsubquadratic") else torch.finfo(T64).eps)
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps) * sd["weight"]
    return y.movedim(-1, 1)


def short_conv(cfg, sd, x):
    kind = name(cfg)
    if kind == "Identity":
        return x
    dims = x.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    w, b = sd["weight"], sd.get("bias")
    if kind.startswith("DistributedDepthwise"):
        w, causal = w.unsqueeze(1), cfg.get("causal", False)
    else:
        causal = kind == "CausalConv1D" and cfg.get("is_causal", True)
    k = w.shape[-1]
    if causal:
        return conv(F.pad(x, (k - 1, 0)), w, b, groups=x.shape[1])
    if cfg.get("padding_mode", "zeros") == "circular":
        return conv(F.pad(x, (k // 2, k // 2) * dims, mode="circular"), w, b, groups=x.shape[1])
    return conv(x, w, b, padding=k // 2, groups=x.shape[1])


def hyena(cfg, sd, q, k, v, cond=None):
    q, k, v = (t.movedim(-1, 1) for t in (q, k, v))  # B, C, *S
    c = q.shape[1]
    q, k, v = short_conv(cfg["short_conv_cfg"], sub(sd, "short_conv"), torch.cat([q, k, v], 1)).split(c, 1)
    gate1 = cfg["gate_nonlinear_cfg"]
    gate2 = cfg.get("gate_nonlinear_2_cfg") or gate1
    if cfg.get("qk_norm_cfg") is not None:
        q = norm(cfg["qk_norm_cfg"], sub(sd, "q_norm"), q)
        if name(gate1) == "Identity":
            k = norm(cfg["qk_norm_cfg"], sub(sd, "k_norm"), k)
    z = norm(cfg["pixelhyena_norm_cfg"], sub(sd, "pixelhyena_norm"), q * act(gate1, k))
    y = ckconv(cfg["global_conv_cfg"], sub(sd, "global_conv"), z, cond) * act(gate2, v)
    return norm(cfg.get("output_norm_cfg"), sub(sd, "output_norm"), y).movedim(1, -1)


def qkv_mixer(cfg, sd, x, conditioning=None):
    q, k, v = lin(x, sd, "qkv_proj").chunk(3, dim=-1)
    return lin(hyena(cfg["mixer_cfg"], sub(sd, "mixer"), q, k, v, conditioning), sd, "out_proj")


def adapter(cfg, sd, x, conditioning=None):
    b, t, c = x.shape
    grid = x.reshape(b, t // cfg["grid_w"], cfg["grid_w"], c)
    return qkv_mixer(cfg["inner_mixer_cfg"], sub(sd, "inner_mixer"), grid, conditioning).reshape(b, t, c)


# ------------------------------------------------------------------------------------------ networks
def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def block(cfg, sd, x):
    m = adapter(cfg["sequence_mixer_cfg"], sub(sd, "sequence_mixer"), rms(x, sd["input_norm.weight"]))
    x = x + m * sd["ls_attn.gamma"]
    h = F.gelu(F.linear(rms(x, sd["mlp_norm.weight"]), sd["mlp.layer1.weight"]))
    return x + F.linear(h, sd["mlp.layer2.weight"]) * sd["ls_mlp.gamma"]


def embed(sd, images, patch):
    x = F.conv2d(images.movedim(-1, 1), sd["patch_embed.weight"], stride=patch)  # B, C, h, w
    return x.flatten(2).transpose(1, 2) + sd["pos_embed"]


def classification_net(cfg, sd, images):
    """``images [B, H, W, C_in]`` (theirs: channels last) -> logits."""
    x = embed(sd, images, cfg["patch_size"])
    b, patches = x.shape[:2]
    cls = cfg["readout"] == "cls"
    parts = [x] + ([sd["cls_token"].expand(b, -1, -1)] if cls else []) + \
        ([sd["reg_token"].expand(b, -1, -1)] if cfg["num_registers"] else [])
    x = torch.cat(parts, 1)
    for i in range(cfg["num_blocks"]):
        x = block(cfg["block_cfg"], sub(sd, f"blocks.{i}"), x)
    out = x[:, patches] if cls else x[:, :patches].mean(1)
    return F.linear(rms(out, sd["out_norm.weight"]), sd["out_proj.weight"])


def hierarchical_net(cfg, sd, images):
    x = embed(sd, images, cfg["initial_patch_size"])
    b, g = x.shape[0], cfg["image_size"] // cfg["initial_patch_size"]
    for s, depth in enumerate(cfg["stage_depths"]):
        for j in range(depth):
            x = block(cfg["stage_block_cfgs"][s], sub(sd, f"stage_blocks.{s}.{j}"), x)
        if s < len(cfg["stage_depths"]) - 1:
            p = sub(sd, f"patch_merges.{s}")
            grid = x.reshape(b, g, g, -1)
            merged = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], -1)
            x = F.linear(rms(merged, p["norm.weight"]), p["reduction.weight"]).flatten(1, 2)
            g //= 2
    return F.linear(rms(x.mean(1), sd["out_norm.weight"]), sd["out_proj.weight"])


def forward(cfg, sd, x, conditioning=None):
    kind = name(cfg)
    if kind == "QKVSequenceMixer":
        return qkv_mixer(cfg, sd, x, conditioning)
    if kind == "ViT5HyenaAdapter":
        return adapter(cfg, sd, x, conditioning)
    if kind == "CKConvND":
        return ckconv(cfg, sd, x.movedim(-1, 1), conditioning).movedim(1, -1)
    if kind == "ViT5ClassificationNet":
        return classification_net(cfg, sd, x)
    return hierarchical_net(cfg, sd, x)


# ---------------------------------------------------------------------------- random state_dicts
def random_state_dict(cfg, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random parameters in nvSubquadratic's key layout for ``cfg`` (float64; the learnable ω scale
    float32, as nvSubquadratic stores it), inside the ranges its pre-hooks clamp to."""
    out: dict[str, torch.Tensor] = {}
    rnd = lambda *shape, scale=1.0: torch.randn(*shape, generator=generator, dtype=T64) * scale  # noqa: E731
    uni = lambda shape, lo, hi: lo + (hi - lo) * torch.rand(*shape, generator=generator, dtype=T64)  # noqa: E731

    def linear(key, n_out, n_in, bias=True):
        out[key + ".weight"] = rnd(n_out, n_in, scale=n_in ** -0.5)
        if bias:
            out[key + ".bias"] = rnd(n_out, scale=0.3)

    def norm_params(prefix, c, node):
        kind = name(node)
        if kind in ("RMSNorm", "RMSNormChannelFirst", "LayerNorm", "GroupNorm"):
            out[prefix + ".weight"] = 1 + rnd(c, scale=0.2)
        if kind in ("LayerNorm", "GroupNorm"):
            out[prefix + ".bias"] = rnd(c, scale=0.2)

    def kernel(prefix, node, c, dims):
        e, h, layers, bias = node["embedding_dim"], node["mlp_hidden_dim"], node["num_layers"], node["use_bias"]
        rff = name(node) == "RandomFourierKernelND"
        out[prefix + ".positional_embedding.linear.weight"] = rnd(e // 2 if rff else e, dims, scale=6.0)
        if bias:
            out[prefix + ".positional_embedding.linear.bias"] = rnd(e // 2 if rff else e, scale=0.5)
        widths = [e] + [h] * (layers - 1)
        for i in range(layers - 1):
            linear(f"{prefix}.{'kernel_network.' + str(2 * i) if rff else 'hidden_linears.' + str(i)}",
                   widths[i + 1], widths[i], bias)
        linear(prefix + ".out_linear", c, h, bias)
        if "LearnableOmega" in name(node):
            lo, hi = node.get("omega_0_scale_min", 1e-2), node.get("omega_0_scale_max", 2.0)
            out[prefix + ".positional_embedding.omega_0_scale"] = uni((e,), lo, hi / 4).float()
        film = node.get("film_cfg")
        if film is not None:
            fh = film.get("film_hidden_dim", 64)
            linear(prefix + ".film_generator.mlp.0", fh, film["cond_dim"])
            linear(prefix + ".film_generator.mlp.2", 2 * film["num_film_layers"] * h, fh)
            out[prefix + ".film_generator.mlp.2.bias"] += torch.cat([torch.ones(h), torch.zeros(h)]).repeat(
                film["num_film_layers"]).to(T64)

    def ckconv_params(prefix, node):
        c, dims = node["hidden_dim"], node["data_dim"]
        out[prefix + ".shortcut"] = rnd(c)
        kernel(prefix + ".kernel", node["kernel_cfg"], c, dims)
        mask = node["mask_cfg"]
        if name(mask) == "ExponentialModulationND":
            out[prefix + ".mask.weight"] = uni((dims, c), 0.5, 6.0)
        elif name(mask) != "Identity":
            sig = lambda a, x: x * math.sqrt(-1.0 / (2.0 * math.log(a)))  # noqa: E731
            lo = sig(mask.get("min_attenuation_at_step", 0.1), 1.0 / (max(grid_extent(node)) - 1))
            hi = sig(mask.get("max_attenuation_at_limit", 0.95), 1.0)
            std = uni((dims, c), 1.05 * lo, 0.95 * hi)
            par = mask.get("parametrization", "direct")
            out[prefix + ".mask.std_param"] = {"direct": std, "log": std.log(), "softplus": std.expm1().log()}[par]

    def mixer(prefix, node):
        c, hy = node["hidden_dim"], node["mixer_cfg"]
        linear(prefix + ".qkv_proj", 3 * c, c, node.get("qkv_bias", False))
        linear(prefix + ".out_proj", c, c, node.get("out_proj_bias", False))
        p = prefix + ".mixer"
        ckconv_params(p + ".global_conv", hy["global_conv_cfg"])
        sc = hy["short_conv_cfg"]
        if name(sc) != "Identity":
            k = sc["kernel_size"]
            dims = hy["global_conv_cfg"]["data_dim"]
            distributed = name(sc).startswith("DistributedDepthwise")
            out[p + ".short_conv.weight"] = rnd(3 * c, *([] if distributed else [1]), *[k] * dims, scale=0.5)
            if sc.get("bias", not distributed):
                out[p + ".short_conv.bias"] = rnd(3 * c, scale=0.3)
        norm_params(p + ".pixelhyena_norm", c, hy["pixelhyena_norm_cfg"])
        norm_params(p + ".output_norm", c, hy.get("output_norm_cfg"))
        if hy.get("qk_norm_cfg") is not None:
            norm_params(p + ".q_norm", c, hy["qk_norm_cfg"])
            if name(hy["gate_nonlinear_cfg"]) == "Identity":
                norm_params(p + ".k_norm", c, hy["qk_norm_cfg"])

    def vit_block(prefix, node):
        c = node["hidden_dim"]
        hidden = int(c * node["mlp_cfg"].get("expansion_factor", 2.0))
        mixer(prefix + ".sequence_mixer.inner_mixer", node["sequence_mixer_cfg"]["inner_mixer_cfg"])
        for key in ("input_norm", "mlp_norm"):
            out[f"{prefix}.{key}.weight"] = 1 + rnd(c, scale=0.2)
        linear(prefix + ".mlp.layer1", hidden, c, False)
        linear(prefix + ".mlp.layer2", c, hidden, False)
        for key in ("ls_attn", "ls_mlp"):
            out[f"{prefix}.{key}.gamma"] = 0.3 + rnd(c, scale=0.1)

    def stem(cfg, c, patch, in_ch, classes, last):
        grid = cfg["image_size"] // patch
        out["patch_embed.weight"] = rnd(c, in_ch, patch, patch, scale=(in_ch * patch * patch) ** -0.5)
        out["pos_embed"] = rnd(1, grid * grid, c, scale=0.3)
        out["out_norm.weight"] = 1 + rnd(last, scale=0.2)
        linear("out_proj", classes, last, False)

    kind = name(cfg)
    if kind == "QKVSequenceMixer":
        mixer("", cfg)
    elif kind == "ViT5HyenaAdapter":
        mixer(".inner_mixer", cfg["inner_mixer_cfg"])
    elif kind == "CKConvND":
        ckconv_params("", cfg)
    elif kind == "ViT5ClassificationNet":
        c = cfg["hidden_dim"]
        stem(cfg, c, cfg["patch_size"], cfg["in_channels"], cfg["num_classes"], c)
        if cfg["readout"] == "cls":
            out["cls_token"] = rnd(1, 1, c, scale=0.3)
        if cfg["num_registers"]:
            out["reg_token"] = rnd(1, cfg["num_registers"], c, scale=0.3)
        for i in range(cfg["num_blocks"]):
            vit_block(f"blocks.{i}", cfg["block_cfg"])
    else:
        dims = cfg["stage_dims"]
        stem(cfg, dims[0], cfg["initial_patch_size"], cfg["in_channels"], cfg["num_classes"], dims[-1])
        for s, depth in enumerate(cfg["stage_depths"]):
            for j in range(depth):
                vit_block(f"stage_blocks.{s}.{j}", cfg["stage_block_cfgs"][s])
            if s < len(dims) - 1:
                out[f"patch_merges.{s}.norm.weight"] = 1 + rnd(4 * dims[s], scale=0.2)
                linear(f"patch_merges.{s}.reduction", dims[s + 1], 4 * dims[s], False)
    return {k.lstrip("."): v for k, v in out.items()}
