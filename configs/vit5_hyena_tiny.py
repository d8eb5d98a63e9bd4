"""A ViT-5-Hyena that trains on a CPU in minutes: sklearn's 8x8 digits upsampled to 32x32,
1 channel, 10 classes, patch 4 -> an 8x8 grid + one register row (72 tokens), 64 wide,
4 blocks. The training config sets img_size / patch_size / in_chans / num_classes."""
from hyena_cp import ViT5ClassificationNet
from hyena_cp.lazy import LazyCall

model = LazyCall(ViT5ClassificationNet)(
    img_size=32,
    patch_size=4,
    in_chans=1,
    num_classes=10,
    embed_dim=64,
    depth=4,
    num_heads=4,
    mixers=["hyena"] * 4,  # the hybrid switch: e.g. ["hyena"] * 2 + ["attention"] * 2
    mlp_ratio=4.0,
    class_token=True,
    num_registers=4,
    pool="cls",
    drop_path_rate=0.0,
    layer_scale_init=1e-4,
    hyena=dict(num_heads=4, filter_width=32, filter_bands=4),
    mixer=dict(short_kernel_size=3),
    max_cp_size=4,
)
