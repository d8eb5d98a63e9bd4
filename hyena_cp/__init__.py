"""hyena_cp: context-parallel Hyena over 1, 2 or 3 axes (causal, linear or circular each) with exact-adjoint
backward (README.md, docs/)."""
from hyena_cp.lazy import LazyCall, LazyConfig, instantiate
from hyena_cp.models.adapter import ViT5HyenaAdapter
from hyena_cp.models.hierarchical import ViT5ClassificationNet, ViT5HierarchicalClassificationNet
from hyena_cp.modules.hyena import Hyena
from hyena_cp.modules.mixer import QKVSequenceMixer

__all__ = ["Hyena", "QKVSequenceMixer", "ViT5HyenaAdapter", "LazyCall", "LazyConfig", "instantiate"]
__all__ += ["ViT5HierarchicalClassificationNet", "ViT5ClassificationNet"]
