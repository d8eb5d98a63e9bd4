"""Baseline for configs/recall2d_hyena_tiny.py: the same network and job with global attention
(axial 2-D RoPE, QK-norm) over all 4,096 pixels of the canvas, no patching — one line changed:

    torchrun --standalone --nproc_per_node=2 launch/train.py configs/recall2d_attention_tiny.py

Under cp=2 each rank keeps its 32 rows of queries and all-gathers the keys and values.
"""
from hyena_cp.lazy import LazyConfig

model, task, optimizer, parallel, train = LazyConfig.load_rel(
    "recall2d_hyena_tiny.py", ("model", "task", "optimizer", "parallel", "train"))
model.mixers = "attention"  # every block; the Hyena settings stay unused
model.attention = dict(num_heads=4, rope_theta=100.0)  # head_dim 8: 2 rotation pairs per axis
