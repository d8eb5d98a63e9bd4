"""nvSubquadratic's ``CKConvND`` (kernel generator, mask, boundary) as our Hyena's geometry, filter and mask.

- Boundary: ``fft_padding`` "zero" -> our "linear" (centred, zero-padded), "circular" -> "circular",
  a per-axis list -> one boundary per axis; ``is_causal`` (1-D) -> "causal". Both sides compute
  ``y[i] = sum_j x[j] k(i - j)``; on a circular axis of even length N both kernels have N - 1 taps
  (offset N/2 has none).
- Grid: nvSubquadratic's kernel taps sit at ``offset / (L - 1)``, with ``L = L_cache`` on a "double"
  (zero-padded) axis and ``L = (L_cache + 1) // 2`` on a "single" (circular) axis, where CKConvND
  halves ``L_cache`` before building the kernel. Our `SirenFilter` / `RandomFourierFilter` put taps at
  ``offset / (L_cache - 1)``, so they get the halved value on circular axes.
- The Gaussian mask's ``grid_size`` is overwritten by CKConvND with ``2 max(L) - 1``, i.e. a grid step
  ``1 / (max(L) - 1)``: our `GaussianMask(grid_step=...)`.
- Kernel classes -> `SirenFilter` (plain, multi-ω, block-diagonal, learnable ω, FiLM) or
  `RandomFourierFilter`; masks -> none, `AxisExponentialMask`, `GaussianMask` (``widest_first`` for the
  block-aligned one). ``hidden_omega_0`` has no effect in nvSubquadratic (it cancels in its init) and
  is dropped; ``fft_backend`` and ``use_chunked_fftconv`` choose implementations of the same math.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from hyena_cp.interop.nvsubquadratic.nodes import Node, StateMap
from hyena_cp.interop.nvsubquadratic.inits import check_init
from hyena_cp.lazy import LazyCall
from hyena_cp.ops.masks import AxisExponentialMask, GaussianMask
from hyena_cp.ops.siren import RandomFourierFilter, SirenFilter, omega_schedule

__all__ = ["LongConvPlan", "convert_ckconv"]

SIRENS = ("SIRENKernelND", "MultiOmegaSIRENKernelND", "BlockDiagonalMultiOmegaSIRENKernelND",
          "LearnableOmegaSIRENKernelND", "BlockDiagonalLearnableOmegaSIRENKernelND")
ACTIVATIONS = {"SiLU": "silu", "GELU": "gelu", "ReLU": "relu", "Tanh": "tanh"}
BACKENDS = ("torch_fft", "subq_ops", "subq_ops_fused")


@dataclass
class LongConvPlan:
    """Our Hyena's long-conv settings, and the state_dict rules ``CKConvND.* -> Hyena.*``."""

    hidden_dim: int
    boundaries: tuple[str, ...]
    filter: DictConfig  # a `_partial_` node: Hyena calls it with num_groups and spatial_dims
    mask: DictConfig | None
    state: StateMap

    @property
    def spatial_dims(self) -> int:
        return len(self.boundaries)

    def hyena_kwargs(self) -> dict[str, Any]:
        return dict(num_heads=self.hidden_dim, boundary=list(self.boundaries), filter=self.filter, mask=self.mask,
                    skip=True)


