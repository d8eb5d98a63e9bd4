"""Float64 references of whole Evo 2 (StripedHyena 2) and HyenaDNA models, written from their
definitions as direct sums (no FFT, nothing of hyena_cp), reading checkpoints in the ORIGINAL
formats (vortex's keys and layouts; HyenaDNA's HuggingFace keys); and random checkpoints in those
formats, every term non-zero (biases, skips, norm scales != 1, stable poles, decaying MR taps)."""
from __future__ import annotations

import math

import torch

# ----------------------------------------------------------------------------------- Evo 2
EVO2_TINY = {  # vortex keys; 7 layers SE, MR, LI, attention, SE, MR, LI
    "vocab_size": 64, "hidden_size": 8, "num_layers": 7, "num_attention_heads": 2, "proj_groups": 1,
    "hcs_layer_idxs": [0, 4], "hcm_layer_idxs": [1, 5], "hcl_layer_idxs": [2, 6], "attn_layer_idxs": [3],
    "hcs_filter_length": 7, "hcm_filter_length": 128, "hcs_filter_groups": 4, "hcm_filter_groups": 4,
    "hcl_filter_groups": 8, "short_filter_length": 3, "short_filter_bias": False, "state_size": 4, "eps": 1e-6,
    "rotary_emb_base": 10000, "inner_mlp_size": 12, "qkv_proj_bias": False, "hyena_out_proj_bias": True,
    "mha_out_proj_bias": True, "interleave": True, "column_split": True, "column_split_hyena": False,
    "hyena_flip_x1x2": False, "evo2_style_activations": True, "mlp_activation": "gelu", "tie_embeddings": True,
    "final_norm": True, "max_seqlen": 1024, "use_flash_attn": False, "use_fp8_input_projections": False,
}


