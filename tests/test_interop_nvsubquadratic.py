"""hyena_cp.interop.nvsubquadratic: nvSubquadratic 0.2.0 configs (plain data, written here) with random
state_dicts in its key layout, converted, against a float64 reference of nvSubquadratic's math written
from its definitions (`nvsub_reference`: direct sums, no FFT, no nvSubquadratic import): outputs, input
grads and every parameter grad. Then context parallelism of converted mixers and a converted network
against the single process, negative twins (no q/k/v permutation, no L_cache halving on circular axes),
and every refusal naming its key."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

import nvsub_reference as ref
from hyena_cp import instantiate
from hyena_cp.interop import nvsubquadratic as nvsub
from hyena_cp.interop.nvsubquadratic import kernels as kernels_module
from hyena_cp.interop.nvsubquadratic import mixer as mixer_module
from hyena_cp.parallel import shard, unshard
from references import rel_err

TOL64 = 1e-10
NV, TORCH = "nvsubquadratic.", "torch.nn.modules."
NETS = ("ViT5ClassificationNet", "ViT5HierarchicalClassificationNet")


# ----------------------------------------------------------------------------------- config builders
def node(target: str, **kw) -> dict:
    return {"__target__": target, **kw}


IDENTITY = node(TORCH + "linear.Identity")
SILU, SIGMOID = node(TORCH + "activation.SiLU"), node(TORCH + "activation.Sigmoid")
L2 = node(NV + "utils.qk_norm.L2Norm")
SMALL = {"__callable__": NV + "utils.init.small_init"}


def wang(layers: int) -> dict:
    return node(NV + "utils.init.partial_wang_init_fn_with_num_layers", num_layers=layers)


def rms(c: int, cls: str = "rms_norm.RMSNorm", **kw) -> dict:
    return node(NV + "modules." + cls, dim=c, eps=1e-6, **kw)


def kernel(cls: str, c: int, dims: int, l_cache, **kw) -> dict:
    base = dict(out_dim=c, data_dim=dims, mlp_hidden_dim=16, num_layers=3, embedding_dim=16, L_cache=l_cache,
                use_bias=True)
    return node(NV + "modules.kernels_nd." + cls, **{**base, **kw})


def gaussian(c: int, dims: int, cls: str = "GaussianModulationND", **kw) -> dict:
    return node(NV + "modules.masks_nd." + cls, data_dim=dims, num_channels=c, grid_size=0, **kw)


def exponential(c: int, dims: int) -> dict:
    return node(NV + "modules.masks_nd.ExponentialModulationND", data_dim=dims, num_channels=c)


def ckconv(c: int, dims: int, kern: dict, mask: dict = IDENTITY, padding="zero", **kw) -> dict:
    grid = None if isinstance(padding, list) else ("single" if padding == "circular" else "double")
    return node(NV + "modules.ckconv_nd.CKConvND", data_dim=dims, hidden_dim=c, kernel_cfg=kern, mask_cfg=mask,
                grid_type=grid, fft_padding=padding, **kw)


def conv(c: int, dims: int, k: int = 3, **kw) -> dict:
    return node(f"{TORCH}conv.Conv{dims}d", in_channels=3 * c, out_channels=3 * c, kernel_size=k, groups=3 * c,
                padding=k // 2, **{"bias": False, **kw})


def mixer(c: int, global_conv: dict, short: dict, gate: dict = SILU, gate2: dict | None = SIGMOID,
          pixel: dict = IDENTITY, qk: dict | None = L2, out: dict = IDENTITY, **kw) -> dict:
    hyena = node(NV + "modules.hyena_nd.Hyena", global_conv_cfg=global_conv, short_conv_cfg=short,
                 gate_nonlinear_cfg=gate, pixelhyena_norm_cfg=pixel, qk_norm_cfg=qk, output_norm_cfg=out)
    if gate2 is not None:
        hyena["gate_nonlinear_2_cfg"] = gate2
    return node(NV + "modules.sequence_mixer.QKVSequenceMixer", hidden_dim=c, mixer_cfg=hyena, **kw)


def vit_recipe(c: int = 16, l_cache=8, grid_w: int | None = None) -> dict:
    """The ViT-5 Hyena recipe's mixer (gated): SIREN, zero padding, SiLU/Sigmoid, L2 QK-norm, RMSNorms."""
    m = mixer(c, ckconv(c, 2, kernel("SIRENKernelND", c, 2, l_cache, omega_0=10.0, mlp_hidden_dim=32,
                                     embedding_dim=32)),
              conv(c, 2), pixel=rms(c), out=rms(c), init_method_in=SMALL, init_method_out=wang(12))
    return m if grid_w is None else node(NV + "modules.vit5_hyena_adapter.ViT5HyenaAdapter", inner_mixer_cfg=m,
                                         grid_w=grid_w)


