"""Hierarchical ViT-5-Hyena, Swin-S shape: the tiny config with 18 blocks in stage 3."""
from hyena_cp.lazy import LazyConfig

model = LazyConfig.load_rel("vit5_hier_tiny.py", "model")
model.depths = (2, 2, 18, 2)
model.drop_path_rate = 0.2
