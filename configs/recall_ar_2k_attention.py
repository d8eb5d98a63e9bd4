"""Baseline for configs/recall_ar_2k.py: the same run with two causal attention layers (4 heads,
RoPE) in place of the Hyena layers -- one line changed.

    python launch/train.py configs/recall_ar_2k_attention.py
"""
from hyena_cp.lazy import LazyConfig

model, task, optimizer, parallel, train = LazyConfig.load_rel(
    "recall_ar_2k.py", ("model", "task", "optimizer", "parallel", "train"))
model.layer_pattern = "AA"  # the Hyena settings stay, unused
