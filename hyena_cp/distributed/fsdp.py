"""Data parallelism over the flattened ``dp x cp`` mesh with FSDP2: sharded (``"fsdp"``) or
replicated (``"ddp"``) parameters, gradients and optimizer state, as torchtitan applies it.

``"fsdp"``: ``fully_shard`` on every block, then on the root (torchtitan's
``apply_fsdp``): the parameters become ``DTensor`` shards (``Shard(0)``) over ``dp_cp``; a
block's parameters are all-gathered before its forward (and again in backward), its gradients
reduce-scattered after its backward. Parameters, gradients and AdamW state per rank are then
~1/(dp*cp) of one process. ``"ddp"``: FSDP2's ``replicate`` (``Replicate()`` DTensors, one
all-reduce per block in backward: DDP built on the same machinery), so both modes share the
divide factor below, the DTensor gradients of the grad norm and the checkpoint format.

Blocks (the FSDP units; everything else belongs to the root's unit) are, by default, the
elements of the outermost ``nn.ModuleList`` s that do not hold ``ModuleList`` s: the ViT-5
nets' blocks (``stages[s][i]``) and patch merges, and the megatron-core LM's
``TransformerLayer`` s (``decoder.layers[i]``). FSDP2 wraps megatron-core modules as is: their
parameters are plain tensors (TP is megatron's, not DTensor), FSDP shards each TP rank's
local shard over the ``dp_cp`` ranks of that TP rank.

The gradient invariant (SUM over CP, MEAN over DP; docs/design.md) is met Megatron's way: FSDP2
reduces with its default, the MEAN over the ``dp * cp`` ranks (as torchtitan does), and each
rank backpropagates its loss share multiplied by ``cp`` (`loss_scale`): the mean over dp x cp of
``cp`` times the CP shares is their sum over CP, averaged over DP. (FSDP2's
``set_gradient_divide_factor(dp)`` would say the same without the scale, but torch 2.13's
``replicate`` divides by a custom factor twice: ``foreach_reduce`` divides its no-reduce-scatter
input by the factor and then applies the pre/post factors derived from it as well.) On gloo the
reduction is forced to ``ReduceOp.SUM`` followed by the division (gloo has no AVG reduce-scatter).

FSDP2 replaces every parameter by a new ``nn.Parameter`` (the DTensor shard) and does not
copy attributes, so megatron's TP attributes (`tp_layout`) are set again on the new
parameters: the TP-aware grad norm and the checkpoints read them there.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import ReplicateModule, replicate  # FSDP2's DDP
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from hyena_cp.parallel.tp_layout import TPPartition, tp_partition

__all__ = ["DP_MODES", "MIXED_PRECISION", "apply_data_parallel", "block_modules", "full_parameters",
           "is_data_parallel", "loss_scale", "mixed_precision_policy"]

DP_MODES = ("fsdp", "ddp")
# bf16 compute and all-gathers, fp32 gradient reduction; the sharded (optimizer) parameters stay fp32
MIXED_PRECISION = {"bf16": dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The elements of the outermost ``nn.ModuleList`` s that do not hold ``ModuleList`` s, in
    module order (the repeated layers; nothing inside a chosen block is chosen again)."""
    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList) and not any(isinstance(m, nn.ModuleList) for m in child):
                blocks.extend(child)
            else:
                visit(child)

    visit(model)
    return blocks


def mixed_precision_policy(name: str | None) -> MixedPrecisionPolicy:
    """``None``: the parameters' own dtype throughout; ``"bf16"``: see `MIXED_PRECISION`."""
    if name is None:
        return MixedPrecisionPolicy()
    if name not in MIXED_PRECISION:
        raise ValueError(f"parallel.mixed_precision={name!r} must be null or one of {sorted(MIXED_PRECISION)}")
    return MixedPrecisionPolicy(**MIXED_PRECISION[name])


