"""nvSubquadratic's ViT-5 classification networks as ours.

Both lay tokens out as ``[patches (row-major) | CLS | registers | padding]`` on a grid of the patch
grid's width, add the position embedding to the patches only, and use pre-norm blocks
``x += γ1 mixer(RMSNorm(x)); x += γ2 MLP(RMSNorm(x))`` (LayerScale γ, exact-GELU MLP, RMSNorm eps 1e-6),
a final RMSNorm and a linear head on the CLS token (``readout="cls"``) or on the mean of the patch
tokens (``"gap"``). Theirs are bias-free in the patch embedding, MLPs and head: ours built with
``bias=False``. 2x2 patch merging takes the same coset order — (even row, even col), (odd, even),
(even, odd), (odd, odd) — so ``reduction.weight [C_out, 4C]`` and the merge norm's ``[4C]`` weight copy
as they are. Key renames: ``blocks.i`` / ``stage_blocks.s.j`` -> ``stages.s.j``, ``input_norm`` ->
``norm1``, ``mlp_norm`` -> ``norm2``, ``mlp.layer1/2`` -> ``mlp.fc1/2``, ``ls_attn/ls_mlp`` ->
``ls1/ls2``, ``out_norm`` -> ``norm``, ``out_proj`` -> ``head``, ``patch_merges`` -> ``merges``,
``reg_token [1, R, C]`` -> ``reg_tokens [R, C]``, ``cls_token``/``pos_embed`` lose their leading 1.

Input: ours ``images [B, C_in, H, W] -> logits``; theirs ``{"input": [B, H, W, C_in]} -> {"logits"}``.

Refused (``ValueError`` naming the key), because ours computes something else:
- padding tokens (``pad = -(patches + CLS + registers) mod grid_w > 0``): nvSubquadratic feeds its
  padding through the blocks and lets it evolve (and a homogeneous Hyena net with padding does not
  run); ours keeps padding at zero before every convolution;
- ``layout="register_row"`` (hierarchical): a register row ABOVE the patches whose ``grid_w - R``
  filler tokens evolve, merged by a bias-free projection without norm; ours has the register row
  below the patches, zero padding, and a normed projection with bias;
- attention blocks, ``register_pooling_cfg`` (FiLM from registers), ``grn_cfg``, ``readout=
  "register_concat"``, non-RMSNorm or eps != 1e-6 norms, MLPs other than exact-GELU bias-free, no
  LayerScale, dropout, a linear drop-path schedule, stage widths other than doubling, blocks whose
  mixers differ within a network (ours: one per stage), a circular first axis (ours pads rows
  under CP).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import Container, DictConfig, OmegaConf

from hyena_cp.interop.nvsubquadratic.inits import check_init
from hyena_cp.interop.nvsubquadratic.mixer import MixerPlan, convert_qkv_mixer
from hyena_cp.interop.nvsubquadratic.nodes import Node, StateMap
from hyena_cp.lazy import LazyCall
from hyena_cp.models.blocks import NORM_EPS
from hyena_cp.models.hierarchical import ViT5ClassificationNet, ViT5HierarchicalClassificationNet

__all__ = ["convert_classification_net", "convert_hierarchical_net"]


@dataclass
class BlockPlan:
    mixer: MixerPlan
    mlp_ratio: float
    layer_scale_init: float
    drop_path_rate: float
    state: StateMap = field(default_factory=StateMap)

    def signature(self) -> Any:
        """What must agree between blocks that share one of our configs."""
        return _canon((self.mixer.hyena, self.mixer.mixer, self.mlp_ratio))


def _canon(value: Any) -> Any:
    if isinstance(value, Container):
        value = OmegaConf.to_container(value)
    if isinstance(value, dict):
        return {k: _canon(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    return value


def _rms_norm(parent: Node, key: str, dim: int) -> None:
    """``parent[key]`` must be an RMSNorm over ``dim`` channels with eps 1e-6 (ours: `nn.RMSNorm`)."""
    node = parent.child(key)
    if node is None or not node.is_("RMSNorm"):
        parent.fail(key, f"{None if node is None else node.target!r}: ours is an RMSNorm (eps {NORM_EPS}) here")
    if node.root == "nvsubquadratic":
        size, eps = node.get("dim"), node.get("eps", 1e-6)
        node.get("use_quack", True)  # a CUDA kernel of the same math
    else:
        size, eps, affine = node.get("normalized_shape"), node.get("eps", None), node.get("elementwise_affine", True)
        if not affine:
            node.fail("elementwise_affine", "ours has the RMSNorm weight")
    if size not in (dim, [dim]) or eps != NORM_EPS:
        node.fail("eps", f"needs an RMSNorm over {dim} channels with eps {NORM_EPS} (ours), got dim {size!r}, eps {eps!r}")
    node.finish()


def _mlp(node: Node, dim: int) -> float:
    if not (node.root == "nvsubquadratic" and node.name == "MLP"):
        node.fail("__target__", f"{node.target!r}: the block's MLP converts from nvSubquadratic's MLP")
    if node.get("dim") != dim or node.get("activation") != "gelu" or node.get("bias", False) \
            or node.get("backend", "torch") != "torch":
        node.fail("activation", f"ours is a bias-free exact-GELU MLP over {dim} channels (backend 'torch')")
    dropout = node.child("dropout_cfg")
    if not (dropout.is_("Identity") or dropout.is_("Dropout") and dropout.get("p", 0.5) == 0):
        dropout.fail("p", "dropout in the MLP does not convert (ours has none)")
    dropout.get("inplace", False)
    dropout.finish()
    check_init(node, "init_method_in")  # init only: our MLP keeps its own
    check_init(node, "init_method_out")
    ratio = float(node.get("expansion_factor", 2.0))
    node.finish()
    return ratio


def _adapter(node: Node, dim: int, grid_w: int) -> MixerPlan:
    if not (node.root == "nvsubquadratic" and node.name == "ViT5HyenaAdapter"):
        node.fail("__target__", f"{node.target!r}: only Hyena blocks (ViT5HyenaAdapter) convert")
    if node.get("grid_w") != grid_w:
        node.fail("grid_w", f"{node.get('grid_w')} must be the patch grid's width {grid_w}")
    inner = node.child("inner_mixer_cfg")
    plan = convert_qkv_mixer(inner)
    node.finish()
    if plan.hidden_dim != dim or plan.spatial_dims != 2:
        inner.fail("hidden_dim", f"the block's mixer must be 2-D over {dim} channels")
    if plan.hyena["boundary"][0] == "circular":
        inner.fail("mixer_cfg.global_conv_cfg.fft_padding", "a circular first (row) axis does not convert into a "
                                                            "network: ours pads the rows under context parallelism")
    return plan


def _block(node: Node, dim: int, grid_w: int) -> BlockPlan:
    if not (node.root == "nvsubquadratic" and node.name == "ViT5ResidualBlock"):
        node.fail("__target__", f"{node.target!r}: blocks convert from nvSubquadratic's ViT5ResidualBlock")
    if node.get("hidden_dim") != dim:
        node.fail("hidden_dim", f"must be the stage's width {dim}")
    mixer = _adapter(node.child("sequence_mixer_cfg"), dim, grid_w)
    _rms_norm(node, "sequence_mixer_norm_cfg", dim)
    _rms_norm(node, "mlp_norm_cfg", dim)
    ratio = _mlp(node.child("mlp_cfg"), dim)
    scale = float(node.get("layer_scale_init", 1e-4))
    if scale <= 0:
        node.fail("layer_scale_init", "a block without LayerScale does not convert (ours always has it)")
    pooling, registers = node.get("register_pooling_cfg", None), node.get("num_registers", 0)
    if pooling is not None and registers > 0:
        node.fail("register_pooling_cfg", "FiLM conditioning from pooled registers does not convert (our blocks "
                                          "pass no conditioning)")
    if node.get("grn_cfg", None) is not None:
        node.fail("grn_cfg", "Global Response Normalization does not convert")
    node.get("register_start_idx", 1)  # only read by register pooling
    plan = BlockPlan(mixer, ratio, scale, float(node.get("drop_path_rate", 0.0)))
    node.finish()
    for theirs, ours in (("input_norm.weight", "norm1.weight"), ("mlp_norm.weight", "norm2.weight"),
                         ("mlp.layer1.weight", "mlp.fc1.weight"), ("mlp.layer2.weight", "mlp.fc2.weight"),
                         ("ls_attn.gamma", "ls1.gamma"), ("ls_mlp.gamma", "ls2.gamma")):
        plan.state.add(theirs, ours)
    plan.state.extend(mixer.state, "sequence_mixer.inner_mixer", "mixer.inner_mixer")
    return plan


def _one(node: Node, key: str, plans: list[BlockPlan]) -> BlockPlan:
    """The blocks of one of our stages share a config: theirs must agree."""
    if any(p.signature() != plans[0].signature() for p in plans):
        node.fail(key, "its blocks differ (mixer or MLP ratio); ours builds every block of a stage from one config")
    return plans[0]


def _image(node: Node, size_key: str, patch_key: str) -> tuple[int, int]:
    size, patch = node.get(size_key), node.get(patch_key)
    if not isinstance(size, int) or not isinstance(patch, int) or patch < 1 or size % patch:
        node.fail(size_key, f"{size!r} must be an int divisible by {patch_key}={patch!r} (ours does not crop)")
    return size, patch


def _head(node: Node, state: StateMap, dim: int) -> None:
    _rms_norm(node, "norm_cfg", dim)
    if node.get("dropout_rate", 0.0):
        node.fail("dropout_rate", "dropout before the head does not convert (ours has none)")
    node.get("reg_init", "trunc_normal")  # init only
    state.add("out_norm.weight", "norm.weight")
    state.add("out_proj.weight", "head.weight")
    state.add("patch_embed.weight", "patch_embed.weight")
    state.add("pos_embed", "pos_embed", lambda t: t[0])


def convert_classification_net(node: Node) -> tuple[DictConfig, StateMap]:
    """``ViT5ClassificationNet`` -> our `ViT5ClassificationNet` (``bias=False``)."""
    size, patch = _image(node, "image_size", "patch_size")
    dim, depth, registers = node.get("hidden_dim"), node.get("num_blocks"), node.get("num_registers")
    readout, grid = node.get("readout"), size // patch
    if readout not in ("cls", "gap"):
        node.fail("readout", f"{readout!r}: converts for 'cls' and 'gap'")
    node.get("neck_compression_ratio", None)  # register_concat only
    cls = readout == "cls"
    if (-(grid * grid + cls + registers)) % grid:
        node.fail("num_registers", f"patches + CLS + {registers} registers leave {(-(grid * grid + cls + registers)) % grid} "
                                   f"padding tokens in the last grid row; nvSubquadratic lets them evolve, ours keeps "
                                   f"padding at zero (choose registers so the row is full)")
    pattern, block, types = node.get("layer_pattern", None), node.get("block_cfg", None), node.get("layer_types", None)
    node.get("padding_types", None)  # only matters with padding, refused above
    if pattern is None:
        cfgs = [(block, "block_cfg")] * depth
    else:
        if types is None or len(pattern) != depth or block is not None or any(ch not in types for ch in pattern):
            node.fail("layer_pattern", f"{pattern!r} needs num_blocks={depth} characters, each a key of layer_types")
        cfgs = [(types[ch], f"layer_types.{ch}") for ch in pattern]
    plans = [_block(Node(cfg, node.key(key)), dim, grid) for cfg, key in cfgs]
    plan = _one(node, "layer_pattern" if pattern else "block_cfg", plans)
    rate, schedule = float(node.get("max_drop_path_rate", 0.0)), node.get("drop_path_schedule", "constant")
    if schedule not in ("constant", "linear") or schedule == "linear" and rate and depth > 1:
        node.fail("drop_path_schedule", "ours drops every block's path at one rate: a constant schedule (or rate 0)")
    state = StateMap()
    _head(node, state, dim)
    io = node.get("in_channels"), node.get("num_classes")
    node.finish()
    for name, key in (("cls_token", cls), ("reg_token", registers)):
        if key:
            state.add(name, "reg_tokens" if name == "reg_token" else name, lambda t: t[0])
    for i, p in enumerate(plans):
        state.extend(p.state, f"blocks.{i}", f"stages.0.{i}")
    config = LazyCall(ViT5ClassificationNet)(
        img_size=size, patch_size=patch, in_chans=io[0], num_classes=io[1],
        embed_dim=dim, depth=depth, num_heads=1, mixers="hyena", mlp_ratio=plan.mlp_ratio, class_token=cls,
        num_registers=registers, pool="cls" if cls else "mean", drop_path_rate=rate,
        layer_scale_init=plan.layer_scale_init, hyena=plan.mixer.hyena, mixer=plan.mixer.mixer, bias=False)
    return config, state


def _merge(node: Node, dims: tuple[int, int], grid: int) -> None:
    if not (node.root == "nvsubquadratic" and node.name == "PatchMerging"):
        node.fail("__target__", f"{node.target!r}: merges convert from nvSubquadratic's PatchMerging")
    got = (node.get("in_dim"), node.get("out_dim"), node.get("grid_h"), node.get("grid_w"))
    if got != (*dims, grid, grid) or node.get("num_registers", 0) or node.get("has_register_row", False):
        node.fail("in_dim", f"(in_dim, out_dim, grid_h, grid_w)={got} must be {(*dims, grid, grid)}, without registers")
    _rms_norm(node, "norm_cfg", 4 * dims[0])
    node.finish()


def convert_hierarchical_net(node: Node) -> tuple[DictConfig, StateMap]:
    """``ViT5HierarchicalClassificationNet`` (layout "pure") -> ours (``bias=False``, mean pooling)."""
    size, patch = _image(node, "image_size", "initial_patch_size")
    if node.get("layout", "pure") != "pure" or node.get("num_registers", 0):
        node.fail("layout", "only layout='pure' converts: their register row sits above the patches with evolving "
                            "filler tokens, ours below with zero padding")
    dims, depths = list(node.get("stage_dims")), list(node.get("stage_depths"))
    if any(d != dims[0] * 2 ** s for s, d in enumerate(dims)) or len(depths) != len(dims) or min(depths) < 1:
        node.fail("stage_dims", f"{dims} (depths {depths}): ours doubles the width per stage, >= 1 block each")
    grids = [size // patch // 2 ** s for s in range(len(dims))]
    blocks, merges = node.get("stage_block_cfgs"), node.get("patch_merge_cfgs")
    if len(blocks) != len(dims) or len(merges) != len(dims) - 1:
        node.fail("stage_block_cfgs", "needs one block config per stage and one merge between stages")
    plans = [_block(Node(cfg, node.key(f"stage_block_cfgs.{s}")), dims[s], grids[s]) for s, cfg in enumerate(blocks)]
    for key, values in (("drop_path_rate", {p.drop_path_rate for p in plans}), ("mlp_cfg", {p.mlp_ratio for p in plans})):
        if len(values) > 1:
            node.fail(f"stage_block_cfgs.1.{key}", f"differs between stages {sorted(values)}; ours has one per network")
    for s, cfg in enumerate(merges):
        _merge(Node(cfg, node.key(f"patch_merge_cfgs.{s}")), (dims[s], dims[s + 1]), grids[s])
    state = StateMap()
    _head(node, state, dims[-1])
    io = node.get("in_channels"), node.get("num_classes")
    node.finish()
    for s, (plan, depth) in enumerate(zip(plans, depths)):
        for j in range(depth):
            state.extend(plan.state, f"stage_blocks.{s}.{j}", f"stages.{s}.{j}")
        if s < len(dims) - 1:
            state.add(f"patch_merges.{s}.norm.weight", f"merges.{s}.norm.weight")
            state.add(f"patch_merges.{s}.reduction.weight", f"merges.{s}.reduction.weight")
    config = LazyCall(ViT5HierarchicalClassificationNet)(
        img_size=size, patch_size=patch, in_chans=io[0], num_classes=io[1],
        embed_dim=dims[0], depths=depths, num_heads=[1] * len(dims), mixers="hyena", mlp_ratio=plans[0].mlp_ratio,
        class_token=False, num_registers=0, pool="mean", drop_path_rate=plans[0].drop_path_rate,
        layer_scale_init=plans[0].layer_scale_init, hyena=[p.mixer.hyena for p in plans],
        mixer=[p.mixer.mixer for p in plans], bias=False)
    return config, state
