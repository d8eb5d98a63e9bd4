"""Baseline for configs/recall_ar_8k.py: the attention model of configs/recall_ar_2k_attention.py
continues from that run's weights on 8192-token sequences.

    python launch/train.py configs/recall_ar_2k_attention.py   # writes outputs/recall_ar_2k_attention/
    python launch/train.py configs/recall_ar_8k_attention.py

One process: with a causal mask and no CP, scaled_dot_product_attention's fused CPU kernel
never stores the 8192 x 8192 scores; under CP the attention layers take an explicit mask of
global positions. Attention costs ~L^2: at 8k a step of 32 sequences takes minutes on a CPU,
so this run takes 10 steps of 8 sequences and is validated on 128 sequences: 22.66 % (185 s).
"""
from hyena_cp.lazy import LazyConfig

model, task, optimizer, parallel, train = LazyConfig.load_rel(
    "recall_ar_8k.py", ("model", "task", "optimizer", "parallel", "train"))
model.model.layer_pattern = "AA"
model.checkpoint = "outputs/recall_ar_2k_attention"
task.global_batch_size = 8
task.eval_samples = 128
task.eval_batch_size = 8
parallel.cp = 1
train.steps = 10
train.warmup_steps = 2
train.eval_every = 0
