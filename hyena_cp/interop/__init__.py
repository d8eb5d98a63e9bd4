"""Conversions of other codebases' configs and checkpoints into hyena_cp modules: pure mappings of
config data and state_dicts, without importing the other codebase.

- `hyena_cp.interop.nvsubquadratic`: NVIDIA nvSubquadratic 0.2.0 (``QKVSequenceMixer`` + ``Hyena`` +
  ``CKConvND``, ``ViT5HyenaAdapter``, the ViT-5 classification networks).
- `hyena_cp.interop.evo2`: Evo 2 / StripedHyena 2 (vortex's configs and checkpoints) -> the megatron-core LM.
- `hyena_cp.interop.hyenadna`: HyenaDNA (HuggingFace, standalone, Lightning checkpoints) -> the megatron-core LM.
"""