def block(c: int, grid_w: int, l_cache) -> dict:
    mlp = node(NV + "modules.mlp.MLP", dim=c, activation="gelu", expansion_factor=4.0,
               dropout_cfg=node(TORCH + "dropout.Dropout", p=0.0), init_method_in=SMALL, init_method_out=wang(2))
    return node(NV + "modules.vit5_residual_block.ViT5ResidualBlock", sequence_mixer_cfg=vit_recipe(c, l_cache, grid_w),
                sequence_mixer_norm_cfg=rms(c), mlp_cfg=mlp, mlp_norm_cfg=rms(c), hidden_dim=c, layer_scale_init=1e-4,
                drop_path_rate=0.05)


def vit_net(readout: str = "cls", registers: int = 3) -> dict:
    rows = 4 + (readout == "cls" or registers > 0)
    return node(NV + "networks.vit5_classification.ViT5ClassificationNet", in_channels=3, num_classes=5,
                hidden_dim=8, num_blocks=2, patch_size=4, image_size=16, num_registers=registers,
                norm_cfg=rms(8), readout=readout, block_cfg=block(8, 4, rows))


def hier_net() -> dict:
    merge = node(NV + "modules.patch_merging.PatchMerging", in_dim=8, out_dim=16, grid_h=8, grid_w=8,
                 norm_cfg=rms(32))
    return node(NV + "networks.vit5_hierarchical_classification.ViT5HierarchicalClassificationNet", in_channels=3,
                num_classes=5, image_size=16, initial_patch_size=2, stage_dims=[8, 16], stage_depths=[1, 2],
                stage_block_cfgs=[block(8, 8, 8), block(16, 4, 4)], patch_merge_cfgs=[merge], norm_cfg=rms(16))


def case_1d_causal():
    c = 8
    return mixer(c, ckconv(c, 1, kernel("SIRENKernelND", c, 1, 32, omega_0=10.0), exponential(c, 1), is_causal=True),
                 node(NV + "modules.causal_conv1d.CausalConv1D", in_channels=24, out_channels=24, kernel_size=3,
                      groups=24, bias=False, is_causal=True),
                 pixel=rms(c, "rms_norm_channel_first.RMSNormChannelFirst"),
                 out=rms(c, "rms_norm_channel_first.RMSNormChannelFirst"), qk=node(L2["__target__"], dim=1),
                 init_method_in=SMALL, init_method_out=wang(4)), (2, 24, c), None


def case_1d_distributed_short_cache():
    """L_cache < L (taps beyond +-1), a causal distributed short conv with bias, Identity gate (q and k
    RMS-normed), torch LayerNorm before the conv, torch RMSNorm (eps None) after."""
    c = 8
    short = node(NV + "modules.distributed_depthwise_conv_nd.DistributedDepthwiseConv1d", hidden_dim=24,
                 kernel_size=4, causal=True, bias=True)
    return mixer(c, ckconv(c, 1, kernel("SIRENKernelND", c, 1, 5, omega_0=3.0), gaussian(c, 1), is_causal=True),
                 short, gate=IDENTITY, gate2=SILU, qk=rms(c), pixel=node(TORCH + "normalization.LayerNorm",
                                                                        normalized_shape=c),
                 out=node(TORCH + "normalization.RMSNorm", normalized_shape=[c])), (2, 12, c), None


def case_1d_rff_noncausal():
    c = 8
    kern = kernel("RandomFourierKernelND", c, 1, 12, omega_0=1.0, nonlinear_cfg=node(TORCH + "activation.GELU"))
    return mixer(c, ckconv(c, 1, kern, gaussian(c, 1, parametrization="log")), IDENTITY, gate=IDENTITY, gate2=None,
                 qk=None, qkv_bias=True, out_proj_bias=True), (2, 12, c), None


def case_2d_vit_recipe():
    return vit_recipe(16, 8), (2, 8, 7, 16), None