def random_evo2_checkpoint(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A vortex-format checkpoint (A.1.8 of the layouts: interleaved projections, per-head Wqkv)."""
    g = torch.Generator().manual_seed(seed)
    d, f, s = cfg["hidden_size"], cfg["inner_mlp_size"], cfg["state_size"]
    rnd = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale  # noqa: E731
    sd = {"embedding_layer.weight": rnd(cfg["vocab_size"], d), "norm.scale": 1 + 0.2 * rnd(d)}
    for i in range(cfg["num_layers"]):
        p = f"blocks.{i}."
        sd.update({p + "pre_norm.scale": 1 + 0.2 * rnd(d), p + "post_norm.scale": 1 + 0.2 * rnd(d),
                   p + "mlp.l1.weight": rnd(f, d, scale=d ** -0.5), p + "mlp.l2.weight": rnd(f, d, scale=d ** -0.5),
                   p + "mlp.l3.weight": rnd(d, f, scale=f ** -0.5)})
        if i in cfg["attn_layer_idxs"]:
            hd = d // cfg["num_attention_heads"]
            sd.update({p + "inner_mha_cls.Wqkv.weight": rnd(3 * d, d, scale=d ** -0.5),
                       p + "inner_mha_cls.out_proj.weight": rnd(d, d, scale=d ** -0.5),
                       p + "inner_mha_cls.out_proj.bias": 0.1 * rnd(d),
                       p + "inner_mha_cls.rotary_emb.inv_freq":
                           cfg["rotary_emb_base"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)})
            if cfg["qkv_proj_bias"]:
                sd[p + "inner_mha_cls.Wqkv.bias"] = 0.1 * rnd(3 * d)
            continue
        sd.update({p + "projections.weight": rnd(3 * d, d, scale=d ** -0.5),
                   p + "filter.short_filter_weight": rnd(3 * d, 1, cfg["short_filter_length"], scale=0.5),
                   p + "out_filter_dense.weight": rnd(d, d, scale=d ** -0.5),
                   p + "out_filter_dense.bias": 0.1 * rnd(d)})
        if cfg["qkv_proj_bias"]:
            sd[p + "projections.bias"] = 0.1 * rnd(3 * d)
        if cfg["short_filter_bias"]:
            sd[p + "filter.short_filter_bias"] = 0.1 * rnd(3 * d)
        if i in cfg["hcl_layer_idxs"]:
            sd[p + "filter.log_poles"] = -torch.rand(d, s, 1, generator=g, dtype=torch.float64) * 0.5 - 0.01
            sd[p + "filter.residues"] = rnd(d, s, scale=0.5)
            sd[p + "filter.D"] = rnd(d)
        elif i in cfg["hcm_layer_idxs"]:
            k = cfg["hcm_filter_length"]
            decay = torch.exp(-torch.arange(k, dtype=torch.float64) / 20)
            sd[p + "filter.h"] = (rnd(cfg["hcm_filter_groups"], k, scale=0.3) * decay)[:, None]
            if k >= 128:  # vortex: only a filter of 128 taps or more has the skip D
                sd[p + "filter.D"] = rnd(d)
        else:
            sd[p + "filter.h"] = rnd(cfg["hcs_filter_groups"], 1, cfg["hcs_filter_length"], scale=0.4)
    return sd


def causal_sum(u: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """``y[c, t] = sum_j taps[c, j] u[c, t - j]`` (``taps[:, 0]`` multiplies the current token)."""
    y = torch.zeros_like(u)
    length = u.shape[-1]
    for j in range(min(taps.shape[1], length)):
        y[:, j:] += taps[:, j:j + 1] * u[:, :length - j]
    return y


def rmsnorm_eps_outside(x, scale, eps):
    return scale * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps)


def _gated_mlp(x, sd, p, layer):
    z1, z2 = x @ sd[p + "mlp.l1.weight"].T, x @ sd[p + "mlp.l2.weight"].T
    if layer == 0:
        z1 = torch.nn.functional.gelu(z1)  # exact GELU in the first layer only
    return (z1 * z2) @ sd[p + "mlp.l3.weight"].T


def _evo2_hyena(x, sd, i, kind, cfg):
    p, d = f"blocks.{i}.", cfg["hidden_size"]
    a = rmsnorm_eps_outside(x, sd[p + "pre_norm.scale"], cfg["eps"])
    proj = a @ sd[p + "projections.weight"].T
    if cfg["qkv_proj_bias"]:
        proj = proj + sd[p + "projections.bias"]
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        z = causal_sum(proj[b].T, sd[p + "filter.short_filter_weight"][:, 0].flip(-1))  # cross-correlation taps
        if cfg["short_filter_bias"]:
            z = z + sd[p + "filter.short_filter_bias"][:, None]
        q, k, v = z[0::3], z[1::3], z[2::3]  # interleaved rows 3c + {post-gate, pre-gate, value}
        u = k * v
        if kind in ("hcs", "hcm") and cfg[f"{kind}_filter_length"] < 128:  # vortex's rule: SE-like below 128 taps
            taps = sd[p + "filter.h"][:, 0].flip(-1).repeat_interleave(d // cfg[f"{kind}_filter_groups"], 0)
            y = causal_sum(u, taps)  # cross-correlation order, no skip
        elif kind in ("hcs", "hcm"):
            taps = sd[p + "filter.h"][:, 0].repeat_interleave(d // cfg[f"{kind}_filter_groups"], 0)
            y = causal_sum(u, taps) + sd[p + "filter.D"][:, None] * u  # convolution order, skip
        else:
            t = torch.arange(u.shape[1], dtype=torch.float64)
            h = (sd[p + "filter.residues"][:, :, None] * torch.exp(sd[p + "filter.log_poles"] * t)).sum(1)
            y = causal_sum(u, h) + sd[p + "filter.D"][:, None] * u
        out[b] = (q * y).T
    x = x + out @ sd[p + "out_filter_dense.weight"].T + sd[p + "out_filter_dense.bias"]
    return x + _gated_mlp(rmsnorm_eps_outside(x, sd[p + "post_norm.scale"], cfg["eps"]), sd, p, i)


def _rope(x, pos, base):
    d = x.shape[-1]
    ang = pos[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _evo2_attention(x, sd, i, cfg):
    p, d, heads = f"blocks.{i}.", cfg["hidden_size"], cfg["num_attention_heads"]
    hd = d // heads
    qkv = rmsnorm_eps_outside(x, sd[p + "pre_norm.scale"], cfg["eps"]) @ sd[p + "inner_mha_cls.Wqkv.weight"].T
    if cfg["qkv_proj_bias"]:
        qkv = qkv + sd[p + "inner_mha_cls.Wqkv.bias"]
    batch, length, _ = x.shape
    qkv = qkv.reshape(batch, length, heads, 3, hd)  # checkpoint rows: per head [q; k; v]
    pos = torch.arange(length, dtype=torch.float64)
    if cfg.get("use_interpolated_rotary_pos_emb"):
        pos = pos / cfg["rotary_emb_scaling_factor"]
    ctx = torch.empty(batch, length, heads, hd, dtype=torch.float64)
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
    for b in range(batch):
        q, k = _rope(qkv[b, :, :, 0], pos, cfg["rotary_emb_base"]), _rope(qkv[b, :, :, 1], pos, cfg["rotary_emb_base"])
        for h in range(heads):
            scores = (q[:, h] @ k[:, h].T / math.sqrt(hd)).masked_fill(causal, float("-inf"))
            ctx[b, :, h] = torch.softmax(scores, -1) @ qkv[b, :, h, 2]
    x = x + ctx.reshape(batch, length, d) @ sd[p + "inner_mha_cls.out_proj.weight"].T + sd[p + "inner_mha_cls.out_proj.bias"]
    return x + _gated_mlp(rmsnorm_eps_outside(x, sd[p + "post_norm.scale"], cfg["eps"]), sd, p, i)


def evo2_forward(cfg: dict, sd: dict[str, torch.Tensor], ids: torch.Tensor, hidden: bool = False):
    """Logits ``[B, L, V]`` (or, with ``hidden``, the list of every block's output and the final norm's)."""
    x = sd["embedding_layer.weight"][ids]
    outs = []
    for i in range(cfg["num_layers"]):
        if i in cfg["attn_layer_idxs"]:
            x = _evo2_attention(x, sd, i, cfg)
        else:
            kind = "hcl" if i in cfg["hcl_layer_idxs"] else "hcm" if i in cfg["hcm_layer_idxs"] else "hcs"
            x = _evo2_hyena(x, sd, i, kind, cfg)
        outs.append(x)
    x = rmsnorm_eps_outside(x, sd["norm.scale"], cfg["eps"])
    return outs + [x] if hidden else x @ sd["embedding_layer.weight"].T


# --------------------------------------------------------------------------------- HyenaDNA
HYENADNA_TINY = {  # HuggingFace HyenaConfig keys
    "vocab_size": 12, "d_model": 8, "d_inner": 20, "n_layer": 2, "max_seq_len": 64, "emb_dim": 5,
    "filter_order": 6, "num_inner_mlps": 2, "hyena_order": 2, "short_filter_order": 3, "activation_freq": 10,
    "train_freq": True, "use_bias": True, "embed_dropout": 0.1, "hyena_dropout": 0.0, "hyena_filter_dropout": 0.0,
    "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "pad_vocab_size_multiple": 8, "tie_word_embeddings": False,
    "pad_token_id": 4, "model_type": "hyenadna",
}


def hyenadna_vocab(cfg: dict) -> int:
    multiple = cfg["pad_vocab_size_multiple"]
    return math.ceil(cfg["vocab_size"] / multiple) * multiple


def random_hyenadna_checkpoint(cfg: dict, seed: int = 0, prefix: str = "hyena.backbone.") -> dict[str, torch.Tensor]:
    """A HuggingFace-format HyenaDNA checkpoint; its tables (z, t, deltas) moved off their init
    formulas so a converter that recomputes them instead of loading them fails."""
    g = torch.Generator().manual_seed(seed)
    d, n, e, w = cfg["d_model"], cfg["max_seq_len"], cfg["emb_dim"], cfg["filter_order"]
    rnd = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale  # noqa: E731
    sd = {prefix + "embeddings.word_embeddings.weight": rnd(hyenadna_vocab(cfg), d),
          prefix + "ln_f.weight": 1 + 0.2 * rnd(d), prefix + "ln_f.bias": 0.1 * rnd(d),
          "lm_head.weight": rnd(hyenadna_vocab(cfg), d, scale=d ** -0.5)}
    for i in range(cfg["n_layer"]):
        p = f"{prefix}layers.{i}."
        m = p + "mixer."
        bands = (e - 1) // 2
        pos = torch.arange(n, dtype=torch.float64)
        f = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)
        ang = f * (2 * math.pi * pos / n)[:, None]
        z = torch.cat([(pos / (n - 1))[:, None], ang.cos(), -ang.sin()], -1)
        freq = cfg["activation_freq"] + rnd(1, w)
        sd.update({
            p + "norm1.weight": 1 + 0.2 * rnd(d), p + "norm1.bias": 0.1 * rnd(d),
            p + "norm2.weight": 1 + 0.2 * rnd(d), p + "norm2.bias": 0.1 * rnd(d),
            p + "mlp.fc1.weight": rnd(cfg["d_inner"], d, scale=d ** -0.5), p + "mlp.fc1.bias": 0.1 * rnd(cfg["d_inner"]),
            p + "mlp.fc2.weight": rnd(d, cfg["d_inner"], scale=cfg["d_inner"] ** -0.5), p + "mlp.fc2.bias": 0.1 * rnd(d),
            m + "in_proj.weight": rnd(3 * d, d, scale=d ** -0.5), m + "in_proj.bias": 0.1 * rnd(3 * d),
            m + "out_proj.weight": rnd(d, d, scale=d ** -0.5), m + "out_proj.bias": 0.1 * rnd(d),
            m + "short_filter.weight": rnd(3 * d, 1, cfg["short_filter_order"], scale=0.5),
            m + "short_filter.bias": 0.1 * rnd(3 * d), m + "filter_fn.bias": rnd(d),
            m + "filter_fn.pos_emb.z": (z + 0.05 * rnd(n, e))[None], m + "filter_fn.pos_emb.t": (pos / (n - 1) + 0.01 * rnd(n))[None, :, None],
            m + "filter_fn.implicit_filter.0.weight": rnd(w, e, scale=0.5), m + "filter_fn.implicit_filter.0.bias": rnd(w),
            m + "filter_fn.implicit_filter.2.weight": rnd(w, w, scale=w ** -0.5), m + "filter_fn.implicit_filter.2.bias": rnd(w),
            m + "filter_fn.implicit_filter.4.weight": rnd(w, w, scale=w ** -0.5), m + "filter_fn.implicit_filter.4.bias": rnd(w),
            m + "filter_fn.implicit_filter.6.weight": rnd(d, w, scale=w ** -0.5),
            m + "filter_fn.modulation.deltas": (torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, d,
                                                               dtype=torch.float64) + rnd(d))[None, None],
        })
        for alias in (1, 3, 5):  # one Sin module after every Linear: one shared tensor, listed under each alias
            sd[m + f"filter_fn.implicit_filter.{alias}.freq"] = freq
    return sd


def _layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt((x - mu).pow(2).mean(-1, keepdim=True) + eps) * w + b


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _hyenadna_operator(u, sd, m, d, shift, num_inner_mlps):
    length = u.shape[1]
    a = sd[m + "filter_fn.pos_emb.z"][0, :length]  # loaded, never recomputed
    t = sd[m + "filter_fn.pos_emb.t"][0, :length, 0]
    freq = sd[m + "filter_fn.implicit_filter.1.freq"][0]
    for i in range(num_inner_mlps + 1):
        a = torch.sin(freq * (a @ sd[m + f"filter_fn.implicit_filter.{2 * i}.weight"].T
                              + sd[m + f"filter_fn.implicit_filter.{2 * i}.bias"]))
    h = a @ sd[m + f"filter_fn.implicit_filter.{2 * num_inner_mlps + 2}.weight"].T  # L, D (no bias)
    h = h * (torch.exp(-t[:, None] * sd[m + "filter_fn.modulation.deltas"][0, 0].abs()) + shift)
    out = torch.empty_like(u)
    for b in range(u.shape[0]):
        p = (u[b] @ sd[m + "in_proj.weight"].T + sd[m + "in_proj.bias"]).T  # 3D, L: rows [x0; x1; v]
        s = causal_sum(p, sd[m + "short_filter.weight"][:, 0].flip(-1)) + sd[m + "short_filter.bias"][:, None]
        x0, x1, v = s[:d], s[d:2 * d], s[2 * d:]
        v = x1 * v
        y = x0 * (causal_sum(v, h.T) + sd[m + "filter_fn.bias"][:, None] * v)
        out[b] = y.T @ sd[m + "out_proj.weight"].T + sd[m + "out_proj.bias"]
    return out


def hyenadna_forward(cfg: dict, sd: dict[str, torch.Tensor], ids: torch.Tensor, shift: float = 0.05,
                     prefix: str = "hyena.backbone.", hidden: bool = False):
    """HuggingFace's HyenaDNAForCausalLM in float64: logits ``[B, L, V_pad]`` (or the hidden states)."""
    d = cfg["d_model"]
    x = sd[prefix + "embeddings.word_embeddings.weight"][ids]
    outs = []
    for i in range(cfg["n_layer"]):
        p = f"{prefix}layers.{i}."
        x = x + _hyenadna_operator(_layernorm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-5), sd,
                                   p + "mixer.", d, shift, cfg["num_inner_mlps"])
        a = _layernorm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-5)
        x = x + _gelu_tanh(a @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].T \
            + sd[p + "mlp.fc2.bias"]
        outs.append(x)
    x = _layernorm(x, sd[prefix + "ln_f.weight"], sd[prefix + "ln_f.bias"], cfg["layer_norm_epsilon"])
    return outs + [x] if hidden else x @ sd["lm_head.weight"].T
