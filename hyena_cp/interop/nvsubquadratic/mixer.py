"""nvSubquadratic's ``QKVSequenceMixer`` + ``Hyena`` (and ``ViT5HyenaAdapter``, bare ``CKConvND``) as ours.

nvSubquadratic's operator is ``y = O((h * z + D z) σ2(v))``, ``z = P(N_q(q) σ1(N_k(k)))`` — QK-norm on q
(and on k only when σ1 is Identity), σ1 on k inside the long conv, σ2 on v outside it; ours is
``y = σ_o(q') (h * z + D z)``, ``z = N_c(N_k(k') σ_i(N_v(v')))`` with ``N_v`` only when there is no
inner gate. So their (q, k, v) is our (k', v', q'): the ``[q; k; v]`` row blocks of ``qkv_proj`` (and
its bias) and the 3C channel blocks of the short conv become our ``[v; q; k]`` blocks — the
permutation `QKV_TO_OURS`. Then σ1 -> ``inner_gate``, σ2 -> ``outer_gate`` (σ1 when not given),
``q_norm`` -> ``gating.k_norm``, ``k_norm`` -> ``gating.v_norm``, the pixelhyena norm -> ``conv_norm``,
the output norm -> the mixer's ``norm`` (each with its eps), ``shortcut`` -> ``hyena.skip``.

Norms: a norm over the channels of each position (nvSubquadratic's ``RMSNorm``,
``RMSNormChannelFirst``, ``L2Norm(dim=-1 or 1)``, torch's ``RMSNorm``/``LayerNorm``) converts as it is;
``GroupNorm`` (statistics over channels AND positions) converts as the pixelhyena norm only (our
``conv_norm="groupnorm"``, exact under CP, where nvSubquadratic's takes per-shard statistics). Refused:
a GroupNorm output or QK norm, an L2 pixelhyena norm, non-affine norms, any module we do not know.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig

from hyena_cp.interop.nvsubquadratic.inits import check_init
from hyena_cp.interop.nvsubquadratic.kernels import LongConvPlan, convert_ckconv
from hyena_cp.interop.nvsubquadratic.nodes import Node, StateMap
from hyena_cp.lazy import LazyCall
from hyena_cp.models.adapter import ViT5HyenaAdapter
from hyena_cp.modules.hyena import Hyena
from hyena_cp.modules.long_conv import LongConv
from hyena_cp.modules.mixer import QKVSequenceMixer

__all__ = ["MixerPlan", "QKV_TO_OURS", "convert_qkv_mixer", "convert_adapter", "convert_bare_ckconv"]

QKV_TO_OURS = (2, 0, 1)  # our blocks [q'; k'; v'] are their blocks [v; q; k]
GATES = {"Identity": None, "SiLU": "silu", "Sigmoid": "sigmoid", "GELU": "gelu", "Tanh": "tanh", "ReLU": "relu"}
_L2_EPS = 1e-12


def qkv_to_ours(t: torch.Tensor) -> torch.Tensor:
    """Their ``[q; k; v]`` blocks along dim 0 -> our ``[q'; k'; v'] = [v; q; k]``."""
    blocks = t.chunk(3, dim=0)
    return torch.cat([blocks[i] for i in QKV_TO_OURS], dim=0)


@dataclass
class NormPlan:
    kind: str | None  # "rmsnorm", "layernorm", "l2", "groupnorm" or None
    eps: float | None = None
    groups: int = 1
    params: tuple[str, ...] = ()  # state_dict entries: "weight", "bias"


@dataclass
class MixerPlan:
    """Our mixer: `Hyena` and `QKVSequenceMixer` kwargs (without ``hidden_dim`` / ``spatial_dims`` /
    ``hyena``, which the caller sets) and the state_dict rules (their mixer -> ours)."""

    hidden_dim: int
    spatial_dims: int
    hyena: dict[str, Any]
    mixer: dict[str, Any]
    state: StateMap = field(default_factory=StateMap)

    def config(self) -> DictConfig:
        hyena = LazyCall(Hyena)(hidden_dim=self.hidden_dim, spatial_dims=self.spatial_dims, **self.hyena)
        return LazyCall(QKVSequenceMixer)(hidden_dim=self.hidden_dim, hyena=hyena, **self.mixer)


def _gate(node: Node) -> str | None:
    if not node.is_(*GATES) or (node.name == "GELU" and node.get("approximate", "none") != "none"):
        node.fail("__target__", f"{node.target!r}: gates convert from torch's Identity, SiLU, Sigmoid, GELU (exact), "
                                f"Tanh or ReLU")
    node.get("inplace", False)
    node.finish()
    return GATES[node.name]


def _norm(node: Node | None, channels: int) -> NormPlan:
    """One norm node (None or Identity: no norm)."""
    if node is None or node.is_("Identity"):
        if node is not None:
            node.finish()
        return NormPlan(None)
    name = node.name if node.root in ("torch", "nvsubquadratic") else None
    if name in ("RMSNorm", "RMSNormChannelFirst") and node.root == "nvsubquadratic":
        dim, plan = node.get("dim"), NormPlan("rmsnorm", float(node.get("eps", 1e-6)), params=("weight",))
        node.get("use_quack", True)  # a CUDA kernel of the same math
    elif name == "L2Norm" and node.root == "nvsubquadratic":
        dim, axis = channels, node.get("dim", -1)
        if axis not in (-1, 1) or float(node.get("eps", _L2_EPS)) != _L2_EPS:
            node.fail("dim", "an L2Norm converts over the channels (dim -1 channels-last or 1 channels-first) with "
                             "eps 1e-12")
        plan = NormPlan("l2")
    elif name in ("RMSNorm", "LayerNorm") and node.root == "torch":
        dim = node.get("normalized_shape")
        dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
        if not node.get("elementwise_affine", True) or not node.get("bias", True):
            node.fail("elementwise_affine", "a norm without its affine weight (or LayerNorm bias) does not convert")
        kind = name.lower()
        plan = NormPlan(kind, node.get("eps", 1e-5 if kind == "layernorm" else None),
                        params=("weight", "bias") if kind == "layernorm" else ("weight",))
    elif name == "GroupNorm" and node.root == "torch":
        dim = node.get("num_channels")
        if not node.get("affine", True):
            node.fail("affine", "a GroupNorm without its affine weight and bias does not convert")
        plan = NormPlan("groupnorm", float(node.get("eps", 1e-5)), int(node.get("num_groups")), ("weight", "bias"))
    else:
        node.fail("__target__", f"{node.target!r} is not a norm this converter knows (nvSubquadratic RMSNorm, "
                                f"RMSNormChannelFirst, L2Norm; torch RMSNorm, LayerNorm, GroupNorm; Identity)")
    node.get("device", None), node.get("dtype", None)
    if dim != channels:
        node.fail("dim", f"normalises {dim!r} channels; the mixer has {channels}")
    node.finish()
    return plan


def _hyena_norms(node: Node, channels: int, inner_gate: str | None) -> tuple[dict[str, Any], dict[str, Any], StateMap]:
    """(Hyena kwargs, mixer kwargs, rules) of the QK, pixelhyena and output norms."""
    qk = _norm(node.child("qk_norm_cfg"), channels)
    pixel = _norm(node.child("pixelhyena_norm_cfg"), channels)
    out = _norm(node.child("output_norm_cfg", {"__target__": "torch.nn.modules.linear.Identity"}), channels)
    if qk.kind not in (None, "l2", "rmsnorm"):
        node.fail("qk_norm_cfg", f"a {qk.kind} QK-norm does not convert (ours: L2 or RMS over each position)")
    if pixel.kind == "l2":
        node.fail("pixelhyena_norm_cfg", "an L2 norm before the long conv does not convert (ours: rmsnorm, "
                                         "layernorm or groupnorm)")
    if out.kind == "groupnorm":
        node.fail("output_norm_cfg", "a GroupNorm output norm normalises over all positions; our mixer's norm "
                                     "is per position (rmsnorm, layernorm, l2)")
    if pixel.kind is not None and pixel.eps is None and qk.eps is not None:
        node.fail("pixelhyena_norm_cfg", "eps=None (torch's dtype default) before the long conv next to a QK-norm "
                                         "with its own eps does not convert: give the norm an explicit eps")
    hyena = dict(qk_norm=qk.kind, conv_norm=pixel.kind, conv_norm_groups=pixel.groups, norm_eps=qk.eps,
                 conv_norm_eps=pixel.eps)
    state = StateMap()
    for p in qk.params:
        state.add(f"q_norm.{p}", f"hyena.gating.k_norm.{p}")
        if inner_gate is None:  # their k is normed only without σ1, as our v'
            state.add(f"k_norm.{p}", f"hyena.gating.v_norm.{p}")
    for p in pixel.params:
        state.add(f"pixelhyena_norm.{p}", f"hyena.gating.conv_norm.{p}")
    for p in out.params:
        state.add(f"output_norm.{p}", f"norm.{p}")
    return hyena, dict(norm=out.kind, norm_eps=out.eps), state


def _kernel_size(node: Node, dims: int) -> int:
    k = node.get("kernel_size")
    sizes = [k] * dims if isinstance(k, int) else list(k)
    if len(sizes) != dims or len(set(sizes)) != 1:
        node.fail("kernel_size", f"{k!r}: our short conv has one size K for every axis")
    return int(sizes[0])


def _torch_conv(node: Node, channels: int, dims: int, causal_cls: bool) -> tuple[int, str, bool]:
    """(K, boundary kind "causal"/"linear"/"circular", bias) of a depthwise torch conv node."""
    if node.get("in_channels") != 3 * channels or node.get("out_channels") != 3 * channels \
            or node.get("groups", 1) != 3 * channels:
        node.fail("groups", f"the short conv must be depthwise over the 3C={3 * channels} channels of [q; k; v]")
    k = _kernel_size(node, dims)
    for key in ("stride", "dilation"):
        value = node.get(key, 1)
        if any(v != 1 for v in ([value] if isinstance(value, int) else value)):
            node.fail(key, "must be 1")
    bias, mode = bool(node.get("bias", True)), node.get("padding_mode", "zeros")
    node.get("device", None), node.get("dtype", None)
    if mode not in ("zeros", "circular"):
        node.fail("padding_mode", f"{mode!r} must be 'zeros' or 'circular'")
    if causal_cls:  # pads itself: k - 1 on the left (is_causal) or (k - 1) // 2 on both sides
        if node.get("padding", 0) not in (0, [0]):
            node.fail("padding", "CausalConv1D pads itself; padding must be 0")
        if node.get("is_causal", True):
            return k, "causal", bias
        if k % 2 == 0:
            node.fail("kernel_size", f"{k}: a non-causal CausalConv1D keeps the length only with an odd kernel")
        return k, "linear", bias
    padding = node.get("padding", 0)
    pads = [padding] * dims if isinstance(padding, int) else padding
    if k % 2 == 0 or not (padding == "same" or (isinstance(pads, list) and all(p == k // 2 for p in pads))):
        node.fail("padding", f"{padding!r}: the short conv must keep the grid's shape with an odd kernel, padding "
                             f"K//2 (or 'same')")
    return k, "circular" if mode == "circular" else "linear", bias


def _short_conv(node: Node, channels: int, long: tuple[str, ...]) -> tuple[dict[str, Any], StateMap]:
    """Mixer kwargs and rules of the short conv."""
    dims, state = len(long), StateMap()
    if node.is_("Identity"):
        node.finish()
        return dict(short_kernel_size=None, short_conv_bias=False), state
    conv = ("Conv1d", "Conv2d", "Conv3d")[dims - 1]
    distributed = f"DistributedDepthwise{conv}"
    if node.is_(conv) and node.root == "torch" or node.is_("CausalConv1D") and dims == 1:
        k, kind, bias = _torch_conv(node, channels, dims, node.name == "CausalConv1D")
        state.add("weight", "weight", qkv_to_ours)
    elif node.is_(distributed) and node.root == "nvsubquadratic":
        if node.get("hidden_dim") != 3 * channels or node.get("num_groups", None) not in (None, 3 * channels):
            node.fail("num_groups", f"needs hidden_dim=3C={3 * channels} and one filter per channel (num_groups None)")
        k, bias = _kernel_size(node, dims), bool(node.get("bias", False))
        kind = "causal" if node.get("causal", False) else "linear"
        node.get("device", None), node.get("dtype", None)
        if kind == "linear" and k % 2 == 0:
            node.fail("kernel_size", f"{k}: a 'same' short conv needs an odd kernel")
        state.add("weight", "weight", lambda w: qkv_to_ours(w).unsqueeze(1))  # [3C, *K] -> [3C, 1, *K]
    else:
        node.fail("__target__", f"{node.target!r}: the short conv of a {dims}-D Hyena converts from Identity, "
                                f"torch {conv}, {distributed}" + (" or CausalConv1D" if dims == 1 else ""))
    node.finish()
    if (kind == "causal") != (long == ("causal",)):
        node.fail("__target__", f"a {kind} short conv with a {'/'.join(long)} long conv does not convert (ours is "
                                f"causal exactly when the long conv is)")
    if kind == "circular" and any(b != "circular" for b in long):
        node.fail("padding_mode", "a circular short conv needs a circular long conv on every axis")
    short = None if kind == "causal" else [kind if b == "circular" else b for b in long]
    if bias:
        state.add("bias", "bias", qkv_to_ours)
    return dict(short_kernel_size=k, short_conv_boundary=None if short == list(long) else short,
                short_conv_bias=bias), state


def _hyena(node: Node, channels: int) -> MixerPlan:
    if not (node.root == "nvsubquadratic" and node.name == "Hyena"):
        node.fail("__target__", f"{node.target!r}: only nvSubquadratic's Hyena converts as a QKVSequenceMixer's "
                                f"mixer_cfg")
    long: LongConvPlan = convert_ckconv(node.child("global_conv_cfg"), channels)
    inner = _gate(node.child("gate_nonlinear_cfg"))
    second = node.child("gate_nonlinear_2_cfg", None)
    outer = inner if second is None else _gate(second)
    norm_hyena, norm_mixer, norm_state = _hyena_norms(node, channels, inner)
    short, short_state = _short_conv(node.child("short_conv_cfg"), channels, long.boundaries)
    node.finish()
    hyena = dict(long.hyena_kwargs(), inner_gate=inner, outer_gate=outer, **norm_hyena)
    plan = MixerPlan(channels, long.spatial_dims, hyena, dict(short, **norm_mixer))
    plan.state.extend(long.state, "global_conv", "hyena")
    plan.state.extend(short_state, "short_conv", "short_conv")
    plan.state.extend(norm_state, "", "")
    return plan


def convert_qkv_mixer(node: Node) -> MixerPlan:
    """A ``QKVSequenceMixer`` node -> `MixerPlan`; state rules relative to the mixer."""
    if not (node.root == "nvsubquadratic" and node.name == "QKVSequenceMixer"):
        node.fail("__target__", f"{node.target!r}: expected nvSubquadratic's QKVSequenceMixer")
    channels = node.get("hidden_dim")
    plan = _hyena(node.child("mixer_cfg"), channels)
    qkv_bias, out_bias = bool(node.get("qkv_bias", False)), bool(node.get("out_proj_bias", False))
    inits = {role: check_init(node, f"init_method_{role}") for role in ("in", "out")}
    node.finish()
    layers = {init[1] for init in inits.values() if init is not None and init[0] == "wang"}
    plan.mixer.update(in_proj_bias=qkv_bias, out_proj_bias=out_bias)
    for role, init in inits.items():
        # one init_num_layers serves both: a wang init with another depth keeps our default (init only)
        keep = init is not None and (init[0] != "wang" or len(layers) == 1)
        plan.mixer[f"{role}_proj_init"] = init[0] if keep else None
    plan.mixer["init_num_layers"] = next(iter(layers)) if len(layers) == 1 else None
    state = StateMap()
    state.extend(plan.state, "mixer", "")  # their Hyena is the mixer's "mixer"; ours sits in the mixer itself
    state.add("qkv_proj.weight", "in_proj.weight", qkv_to_ours)
    if qkv_bias:
        state.add("qkv_proj.bias", "in_proj.bias", qkv_to_ours)
    state.add("out_proj.weight", "out_proj.weight")
    if out_bias:
        state.add("out_proj.bias", "out_proj.bias")
    plan.state = state
    return plan


def convert_adapter(node: Node) -> tuple[DictConfig, StateMap]:
    """``ViT5HyenaAdapter(inner_mixer_cfg, grid_w)`` -> ours around the converted mixer."""
    plan = convert_qkv_mixer(node.child("inner_mixer_cfg"))
    if plan.spatial_dims != 2:
        node.fail("inner_mixer_cfg", f"the adapter reshapes to a 2-D grid; its mixer is {plan.spatial_dims}-D")
    grid_w = node.get("grid_w")
    node.finish()
    state = StateMap()
    state.extend(plan.state, "inner_mixer", "inner_mixer")
    return LazyCall(ViT5HyenaAdapter)(inner_mixer_cfg=plan.config(), grid_w=grid_w), state


def convert_bare_ckconv(node: Node) -> tuple[DictConfig, StateMap]:
    """A bare ``CKConvND`` -> `LongConv` (``y = h * x + D x``, channels last)."""
    long = convert_ckconv(node)
    hyena = LazyCall(Hyena)(hidden_dim=long.hidden_dim, spatial_dims=long.spatial_dims, **long.hyena_kwargs())
    state = StateMap()
    state.extend(long.state, "", "hyena")
    return LazyCall(LongConv)(hyena=hyena), state
