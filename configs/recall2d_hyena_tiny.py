"""2-D spatial recall with an N-D Hyena CCNN: find the digit somewhere on a 64x64 canvas and copy
it into the top-left 16x16 corner (hyena_cp.data.spatial_recall; scikit-learn's digits, nothing
downloaded). Global token mixing over all 4,096 pixels, no patching:

    torchrun --standalone --nproc_per_node=2 launch/train.py configs/recall2d_hyena_tiny.py

cp=2: both ranks see the same canvases, each holds 32 of the 64 rows through the network. The
Hyena is nvSubquadratic's recall recipe, small: a SIREN kernel per channel (omega_0 = 10, no mask),
zero-padded (linear) long conv over the whole canvas, a LayerNorm before it, small/Wang inits.
Results and the attention baseline (configs/recall2d_attention_tiny.py): docs/results.md.
"""
import torch

from hyena_cp.data.spatial_recall import make_spatial_recall
from hyena_cp.lazy import LazyCall
from hyena_cp.models.ccnn import CCNN
from hyena_cp.ops.siren import SirenFilter
from hyena_cp.train.spatial_tasks import SpatialRecallTask

model = LazyCall(CCNN)(
    in_channels=2,  # canvas, glyph mark
    out_channels=1,
    grid=(64, 64),
    dim=32,
    depth=4,
    mixers="hyena",  # or "attention", or one per block
    mlp_ratio=2.0,
    norm="layernorm",
    hyena=dict(
        num_heads=32,  # one filter per channel
        filter=LazyCall(SirenFilter)(_partial_=True, L_cache="${model.grid}", embedding_dim=32, hidden_dim=32,
                                     num_layers=3, omega_0=10.0),
        mask=None,
        conv_norm="layernorm",
    ),
    mixer=dict(short_kernel_size=3, bias=False, norm=None, in_proj_init="small", out_proj_init="wang",
                      init_num_layers="${model.depth}"),
)
task = LazyCall(SpatialRecallTask)(
    data=LazyCall(make_spatial_recall)(size="${model.grid}", glyph_size=16, num_train=50000, num_val=256,
                                       noise_std=0.0, placement="random", seed=0),
    global_batch_size=16,
    eval_batch_size=64,
)
optimizer = LazyCall(torch.optim.AdamW)(lr=2e-3, betas=(0.9, 0.98), weight_decay=1e-3)
parallel = dict(cp=2, backend="auto", timeout_s=300, megatron=False, dp_mode="fsdp", mixed_precision=None)
train = dict(
    steps=600,
    seed=0,
    log_every=10,
    eval_every=100,
    ckpt_every=200,
    warmup_steps=30,
    clip_grad_norm=1.0,
)
