"""Baseline for configs/digits_hyena_tiny.py: the same job with attention token mixers
(2-D RoPE, QK-norm; under CP the keys/values are all-gathered) -- one line changed.

    torchrun --standalone --nproc_per_node=2 launch/train.py configs/digits_attention_tiny.py
"""
from hyena_cp.lazy import LazyConfig

model, task, optimizer, parallel, train = LazyConfig.load_rel(
    "digits_hyena_tiny.py", ("model", "task", "optimizer", "parallel", "train"))
model.mixers = "attention"  # every block; the Hyena config keeps its filter settings unused