def _modes(node: Node, dims: int, causal: bool, chunked: bool) -> tuple[bool, ...]:
    """Per axis, True where the axis is circular (nvSubquadratic's single grid), checking the
    combinations nvSubquadratic accepts and the ones we can express."""
    padding, grid_type = node.get("fft_padding"), node.get("grid_type")
    if isinstance(padding, str):
        mode = padding.strip().lower()
        if mode not in ("zero", "circular"):
            node.fail("fft_padding", f"{padding!r} must be 'zero', 'circular' or a list of those, one per axis")
        if grid_type not in ("double", "single"):
            node.fail("grid_type", f"{grid_type!r} must be 'double' or 'single' with a string fft_padding")
        if mode == "circular" and (grid_type != "single" or chunked):
            node.fail("grid_type", "fft_padding='circular' needs grid_type='single' and use_chunked_fftconv=False "
                                   "(nvSubquadratic refuses the others)")
        if mode == "zero" and grid_type == "single":
            node.fail("grid_type", "grid_type='single' with fft_padding='zero' gives a kernel half as wide as the "
                                   "linear conv it feeds; no hyena_cp boundary computes that (use 'double')")
        periodic = (mode == "circular",) * dims
    elif isinstance(padding, (list, tuple)):
        if grid_type is not None:
            node.fail("grid_type", "must be None with a per-axis fft_padding list (nvSubquadratic raises)")
        if len(padding) != dims or not all(isinstance(m, str) and m.strip().lower() in ("zero", "circular")
                                           for m in padding):
            node.fail("fft_padding", f"{padding!r} must give 'zero' or 'circular' for each of the {dims} axes")
        periodic = tuple(m.strip().lower() == "circular" for m in padding)
    else:
        node.fail("fft_padding", f"{padding!r} must be 'zero', 'circular' or a list of those")
    if causal and (dims != 1 or not isinstance(padding, str) or periodic[0]):
        node.fail("is_causal", "a causal CKConvND is 1-D with fft_padding='zero' (nvSubquadratic refuses the rest)")
    return periodic


