"""ViT-5-S widths with Hyena token mixing: 384 wide, 12 blocks, 6 attention heads (used only
by blocks switched to attention), patch 16 at 224 px -> 14x14 patches + a register row."""
from hyena_cp import ViT5ClassificationNet
from hyena_cp.lazy import LazyCall

model = LazyCall(ViT5ClassificationNet)(
    img_size=224,
    patch_size=16,
    in_chans=3,
    num_classes=1000,
    embed_dim=384,
    depth=12,
    num_heads=6,
    mixers="hyena",  # or one name per block, e.g. ["hyena"] * 8 + ["attention"] * 4
    mlp_ratio=4.0,
    class_token=True,
    num_registers=4,
    pool="cls",
    drop_path_rate=0.05,  # DeiT-III's rate for ViT-S
    layer_scale_init=1e-4,
    # 8 filter groups: divisible by every CP size up to 8 (groups are never split across ranks)
    hyena=dict(num_heads=8, filter_width=64, filter_bands=8),
    mixer=dict(short_kernel_size=3),
    max_cp_size=8,
)
