"""Everything in hyena_cp that depends on the megatron-core version, in one place.

Supported: megatron-core 0.16.x (what pip installs on Python 3.11; CI tests it) up to 0.19
(0.17+ needs Python 3.12). tests/test_megatron_*.py passed with 0.16.1, 0.17.1, 0.18.2 and
0.19.2 (Python 3.12, torch 2.11). The rest of `hyena_cp.megatron` imports megatron names
only from here, so a renamed module or a changed signature is fixed in this file.

What megatron-core needs on CPU and what differs between versions, found by running it:

- ``TransformerConfig(use_cpu_initialization=True)``: weights are initialised on the CPU
  from torch's default generator, so ``torch.manual_seed`` makes a model reproducible on
  every rank. Do NOT call ``tensor_parallel.model_parallel_cuda_manual_seed`` on CPU: it
  seeds CUDA and registers CUDA RNG states in the RNG tracker. Nothing on the Hyena path
  forks that tracker (it is forked only by the stock ``DotProductAttention``'s dropout and
  by ``TransformerBlock`` under sequence parallelism, which Hyena rejects).
- Every megatron module needs a real tensor-parallel process group, even of size 1: pass a
  ``ProcessGroupCollection`` (`hyena_cp.megatron.groups.mesh_pg_collection`: the run mesh's) or
  initialise ``parallel_state`` (a one-process gloo group is enough). See "Process groups" below.
- The stock local ``DotProductAttention`` allocates its score buffer with
  ``torch.cuda.current_device()`` (the global memory buffer), forks the CUDA RNG tracker
  for dropout, and refuses CP > 1. `hyena_cp.megatron.attention.TorchCoreAttention`
  replaces it as the ``core_attention`` submodule (pure torch, context parallel).
- ``TransformerLayer`` builds its ``self_attention`` with ``config``, ``layer_number`` and
  ``pg_collection``, plus ``cp_comm_type`` when ``config.context_parallel_size > 1`` and
  ``config.cp_comm_type`` is set (a list-valued one is indexed one off in 0.16.1: use a
  string), ``pp_layer_offset`` when set (0.17+) and ``name`` (0.19). `MegatronHyenaMixer`
  takes all of them explicitly; a new one in a later version is added there.
- ``TransformerConfig``'s default CUDA-graph scope ``"full"`` warns "full scope is
  deprecated" on every construction; `cpu_config_defaults` sets the equivalent ``[]`` on
  the field of this version (``cuda_graph_scope`` up to 0.17, ``cuda_graph_modules`` from 0.18).
- The dense MLP submodule: from 0.18 ``TransformerLayer`` calls ``MLP.as_mlp_submodule``
  and rewraps a ``ModuleSpec(module=MLP)`` into it with a warning; `mlp_submodule` gives
  each version its native form.
- An unset ``ProcessGroupCollection`` field raises AttributeError up to 0.18 and reads as
  None from 0.19; `resolve_cp_group` checks the instance dict instead.
- ``WrappedTorchNorm`` (torch LayerNorm/RMSNorm by ``config.normalization``) is the norm
  of our specs: the ``LNImpl`` megatron picks depends on whether Apex/TE are installed.
  It ignores ``config.params_dtype``; `HyenaLanguageModel` casts itself to that dtype.
- ``tensor_parallel.vocab_parallel_cross_entropy`` runs on CPU/gloo, always in float32. In
  0.16 it takes no group and reads ``parallel_state``'s TP group and rank;
  `vocab_parallel_cross_entropy` passes ``tp_group`` where megatron accepts it, and otherwise
  runs megatron's own steps (``VocabParallelCrossEntropy``'s static methods, in its order) with
  the two all-reduces over the given group: the same values to the bit.
- ``dist_checkpointing``: ``MegatronModule.sharded_state_dict`` treats tensors of non-megatron
  children as replicas and ``ColumnParallelLinear``'s ignores ``partition_stride``, so the
  Hyena mixer places its own shards (`hyena_cp.megatron.sharded_state`); a hybrid pattern needs
  ``non_homogeneous_layers`` (`HyenaLanguageModel.sharded_state_dict` sets it). The 0.16 save
  path imports ``psutil``, calls ``torch.cuda.synchronize()``, puts a status flag on
  ``torch.cuda.current_device()`` and starts writer processes; loading runs on CPU as is.
- ``RotaryEmbedding.get_emb`` moves ``inv_freq`` to CUDA and its CP slicing builds a CUDA
  index, so `hyena_cp.megatron.rope` builds the table itself; ``SelfAttention`` applies a
  given ``rotary_pos_emb`` on CPU (``apply_rope_fusion=False``) without slicing it for CP.

Process groups. The run mesh owns them (`hyena_cp.distributed.mesh`); the models of a run are
built on a ``ProcessGroupCollection`` of the mesh's own groups (`hyena_cp.megatron.groups`,
passed by `hyena_cp.train.build_model`), and nothing on their path (forward, backward, the
loss, ``sharded_state_dict``, generation, training with FSDP2 and checkpoints) reads
``parallel_state``: tests/test_megatron_mesh_groups.py runs it with ``parallel_state`` never
initialised. The megatron-core 0.16.1 code that still reads ``parallel_state``, and what keeps
hyena_cp off it:

- any megatron module built WITHOUT groups: ``TransformerBlock`` / ``TransformerLayer`` /
  ``SelfAttention`` with ``pg_collection=None`` (``ProcessGroupCollection.use_mpu_process_groups``),
  the tensor-parallel linears, ``VocabParallelEmbedding`` and ``MLP`` with ``tp_group=None``
  (``get_tensor_model_parallel_group_if_none``). hyena_cp builds every module with its groups;
  ``HyenaLanguageModel(pg_collection=None)`` and a user's own megatron modules (a config whose
  model takes no ``pg_collection``) read ``parallel_state``. THIS is why
  ``init_parallel(megatron=True)`` still initialises it.
- ``apply_rotary_pos_emb`` (``rope_utils``) reads ``parallel_state``'s CP group when
  ``pg_collection.cp`` is None, even without CP: `mesh_pg_collection` gives a real group (size 1
  included).
- ``sharded_state_dict`` (``MegatronModule``'s, ``sharded_state_dict_default``,
  ``ensure_metadata_has_dp_cp_group``, ``make_sharded_tensors_for_checkpoint``): the DP x CP
  group when ``metadata`` has no ``dp_cp_group`` (`with_dp_cp_group` fills it from
  ``pg_collection.dp_cp``), the TP group for a module without a ``tp_group`` attribute (ours all
  have one).
- ``vocab_parallel_cross_entropy`` (no group argument in 0.16): replaced, see above.
- ``SelfAttention.get_query_key_value_tensors`` with ``num_query_groups`` < TP size (TP rank and
  an all-gather from ``parallel_state``): refused (`hyena_cp.megatron.attention`).
- ``get_transformer_layer_offset`` / ``get_num_layers_to_build``: the pipeline rank, only when none
  is given; with a collection megatron passes ``get_pg_rank(pg_collection.pp)`` (0 for None).
- the CUDA RNG tracker (``model_parallel_cuda_manual_seed`` reads the TP rank; forked by
  activation recompute, by the stock attention's dropout and by dropout under sequence
  parallelism), megatron's ``DistributedDataParallel``, optimizers and grad clipping
  (``param_is_not_tensor_parallel_duplicate`` without a group), the fully parallel
  ``dist_checkpointing`` strategy wrappers and ``TransformerConfig.test_mode``: not used by
  hyena_cp (CPU init, FSDP2, `hyena_cp.distributed.grad_norm`, megatron's default strategies).

``parallel_state``'s groups cannot BE the mesh's: ``initialize_model_parallel`` creates every
group itself (``create_group``) and 0.16 has no way to hand it existing ones (its group
globals are private). So `init_parallel` keeps the two sets and checks, on every rank, that
megatron's TP, CP, DP and DP x CP groups hold the mesh's ranks.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.package_info import __version__ as MEGATRON_VERSION
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as _vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from hyena_cp.parallel import group_max, group_rank, group_size, group_sum

__all__ = [
    "AttnMaskType", "ColumnParallelLinear", "LanguageModelEmbedding", "MEGATRON_VERSION", "MegatronModule",
    "ModuleSpec", "PackedSeqParams", "PlainSubmodule", "ProcessGroupCollection", "RowParallelLinear",
    "ShardedObject", "ShardedTensor", "ShardedTensorFactory", "dp_cp_group_of",
    "SelfAttention", "SelfAttentionSubmodules", "TransformerBlock", "TransformerBlockSubmodules",
    "TransformerConfig", "TransformerLayer", "TransformerLayerSubmodules", "WrappedTorchNorm",
    "cpu_config_defaults", "get_bias_dropout_add", "mlp_submodule", "resolve_cp_group", "resolve_pg_collection",
    "resolve_tp_group", "set_tensor_model_parallel_attributes", "with_dp_cp_group",
    "CROSS_ENTROPY_TAKES_TP_GROUP", "vocab_parallel_cross_entropy",
]

SUPPORTED = ((0, 16), (0, 19))


def _check_version(version: str) -> None:
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    if major_minor < SUPPORTED[0]:
        raise ImportError(f"hyena_cp.megatron needs megatron-core >= 0.16, found {version}; "
                          f"pip install 'megatron-core>=0.16'")
    if major_minor > SUPPORTED[1]:
        warnings.warn(f"megatron-core {version} is newer than the versions hyena_cp.megatron was "
                      f"tested with (0.16-0.19); check hyena_cp/megatron/compat.py", stacklevel=2)


_check_version(MEGATRON_VERSION)


_CUDA_GRAPH_FIELD = ("cuda_graph_modules" if "cuda_graph_modules" in TransformerConfig.__dataclass_fields__
                     else "cuda_graph_scope")


def cpu_config_defaults() -> dict[str, object]:
    """``TransformerConfig`` fields for a model that must run on CPU (a fresh dict each call;
    see the module docstring for why each is needed)."""
    return {"use_cpu_initialization": True, _CUDA_GRAPH_FIELD: []}


@dataclasses.dataclass(frozen=True)
class PlainSubmodule:
    """A submodule spec that megatron's ``build_module`` builds like a ``ModuleSpec`` (it reads
    ``module``, ``params`` and ``submodules``) for an MLP of our own. ``TransformerLayer``
    dispatches a ``ModuleSpec`` MLP on its class (megatron's MLP, MoE, TE variants) and logs a
    warning per layer for any other; this spec is not a ``ModuleSpec``, so it is built with
    ``config=`` alone and our MLP gets everything else (its TP group) from ``params``."""

    module: type
    params: dict = dataclasses.field(default_factory=dict)
    submodules: object = None


def mlp_submodule() -> ModuleSpec | functools.partial:
    """megatron's dense MLP (column-parallel fc1, row-parallel fc2) as a ``TransformerLayer``
    ``mlp`` submodule."""
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    if hasattr(MLP, "as_mlp_submodule"):
        return functools.partial(MLP.as_mlp_submodule, submodules=submodules)
    return ModuleSpec(module=MLP, submodules=submodules)


def _has_model_parallel_state() -> bool:
    return parallel_state.model_parallel_is_initialized()


def resolve_cp_group(pg_collection: ProcessGroupCollection | None) -> ProcessGroup | None:
    """The context-parallel group: ``pg_collection.cp`` when the collection has one (None
    there means one process), else ``parallel_state``'s when it is initialised, else None."""
    # "Has one" = the attribute was set: an unset field raises AttributeError up to 0.18 and
    # reads as None from 0.19, so ask the instance dict, which is the same in every version.
    if pg_collection is not None and "cp" in vars(pg_collection):
        return pg_collection.cp
    if _has_model_parallel_state():
        return parallel_state.get_context_parallel_group()
    return None


def resolve_tp_group(pg_collection: ProcessGroupCollection | None) -> ProcessGroup | None:
    """The tensor-parallel group: ``pg_collection.tp`` when the collection has one, else
    ``parallel_state``'s when it is initialised, else None (no process group at all)."""
    if pg_collection is not None and "tp" in vars(pg_collection):
        return pg_collection.tp
    if _has_model_parallel_state():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def dp_cp_group_of(metadata: dict | None) -> ProcessGroup | None:
    """The data x context parallel group of megatron's ``sharded_state_dict(metadata=...)`` (where
    megatron puts it), else ``parallel_state``'s, else None (one replica)."""
    if metadata is not None and metadata.get("dp_cp_group") is not None:
        return metadata["dp_cp_group"]
    if _has_model_parallel_state():
        return parallel_state.get_data_parallel_group(with_context_parallel=True)
    return None


def with_dp_cp_group(metadata: dict | None, pg_collection: ProcessGroupCollection) -> dict:
    """megatron's ``sharded_state_dict`` metadata with ``dp_cp_group`` set from ``pg_collection``
    when the caller gave none and the collection has one: megatron (``ensure_metadata_has_dp_cp_group``)
    would otherwise read it from ``parallel_state``. A fresh dict; ``metadata`` is not modified."""
    metadata = dict(metadata or {})
    if metadata.get("dp_cp_group") is None and vars(pg_collection).get("dp_cp") is not None:
        metadata["dp_cp_group"] = pg_collection.dp_cp
    return metadata


def resolve_pg_collection(pg_collection: ProcessGroupCollection | None) -> ProcessGroupCollection:
    """The process groups a model is built with: ``pg_collection``, else ``parallel_state``'s.

    ``pg_collection.tp`` must be a process group (megatron's tensor-parallel layers need one, even of
    size 1); ``pg_collection.pp`` must be set, to a group or to None (one pipeline stage: megatron
    reads it through ``get_pg_rank`` / ``get_pg_size``, which take None as rank 0 of 1). Raises
    ``ValueError`` otherwise, and when there is neither a collection nor ``parallel_state``."""
    if pg_collection is None:
        if not _has_model_parallel_state():
            raise ValueError(
                "megatron-core needs process groups: pass pg_collection=hyena_cp.megatron.groups."
                "mesh_pg_collection(init_parallel(...)) (the run mesh's groups; one gloo process is enough on "
                "CPU), or call megatron.core.parallel_state.initialize_model_parallel(...) first")
        return ProcessGroupCollection.use_mpu_process_groups()
    fields = vars(pg_collection)  # an unset field raises AttributeError up to 0.18, reads None from 0.19
    unset = [name for name in ("tp", "pp") if name not in fields]
    if unset or fields["tp"] is None:
        raise ValueError(f"pg_collection needs tp (a process group; a one-rank group when not tensor-parallel) and pp "
                         f"(a group, or None for one pipeline stage); unset: {unset}, tp={fields.get('tp')}; "
                         f"hyena_cp.megatron.groups.mesh_pg_collection gives the run mesh's")
    return pg_collection


# megatron-core 0.16's vocab_parallel_cross_entropy has no group argument (later versions may).
CROSS_ENTROPY_TAKES_TP_GROUP = "tp_group" in inspect.signature(_vocab_parallel_cross_entropy).parameters


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """megatron 0.16's ``_VocabParallelCrossEntropy`` (label smoothing 0) over a GIVEN TP group:
    megatron's own steps (``VocabParallelCrossEntropy``'s static methods) in megatron's order,
    with its two all-reduces (max, then the two sums) over ``tp_group`` instead of
    ``parallel_state``'s group, so the values are megatron's to the bit."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, tp_group: ProcessGroup) -> Tensor:
        logits, logits_max = VocabParallelCrossEntropy.calculate_logits_max(logits)
        logits_max = group_max(logits_max, tp_group)
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(logits.size(-1), group_rank(tp_group),
                                                                            group_size(tp_group))
        target_mask, masked_target, predicted, sum_exp, exp_logits = (
            VocabParallelCrossEntropy.calculate_predicted_logits(logits, target, logits_max, start, end))
        predicted, sum_exp = group_sum(predicted, tp_group), group_sum(sum_exp, tp_group)
        softmax, loss = VocabParallelCrossEntropy.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        softmax, target_mask, masked_target = ctx.saved_tensors
        grad_2d, arange_1d, softmax_update, grad_input = (
            VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask))
        grad_input = VocabParallelCrossEntropy.calculate_gradients(grad_2d, arange_1d, masked_target, softmax_update,
                                                                   grad_input, grad_output)
        return grad_input, None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, tp_group: ProcessGroup) -> Tensor:
    """megatron's per-token cross entropy of vocab-sharded ``logits [s, b, vocab/tp]`` against
    ``target [s, b]`` (global ids) -> float32 ``[s, b]``, the same on every TP rank, reduced over
    ``tp_group`` (megatron's function where it takes the group, else `_VocabParallelCrossEntropy`).
    Targets outside [0, vocab) get ``logsumexp``: mask them afterwards."""
    if CROSS_ENTROPY_TAKES_TP_GROUP:
        return _vocab_parallel_cross_entropy(logits, target, tp_group=tp_group)
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group)
