"""Hierarchical ViT-5-Hyena, Swin-T shape: patch 4, widths 96-192-384-768, depths 2-2-6-2.
224 px -> stage grids 56, 28, 14, 7 (+ a register row each). Hyena in the three
high-resolution stages, attention in the last (7x7: 54 tokens, attention is cheap there)."""
from hyena_cp import ViT5HierarchicalClassificationNet
from hyena_cp.lazy import LazyCall

model = LazyCall(ViT5HierarchicalClassificationNet)(
    img_size=224,
    patch_size=4,
    in_chans=3,
    num_classes=1000,
    embed_dim=96,
    depths=(2, 2, 6, 2),
    num_heads=(3, 6, 12, 24),
    mixers=("hyena", "hyena", "hyena", "attention"),  # one entry per stage (or a list per block)
    mlp_ratio=4.0,
    class_token=True,
    num_registers=4,
    pool="cls",
    drop_path_rate=0.1,
    layer_scale_init=1e-4,
    hyena=dict(num_heads=8, filter_width=64, filter_bands=8),
    mixer=dict(short_kernel_size=3),
    max_cp_size=8,
)