def _shard_dim_fn(partitions: dict[nn.Parameter, TPPartition], world: int):
    """FSDP's shard dim per parameter: dim 0, except for a STRIDED TP partition of dim 0 (the
    ``[q; k; v]`` projections), which is sharded on the first other dim ``world`` divides
    (FSDP2 needs even shards off dim 0). Cutting such a parameter along its partition dim
    would mix the q/k/v blocks of a TP shard, which no DTensor placement of the full tensor
    can describe, and checkpoints would have to gather it (`tp_dtensor.stored_view`)."""

    def placement(param: nn.Parameter) -> Shard | None:
        part = partitions.get(param)
        if part is None or part.stride == 1 or part.dim % param.dim() != 0:
            return None
        for dim in range(1, param.dim()):
            if param.shape[dim] % world == 0:
                return Shard(dim)
        return None

    return placement


def loss_scale(cp: int) -> int:
    """What each rank multiplies its loss share by before backward: FSDP averages the gradients
    over dp x cp, and the CP shares must be summed (see the module docstring)."""
    return cp


def apply_data_parallel(model: nn.Module, mesh: DeviceMesh, *, mode: str = "fsdp",
                        mixed_precision: str | None = None, blocks: Sequence[nn.Module] | None = None) -> nn.Module:
    """Shard (``"fsdp"``) or replicate (``"ddp"``) ``model`` over the 1-D ``mesh`` (``dp_cp``), in place.

    Gradients are AVERAGED over the mesh: backpropagate ``loss_share * loss_scale(cp)``.

    Args:
        model: on the mesh's device, identical on every rank of the mesh (same seed).
        mesh: the ``dp * cp`` ranks of this TP rank (`ParallelGroups.dp_cp_mesh`).
        mode: "fsdp" or "ddp".
        mixed_precision: None or "bf16" (`MIXED_PRECISION`).
        blocks: the FSDP units (default `block_modules`).

    Build the optimizer on ``model.parameters()`` AFTER this call (they are new tensors).
    """
    if mode not in DP_MODES:
        raise ValueError(f"parallel.dp_mode={mode!r} must be one of {DP_MODES}")
    policy = mixed_precision_policy(mixed_precision)
    names = {id(p): n for n, p in model.named_parameters()}
    partitions = {p: part for p in model.parameters() if (part := tp_partition(p)) is not None}
    by_name = {names[id(p)]: part for p, part in partitions.items()}
    units = list(block_modules(model) if blocks is None else blocks)
    if mode == "fsdp":
        place = _shard_dim_fn(partitions, mesh.size())
        for block in units:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True, shard_placement_fn=place)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False, shard_placement_fn=place)
    else:
        for block in units:
            replicate(block, mesh=mesh, mp_policy=policy)
        replicate(model, mesh=mesh, mp_policy=policy)
    if dist.get_backend(mesh.get_group()) == "gloo":
        for module in _fsdp_modules(model):
            module.set_force_sum_reduction_for_comms(True)
    for name, param in model.named_parameters():  # FSDP's new parameters lack megatron's TP attributes
        if name in by_name:
            param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, *by_name[name]
    return model


def _fsdp_modules(model: nn.Module, sharded_only: bool = False) -> list[FSDPModule]:
    """Every FSDP2 unit of ``model`` (``fully_shard`` and ``replicate`` ones; only the former
    with ``sharded_only``)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)
            and not (sharded_only and isinstance(m, ReplicateModule))]


def is_data_parallel(model: nn.Module) -> bool:
    """Whether `apply_data_parallel` wrapped ``model``."""
    return isinstance(model, FSDPModule)


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Hold every FSDP unit's parameters unsharded inside the block (evaluation): forwards
    then run without collectives, so ranks may run different numbers of them (validation
    splits differ by one sample between replicas). Costs the unsharded parameters' memory
    (not gradients or optimizer state) while it lasts. No-op for a model that is not sharded
    (replicated units have no forward collectives)."""
    modules = _fsdp_modules(model, sharded_only=True)
    if not modules:
        yield
        return
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(module is not model, recurse=False)  # as `apply_data_parallel` set it
