"""Associative recall at 8k tokens, under context parallelism over 2 ranks: the Hyena model of
configs/recall_ar_2k.py continues from that run's weights (train it first) for 30 steps on
8192-token sequences.

    python launch/train.py configs/recall_ar_2k.py          # writes outputs/recall_ar_2k/
    torchrun --standalone --nproc_per_node=2 launch/train.py configs/recall_ar_8k.py

Each rank holds two of the four 2048-token zigzag chunks of every sequence. The metric is the
accuracy at the query position of 256 held-out 8192-token sequences: 100.00 % after 30 steps
(260 s on 2 shared CPU cores; 98.83 % with the 2k weights as they are), and a CP=1 rerun
gives the same losses (rtol 1e-5, launch/compare_runs.py).
"""
from hyena_cp.lazy import LazyCall, LazyConfig
from hyena_cp.train.warm_start import warm_start

model, task, optimizer, parallel, train = LazyConfig.load_rel(
    "recall_ar_2k.py", ("model", "task", "optimizer", "parallel", "train"))
model = LazyCall(warm_start)(model=model, checkpoint="outputs/recall_ar_2k")
task.lengths = [8192]
task.length_steps = [0]
task.eval_len = 8192
task.extra_eval_lens = []
optimizer.lr = 1e-3  # a continuation: a fifth of the first run's peak
parallel.cp = 2
train.steps = 30
train.log_every = 1  # every step's loss: the trajectory compared with a CP=1 rerun (launch/compare_runs.py)
train.warmup_steps = 5
train.eval_every = 15
train.ckpt_every = 10
