"""Conversions of other codebases' configs and checkpoints into hyena_cp modules: pure mappings of
config data and state_dicts, without importing the other codebase.

- `hyena_cp.interop.nvsubquadratic`: NVIDIA nvSubquadratic 0.2.0 (``QKVSequenceMixer`` + ``Hyena`` +
  ``CKConvND``, ``ViT5HyenaAdapter``, the ViT-5 classification networks).
"""
