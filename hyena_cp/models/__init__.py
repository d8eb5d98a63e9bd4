"""Vision models: the ViT-5 Hyena adapter, blocks, layouts and classification networks."""
from hyena_cp.models.adapter import ViT5HyenaAdapter
from hyena_cp.models.attention import Attention2d
from hyena_cp.models.blocks import ViT5Block
from hyena_cp.models.hierarchical import PatchMerge, ViT5ClassificationNet, ViT5HierarchicalClassificationNet
from hyena_cp.models.token_grid import StageGrid, StageLayout

__all__ = ["ViT5HyenaAdapter", "Attention2d", "ViT5Block", "PatchMerge", "ViT5ClassificationNet",
           "ViT5HierarchicalClassificationNet", "StageGrid", "StageLayout"]