def case_2d_circular():
    """The circular ImageNet recipe: RFF, Gaussian, single grid, GroupNorm(1, C) (a global
    statistic), L2 QK-norm on q and k, zero-padded short conv; an even axis (no Nyquist tap)."""
    c = 16
    kern = kernel("RandomFourierKernelND", c, 2, 8, omega_0=1.0, nonlinear_cfg=SILU)
    return mixer(c, ckconv(c, 2, kern, gaussian(c, 2), padding="circular"), conv(c, 2), gate=IDENTITY, gate2=None,
                 pixel=node(TORCH + "normalization.GroupNorm", num_groups=1, num_channels=c),
                 init_method_in=SMALL, init_method_out=wang(7)), (2, 8, 7, c), None


def case_2d_circular_learnable_omega():
    """Circular on both axes with a circular short conv (padding_mode) and a learnable-ω SIREN."""
    c = 8
    kern = kernel("LearnableOmegaSIRENKernelND", c, 2, [6, 5], omega_0=4.0, omega_0_scale_init=[1.0] * 16,
                  apply_lr_scale=True)
    return mixer(c, ckconv(c, 2, kern, exponential(c, 2), padding="circular"),
                 conv(c, 2, padding_mode="circular", bias=True), pixel=rms(c), qk=rms(c)), (2, 6, 5, c), None


def case_2d_mixed_multi_omega():
    c = 16
    kern = kernel("MultiOmegaSIRENKernelND", c, 2, [5, 6], embedding_dim=8,
                  omega_0_per_row=[1.0, 2.0, 4.0, 8.0, 1.0, 2.0, 4.0, 8.0])
    return mixer(c, ckconv(c, 2, kern, exponential(c, 2), padding=["circular", "zero"]), conv(c, 2),
                 qk=None), (2, 6, 5, c), None


def case_2d_film_block_diagonal():
    c = 16
    film = node(NV + "modules.film.KernelFiLMGenerator", cond_dim=6, kernel_hidden_dim=16, num_film_layers=3,
                film_hidden_dim=8, init_type="small_random", init_std=0.3)
    kern = kernel("BlockDiagonalMultiOmegaSIRENKernelND", c, 2, 5, num_blocks=4, schedule="log",
                  film_cfg=film, film_after_pos_embed=True)
    return mixer(c, ckconv(c, 2, kern, gaussian(c, 2, "BlockAlignedGaussianModulationND")), conv(c, 2),
                 pixel=rms(c), out=rms(c)), (3, 5, 4, c), 6


def case_2d_identity_gate_groupnorm():
    """RMS QK-norm on q and k (Identity gate, eps 1e-6) and GroupNorm(2, C) with its own eps 1e-5."""
    c = 16
    kern = kernel("SIRENKernelND", c, 2, 5, omega_0=5.0)
    return mixer(c, ckconv(c, 2, kern, gaussian(c, 2, init_extent=[1.0, 0.5], parametrization="softplus")),
                 conv(c, 2, bias=True), gate=IDENTITY, gate2=None, qk=rms(c),
                 pixel=node(TORCH + "normalization.GroupNorm", num_groups=2, num_channels=c)), (2, 5, 6, c), None


def case_3d():
    """The 3-D spatial-recall recipe: Conv3d, Identity gates, LayerNorm before the conv, channel-first
    L2 QK-norm, Gaussian mask, one scalar L_cache for every axis."""
    c = 8
    kern = kernel("SIRENKernelND", c, 3, 6, omega_0=10.0)
    return mixer(c, ckconv(c, 3, kern, gaussian(c, 3)), conv(c, 3), gate=IDENTITY, gate2=None,
                 pixel=node(TORCH + "normalization.LayerNorm", normalized_shape=c), qk=node(L2["__target__"], dim=1)
                 ), (2, 4, 6, 5, c), None


def case_3d_mixed_learnable_blocks():
    c = 8
    kern = kernel("BlockDiagonalLearnableOmegaSIRENKernelND", c, 3, [4, 6, 6], num_blocks=2, schedule="log")
    short = node(NV + "modules.distributed_depthwise_conv_nd.DistributedDepthwiseConv3d", hidden_dim=24, kernel_size=3)
    return mixer(c, ckconv(c, 3, kern, exponential(c, 3), padding=["zero", "circular", "circular"]), short,
                 pixel=rms(c)), (2, 4, 6, 5, c), None


