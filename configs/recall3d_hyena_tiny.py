"""3-D spatial recall with an N-D Hyena CCNN under context parallelism: a digit sits at the far
corner of the last frame of an 8x32x32 volume; copy it to the top-left 8x8 corner of frame 0,
across every axis (hyena_cp.data.spatial_recall; scikit-learn's digits, nothing downloaded):

    torchrun --standalone --nproc_per_node=2 launch/train.py configs/recall3d_hyena_tiny.py

``task.data.placement=random`` puts the digit anywhere (a harder task: see docs/results.md).

cp=2: both ranks see the same volumes, each holds 4 of the 8 frames through the network; the
Hyena long conv (a SIREN kernel over all 8,192 positions, zero-padded) swaps frame blocks for
channel blocks and back. Results: docs/results.md.
"""
import torch

from hyena_cp.data.spatial_recall import make_spatial_recall
from hyena_cp.lazy import LazyCall, LazyConfig
from hyena_cp.train.spatial_tasks import SpatialRecallTask

model, optimizer, train = LazyConfig.load_rel("recall2d_hyena_tiny.py", ("model", "optimizer", "train"))
model.grid = (8, 32, 32)
model.dim = 32
model.hyena.num_heads = 16  # a filter per pair of channels: the 3-D FFT is over a zero-padded 16x64x64 grid
task = LazyCall(SpatialRecallTask)(
    data=LazyCall(make_spatial_recall)(size="${model.grid}", glyph_size=8, num_train=50000, num_val=256,
                                       noise_std=0.0, placement="fixed", seed=0),
    global_batch_size=8,
    eval_batch_size=32,
)
parallel = dict(cp=2, backend="auto", timeout_s=300, megatron=False, dp_mode="fsdp", mixed_precision=None)
