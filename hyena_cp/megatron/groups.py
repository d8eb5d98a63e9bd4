"""megatron-core's process groups for the run mesh: one ``ProcessGroupCollection`` whose groups ARE
the mesh's (`hyena_cp.distributed.mesh.ParallelGroups`), handed to every megatron module we build.

The mesh owns every group of a run; megatron modules take theirs from the collection, the way
megatron-core 0.16 lets a caller choose them (``pg_collection=`` on ``TransformerBlock``,
``TransformerLayer`` and ``SelfAttention``, ``tp_group=`` on the linear layers and the embedding),
so a model built with it never reads ``parallel_state``. Which megatron code still reads
``parallel_state``, and why `init_parallel` still initialises it: `hyena_cp.megatron.compat`.

Fields (megatron's names):

- ``tp``, ``cp``, ``dp``, ``dp_cp``: the mesh's groups of those dimensions, size 1 included:
  megatron's tensor-parallel layers call ``tp_group.size()``, so they need a real group even
  for one rank, and a size-1 group means one process to hyena_cp's own code as well.
- ``pp``: None. The mesh has no pipeline dimension; the megatron modules hyena_cp builds read
  the pipeline group only through ``get_pg_rank`` / ``get_pg_size``, which take None as one
  stage (rank 0 of 1).

Why TP groups are bound at construction and CP groups travel per call: a TP module's weights ARE
its shard (megatron's ``ColumnParallelLinear`` / ``RowParallelLinear`` / ``VocabParallelEmbedding``
split them by the TP rank when they are built, as hyena_cp's ``Hyena(tp_group=...)`` does), so
its group cannot change afterwards. A CP shard is a property of the INPUT: the weights are the
same on every CP rank, so hyena_cp's own modules take ``cp_group`` per call
(``QKVSequenceMixer.forward(x, cp_group=...)``, the ViT nets) and one module can run sharded
or whole. megatron's ``TransformerLayer`` calls its
``self_attention`` with no group, so the megatron wrappers (`MegatronHyenaMixer`,
`TorchCoreAttention`, `HyenaLanguageModel`) keep the collection's CP group and pass it on per call.
"""
from __future__ import annotations

from hyena_cp.distributed.mesh import ParallelGroups
from hyena_cp.megatron.compat import ProcessGroupCollection

__all__ = ["MESH_PG_FIELDS", "mesh_pg_collection"]

MESH_PG_FIELDS = ("tp", "cp", "dp", "dp_cp")  # the collection's fields that are mesh groups


def mesh_pg_collection(groups: ParallelGroups) -> ProcessGroupCollection:
    """The ``ProcessGroupCollection`` of this rank's mesh (see the module docstring); pass it as
    ``pg_collection=`` to `hyena_cp.megatron.build_hyena_lm` / `HyenaLanguageModel`."""
    mesh_groups = {field: groups.submesh(field).get_group() for field in MESH_PG_FIELDS}
    return ProcessGroupCollection(**mesh_groups, pp=None)