def _l_cache(kernel: Node, dims: int, single: tuple[bool, ...]) -> tuple[int, ...]:
    """The grid extent per axis after CKConvND halves ``L_cache`` on single-grid axes."""
    raw = kernel.get("L_cache")
    values = [raw] * dims if isinstance(raw, int) else list(raw) if isinstance(raw, (list, tuple)) else None
    if values is None or len(values) != dims or not all(isinstance(v, int) and v >= 2 for v in values):
        kernel.fail("L_cache", f"{raw!r} must be an int >= 2 or one per axis ({dims})")
    effective = tuple((v + 1) // 2 if s else v for v, s in zip(values, single))
    if min(effective) < 2:
        kernel.fail("L_cache", f"{raw!r} is halved on circular axes to {effective}; each must stay >= 2")
    return effective


def _check_shape(kernel: Node, hidden_dim: int, dims: int) -> None:
    if kernel.get("out_dim") != hidden_dim:
        kernel.fail("out_dim", f"must equal the CKConvND's hidden_dim={hidden_dim} (per-channel filters)")
    if kernel.get("data_dim") != dims:
        kernel.fail("data_dim", f"must equal the CKConvND's data_dim={dims}")


def _linear(state: StateMap, theirs: str, ours: str, bias: bool) -> None:
    state.add(f"{theirs}.weight", f"{ours}.weight")
    if bias:
        state.add(f"{theirs}.bias", f"{ours}.bias")


def _film(kernel: Node, hidden: int, layers: int, kw: dict[str, Any], state: StateMap) -> None:
    after = bool(kernel.get("film_after_pos_embed", False))
    film = kernel.child("film_cfg", None)
    if film is None:
        return
    if not (film.root == "nvsubquadratic" and film.name == "KernelFiLMGenerator"):
        film.fail("__target__", f"{film.target!r}: the SIREN kernels take a KernelFiLMGenerator")
    if film.get("kernel_hidden_dim") != hidden or film.get("num_film_layers") != layers - 1 + after:
        film.fail("num_film_layers", f"kernel_hidden_dim must be mlp_hidden_dim={hidden} and num_film_layers "
                                     f"num_layers - 1 + film_after_pos_embed={layers - 1 + after}")
    film.get("no_weight_decay", False)  # an optimizer hint
    init = film.get("init_type", "identity")
    if init not in ("identity", "small_random"):
        film.fail("init_type", f"{init!r} must be 'identity' or 'small_random'")
    kw.update(cond_dim=film.get("cond_dim"), film_hidden_dim=film.get("film_hidden_dim", 64), film_init=init,
              film_init_std=film.get("init_std", 1e-4), film_after_embedding=after)
    film.finish()
    _linear(state, "film_generator.mlp.0", "film.mlp.0", True)
    _linear(state, "film_generator.mlp.2", "film.mlp.2", True)


def _omegas(kernel: Node, kw: dict[str, Any], learnable: bool) -> None:
    """ω settings of the SIREN classes: only their init, except a learnable ω0 (in the forward)."""
    name = kernel.name
    if name in ("SIRENKernelND", "LearnableOmegaSIRENKernelND"):
        kw["omega_0"] = float(kernel.get("omega_0"))
    if name == "MultiOmegaSIRENKernelND":
        kw["omega_0_per_row"] = [float(w) for w in kernel.get("omega_0_per_row")]
    if name.startswith("BlockDiagonal"):
        blocks, per_block = int(kernel.get("num_blocks", 8)), kernel.get("omega_0_per_block", None)
        lo, hi = float(kernel.get("omega_0_min", 1.0)), float(kernel.get("omega_0_max", 12.0))
        schedule, off = kernel.get("schedule", "linear"), float(kernel.get("off_block_scale", 0.1))
        if per_block is None and blocks > 1:
            kw.update(num_blocks=blocks, omega_0_min=lo, omega_0_max=hi, schedule=schedule, off_block_scale=off)
        else:  # one ω per row from the blocks' values (the block-diagonal init mask is not kept: init only)
            values = omega_schedule(blocks, lo, hi, schedule) if per_block is None else \
                torch.as_tensor([float(w) for w in per_block], dtype=torch.float64)
            if values.numel() != blocks or kw["embedding_dim"] % blocks:
                kernel.fail("omega_0_per_block", f"needs num_blocks={blocks} values dividing embedding_dim")
            kw["omega_0_per_row"] = values.repeat_interleave(kw["embedding_dim"] // blocks).tolist()
    if learnable:
        kw.update(learnable_omega=True, omega_scale_min=float(kernel.get("omega_0_scale_min", 1e-2)),
                  omega_scale_max=float(kernel.get("omega_0_scale_max", 2.0)))
        kernel.get("apply_lr_scale", False)  # an optimizer hint (a per-parameter lr factor), not the function
        if name == "LearnableOmegaSIRENKernelND":
            init = kernel.get("omega_0_scale_init", 1.0)
            if isinstance(init, (int, float)):
                kw["omega_scale_init"] = float(init)  # a per-row init sequence is init only: the state_dict has it


def _siren(kernel: Node, kw: dict[str, Any], state: StateMap) -> DictConfig:
    learnable = "LearnableOmega" in kernel.name
    kernel.get("hidden_omega_0", 1.0)  # cancels in nvSubquadratic's init: no effect at all
    _omegas(kernel, kw, learnable)
    _film(kernel, kw["hidden_dim"], kw["num_layers"], kw, state)
    _linear(state, "positional_embedding.linear", "embedding", kw["bias"])
    if learnable:
        state.add("positional_embedding.omega_0_scale", "omega_scale")
    for i in range(kw["num_layers"] - 1):
        _linear(state, f"hidden_linears.{i}", f"hidden.{i}", kw["bias"])
    return LazyCall(SirenFilter)(_partial_=True, **kw)


def _random_fourier(kernel: Node, kw: dict[str, Any], state: StateMap) -> DictConfig:
    act = kernel.child("nonlinear_cfg")
    if not act.is_(*ACTIVATIONS) or (act.name == "GELU" and act.get("approximate", "none") != "none"):
        act.fail("__target__", f"{act.target!r}: the random Fourier kernel converts with SiLU, GELU (exact), ReLU "
                               f"or Tanh")
    act.get("inplace", False)
    act.finish()
    check_init(kernel, "init_method")
    kw.update(omega_0=float(kernel.get("omega_0")), activation=ACTIVATIONS[act.name])
    _linear(state, "positional_embedding.linear", "embedding", kw["bias"])
    for i in range(kw["num_layers"] - 1):
        _linear(state, f"kernel_network.{2 * i}", f"hidden.{i}", kw["bias"])
    return LazyCall(RandomFourierFilter)(_partial_=True, **kw)


def _kernel(kernel: Node, hidden_dim: int, dims: int, extent: tuple[int, ...]) -> tuple[DictConfig, StateMap]:
    if kernel.root != "nvsubquadratic" or kernel.name not in (*SIRENS, "RandomFourierKernelND"):
        kernel.fail("__target__", f"{kernel.target!r} is not a kernel generator this converter knows: "
                                  f"{[*SIRENS, 'RandomFourierKernelND']}")
    _check_shape(kernel, hidden_dim, dims)
    kw = dict(L_cache=list(extent), embedding_dim=kernel.get("embedding_dim"), hidden_dim=kernel.get("mlp_hidden_dim"),
              num_layers=kernel.get("num_layers"), bias=bool(kernel.get("use_bias")))
    state = StateMap()
    build = _random_fourier if kernel.name == "RandomFourierKernelND" else _siren
    cfg = build(kernel, kw, state)
    _linear(state, "out_linear", "out", kw["bias"])
    kernel.finish()
    return cfg, state


def _mask(mask: Node, hidden_dim: int, dims: int, extent: tuple[int, ...]) -> tuple[DictConfig | None, StateMap]:
    state = StateMap()
    if mask.is_("Identity"):
        mask.finish()
        return None, state
    if mask.root != "nvsubquadratic" or mask.name not in ("ExponentialModulationND", "GaussianModulationND",
                                                          "BlockAlignedGaussianModulationND"):
        mask.fail("__target__", f"{mask.target!r} is not a mask this converter knows (Identity, "
                                f"ExponentialModulationND, GaussianModulationND, BlockAlignedGaussianModulationND)")
    if mask.get("data_dim") != dims or mask.get("num_channels") != hidden_dim:
        mask.fail("num_channels", f"data_dim and num_channels must be the CKConvND's ({dims}, {hidden_dim})")
    if mask.name == "ExponentialModulationND":
        cfg = LazyCall(AxisExponentialMask)(_partial_=True, slow=float(mask.get("slow_decay_pct", 2.3)),
                                            fast=float(mask.get("fast_decay_pct", 13.81)))
        state.add("weight", "decay")
    else:
        mask.get("grid_size", None)  # overwritten by CKConvND: 2 max(L) - 1, our grid_step below
        extent_init = mask.get("init_extent", 1.0)
        cfg = LazyCall(GaussianMask)(
            _partial_=True, grid_step=1.0 / (max(extent) - 1),
            min_attenuation_at_step=float(mask.get("min_attenuation_at_step", 0.1)),
            max_attenuation_at_limit=float(mask.get("max_attenuation_at_limit", 0.95)),
            init_extent=extent_init if isinstance(extent_init, (int, float)) else list(extent_init),
            parametrization=mask.get("parametrization", "direct"),
            widest_first=mask.name == "BlockAlignedGaussianModulationND")
        state.add("std_param", "std")
    mask.finish()
    return cfg, state


def convert_ckconv(node: Node, hidden_dim: int | None = None) -> LongConvPlan:
    """A ``CKConvND`` node -> `LongConvPlan` (``hidden_dim``: the enclosing Hyena's, checked)."""
    if not (node.root == "nvsubquadratic" and node.name == "CKConvND"):
        node.fail("__target__", f"{node.target!r}: Hyena's global_conv_cfg converts from a CKConvND")
    dims, channels = node.get("data_dim"), node.get("hidden_dim")
    if dims not in (1, 2, 3):
        node.fail("data_dim", f"{dims!r} must be 1, 2 or 3")
    if hidden_dim is not None and channels != hidden_dim:
        node.fail("hidden_dim", f"{channels} must equal the mixer's hidden_dim={hidden_dim}")
    causal, chunked = bool(node.get("is_causal", False)), bool(node.get("use_chunked_fftconv", False))
    if node.get("fft_backend", "torch_fft") not in BACKENDS:
        node.fail("fft_backend", f"must be one of {BACKENDS} (implementations of the same conv)")
    periodic = _modes(node, dims, causal, chunked)
    kernel = node.child("kernel_cfg")
    extent = _l_cache(kernel, dims, periodic)
    filter_cfg, kernel_state = _kernel(kernel, channels, dims, extent)
    mask_cfg, mask_state = _mask(node.child("mask_cfg"), channels, dims, extent)
    node.finish()
    state = StateMap()
    state.add("shortcut", "skip")
    state.extend(kernel_state, "kernel", "filter")
    state.extend(mask_state, "mask", "mask")
    boundaries = ("causal",) if causal else tuple("circular" if p else "linear" for p in periodic)
    return LongConvPlan(channels, boundaries, filter_cfg, mask_cfg, state)
