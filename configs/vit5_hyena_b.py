"""ViT-5-B widths with Hyena token mixing: 768 wide, 12 blocks, 12 attention heads, patch 16."""
from hyena_cp.lazy import LazyConfig

model = LazyConfig.load_rel("vit5_hyena_s.py", "model")
model.embed_dim = 768
model.num_heads = 12
model.drop_path_rate = 0.1  # DeiT-III's rate for ViT-B
model.hyena.num_heads = 16  # 48 channels per filter group, as in the S config