def case_ckconv_blockdiag_learnable_circular():
    c = 16
    kern = kernel("BlockDiagonalLearnableOmegaSIRENKernelND", c, 2, 7, num_blocks=4, omega_0_per_block=[1, 2, 4, 8])
    return ckconv(c, 2, kern, padding="circular"), (2, 7, 6, c), None


def case_adapter():
    return vit_recipe(16, 5, grid_w=4), (2, 20, 16), None


CASES = {f.__name__[len("case_"):]: f for f in (
    case_1d_causal, case_1d_distributed_short_cache, case_1d_rff_noncausal, case_2d_vit_recipe, case_2d_circular,
    case_2d_circular_learnable_omega, case_2d_mixed_multi_omega, case_2d_film_block_diagonal,
    case_2d_identity_gate_groupnorm, case_3d, case_3d_mixed_learnable_blocks, case_ckconv_blockdiag_learnable_circular,
    case_adapter)}
CASES.update({"vit_cls": lambda: (vit_net("cls", 3), (2, 16, 16, 3), None),
              "vit_gap": lambda: (vit_net("gap", 0), (2, 16, 16, 3), None),
              "hierarchical": lambda: (hier_net(), (2, 16, 16, 3), None)})


# ------------------------------------------------------------------------------------------ running
def inputs(cfg, shape, cond_dim, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sd = ref.random_state_dict(cfg, gen)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    cond = None if cond_dim is None else torch.randn(shape[0], cond_dim, generator=gen, dtype=torch.float64)
    return {"sd": sd, "x": x, "cond": cond}


def build_ours(cfg, sd) -> torch.nn.Module:
    config, state = nvsub.convert(cfg, sd)
    model = instantiate(config).double()
    model.load_state_dict(state, strict=True)
    return model.eval()  # stochastic depth off: the reference is the deterministic function


def call_ours(model, cfg, x, cond, cp_group=None):
    if ref.name(cfg) in NETS:  # ours: images [B, C_in, H, W]; theirs: [B, H, W, C_in]
        return model(x.permute(0, 3, 1, 2), cp_group=cp_group)
    return model(x, cp_group=cp_group, **({} if cond is None else {"conditioning": cond}))


def compare(cfg, shape, cond_dim) -> dict[str, float]:
    """Relative errors of ours against the reference: output, input grad, worst parameter grad."""
    data = inputs(cfg, shape, cond_dim)
    # float64 leaves (their learnable ω scale is stored float32: its gradient would be rounded to it)
    theirs = {k: v.clone().double().requires_grad_(True) for k, v in data["sd"].items()}
    x_ref, x = data["x"].clone().requires_grad_(True), data["x"].clone().requires_grad_(True)
    y_ref = ref.forward(cfg, theirs, x_ref, data["cond"])
    w = torch.randn_like(y_ref)
    (y_ref * w).sum().backward()
    model = build_ours(cfg, data["sd"])
    y = call_ours(model, cfg, x, data["cond"])
    (y * w).sum().backward()
    _, want = nvsub.convert(cfg, {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in theirs.items()})
    params = dict(model.named_parameters())
    grads = {k: rel_err(params[k].grad, g) if g.abs().max() > 0 else float(params[k].grad.abs().max())
             for k, g in want.items()}
    return {"y": rel_err(y, y_ref), "dx": rel_err(x.grad, x_ref.grad), "dparam": max(grads.values()),
            "worst_param": max(grads, key=grads.get)}


@pytest.mark.parametrize("name", list(CASES))
def test_converted_module_matches_reference(name):
    errors = compare(*CASES[name]())
    assert errors["y"] < TOL64 and errors["dx"] < TOL64, errors
    assert errors["dparam"] < TOL64, errors


def test_comparison_fails_without_the_qkv_permutation(monkeypatch):
    """Negative twin: converting their [q; k; v] blocks as ours unpermuted changes the function."""
    monkeypatch.setattr(mixer_module, "QKV_TO_OURS", (0, 1, 2))
    assert compare(*CASES["2d_vit_recipe"]())["y"] > 1e-3


def test_comparison_fails_without_halving_l_cache_on_circular_axes(monkeypatch):
    """Negative twin: CKConvND builds its kernel with L_cache halved on circular axes."""
    whole = kernels_module._l_cache
    monkeypatch.setattr(kernels_module, "_l_cache", lambda k, dims, single: whole(k, dims, (False,) * dims))
    assert compare(*CASES["2d_circular"]())["y"] > 1e-3


def test_dictconfig_and_arithmetic_strings_convert_alike():
    """An OmegaConf DictConfig (as nvSubquadratic's LazyConfig makes) and its instantiate's arithmetic
    strings ("2 * 8") give the same conversion as the plain dicts."""
    cfg, shape, _ = CASES["2d_vit_recipe"]()
    sd = ref.random_state_dict(cfg, torch.Generator().manual_seed(0))
    plain_cfg, plain_sd = nvsub.convert(cfg, sd)
    arith = copy.deepcopy(cfg)
    arith["hidden_dim"] = "2 * 8"
    dc_cfg, dc_sd = nvsub.convert(OmegaConf.create(arith), sd)
    assert OmegaConf.to_yaml(plain_cfg) == OmegaConf.to_yaml(dc_cfg)
    assert plain_sd.keys() == dc_sd.keys() and all(torch.equal(plain_sd[k], dc_sd[k]) for k in plain_sd)
    assert nvsub.convert(cfg)[1] is None


def test_recipe_inits_map_to_ours():
    config, _ = nvsub.convert(CASES["2d_vit_recipe"]()[0])
    assert (config.in_proj_init, config.out_proj_init, config.init_num_layers) == ("small", "wang", 12)


# ----------------------------------------------------------------------------- context parallelism
def run_rank(name: str, group=None) -> dict:
    cfg, shape, cond_dim = CASES[name]()
    data = inputs(cfg, shape, cond_dim)
    model = build_ours(cfg, data["sd"])
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    net = ref.name(cfg) in NETS
    layout = "zigzag" if name.startswith("1d_causal") else "rows"
    x = data["x"] if net or world == 1 else shard(data["x"], 1, layout, world, rank)
    x = x.clone().requires_grad_(True)
    y = call_ours(model, cfg, x, data["cond"], group)
    w = torch.randn(y.shape if net or world == 1 else data["x"].shape, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    w = w / world if net else (w if world == 1 else shard(w, 1, layout, world, rank))  # each rank: its share
    (y * w).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "layout": layout,
            "params": {k: p.grad for k, p in model.named_parameters()}}


def worker(name: str) -> dict:
    return run_rank(name, dist.group.WORLD)


CP = [("2d_vit_recipe", 2), ("2d_vit_recipe", 4), ("3d_mixed_learnable_blocks", 2), ("3d_mixed_learnable_blocks", 4),
      ("2d_circular", 2), ("1d_causal", 2), ("vit_cls", 2), ("hierarchical", 2)]


@pytest.mark.parametrize("name,world", CP, ids=[f"{n}-P{w}" for n, w in CP])
def test_converted_module_under_cp_equals_single_process(dist_run, name, world):
    single = run_rank(name)
    results = dist_run(worker, world, name)
    net = ref.name(CASES[name]()[0]) in NETS
    if net:  # every rank has the full images and the same logits; input grads are summed like parameters
        y, dx = results[0]["y"], sum(r["dx"] for r in results)
        assert all(torch.equal(r["y"], y) for r in results)
    else:
        y = unshard([r["y"] for r in results], 1, single["layout"])
        dx = unshard([r["dx"] for r in results], 1, single["layout"])
    assert rel_err(y, single["y"]) < TOL64, "output"
    assert rel_err(dx, single["dx"]) < TOL64, "input grad"
    for key, g in single["params"].items():
        assert rel_err(sum(r["params"][key] for r in results), g) < TOL64, f"grad of {key}"


# ---------------------------------------------------------------------------------------- refusals
def _set(path: str, value):
    def edit(cfg):
        *parents, last = path.split(".")
        target = cfg
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[last] = value
        return cfg
    return edit


REFUSALS = {
    "padding_tokens": (lambda: vit_net("cls", 2), _set("num_registers", 2), "num_registers"),
    "groupnorm_output_norm": (lambda: vit_recipe(), _set("mixer_cfg.output_norm_cfg", node(
        TORCH + "normalization.GroupNorm", num_groups=1, num_channels=16)), "mixer_cfg.output_norm_cfg"),
    "unknown_target": (lambda: vit_recipe(), _set("mixer_cfg.global_conv_cfg.kernel_cfg.__target__",
                                                  NV + "modules.kernels_nd.FancyKernelND"),
                       "mixer_cfg.global_conv_cfg.kernel_cfg.__target__"),
    "unknown_root_target": (lambda: vit_recipe(), _set("__target__", "mypkg.Mixer"), "__target__"),
    "unknown_init": (lambda: vit_recipe(), _set("init_method_in", {"__callable__": "mypkg.init.fancy"}),
                     "init_method_in"),
    "unknown_key": (lambda: vit_recipe(), _set("mixer_cfg.global_conv_cfg.frobnicate", 1),
                    "mixer_cfg.global_conv_cfg.frobnicate"),
    "our_target_key": (lambda: vit_recipe(), _set("mixer_cfg.gate_nonlinear_cfg", {"_target_": "torch.nn.SiLU"}),
                       "mixer_cfg.gate_nonlinear_cfg._target_"),
    "register_row": (hier_net, _set("layout", "register_row"), "layout"),
    "single_grid_zero_padding": (lambda: vit_recipe(), _set("mixer_cfg.global_conv_cfg.grid_type", "single"),
                                 "mixer_cfg.global_conv_cfg.grid_type"),
    "causal_2d": (lambda: vit_recipe(), _set("mixer_cfg.global_conv_cfg.is_causal", True),
                  "mixer_cfg.global_conv_cfg.is_causal"),
    "interpolation": (lambda: vit_recipe(), _set("hidden_dim", "${net.hidden_dim}"), "hidden_dim"),
    "circular_short_conv_zero_long_conv": (lambda: vit_recipe(), _set("mixer_cfg.short_conv_cfg.padding_mode",
                                                                      "circular"), "short_conv_cfg.padding_mode"),
    "centred_short_conv_causal_long_conv": (lambda: case_1d_causal()[0], _set("mixer_cfg.short_conv_cfg.is_causal",
                                                                              False), "short_conv_cfg.__target__"),
    "gelu_tanh_gate": (lambda: vit_recipe(), _set("mixer_cfg.gate_nonlinear_cfg", node(
        TORCH + "activation.GELU", approximate="tanh")), "gate_nonlinear_cfg.__target__"),
    "blocks_differ": (lambda: vit_net("cls", 3), lambda c: {**c, "block_cfg": None, "layer_pattern": "HG",
                                                            "layer_types": {"H": block(8, 4, 5), "G": block(8, 4, 6)}},
                      "layer_pattern"),
    "attention_block": (lambda: vit_net("cls", 3), _set("block_cfg.sequence_mixer_cfg.__target__",
                                                        NV + "modules.vit5_attention.ViT5Attention"),
                        "block_cfg.sequence_mixer_cfg.__target__"),
    "register_pooling": (lambda: vit_net("cls", 3), lambda c: _set("block_cfg.num_registers", 3)(_set(
        "block_cfg.register_pooling_cfg", node(NV + "modules.film.RegisterPooling", num_registers=3))(c)),
                         "block_cfg.register_pooling_cfg"),
    "linear_drop_path": (lambda: vit_net("cls", 3), lambda c: {**c, "max_drop_path_rate": 0.1,
                                                               "drop_path_schedule": "linear"}, "drop_path_schedule"),
    "other_norm_eps": (lambda: vit_net("cls", 3), _set("norm_cfg.eps", 1e-5), "norm_cfg.eps"),
    "stage_widths": (hier_net, _set("stage_dims", [8, 24]), "stage_dims"),
    "shared_short_conv_taps": (lambda: case_3d_mixed_learnable_blocks()[0], _set("mixer_cfg.short_conv_cfg.num_groups",
                                                                                 3), "short_conv_cfg.num_groups"),
    "torch_default_eps_before_the_conv": (lambda: case_2d_identity_gate_groupnorm()[0], _set(
        "mixer_cfg.pixelhyena_norm_cfg", node(TORCH + "normalization.RMSNorm", normalized_shape=16)),
        "mixer_cfg.pixelhyena_norm_cfg"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_what_does_not_convert_raises_naming_the_key(name):
    make, edit, key = REFUSALS[name]
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("$", r"\$")):
        nvsub.convert(edit(make()))


def test_state_dict_keys_are_checked():
    cfg = vit_recipe()
    sd = ref.random_state_dict(cfg, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="'mixer.output_norm.weight' is missing"):
        nvsub.convert(cfg, {k: v for k, v in sd.items() if k != "mixer.output_norm.weight"})
    with pytest.raises(ValueError, match="'mixer.extra' has no counterpart"):
        nvsub.convert(cfg, {**sd, "mixer.extra": torch.zeros(1)})
