"""Byte-level Hyena language model (configs/hyena_lm_tiny.py, megatron-core) on the Python
standard library's own source code, with context parallelism over 2 ranks:

    torchrun --standalone --nproc_per_node=2 launch/train.py configs/lm_tiny.py

Each rank holds two of the four 64-byte chunks of every 256-byte sequence (Megatron's zigzag
CP layout: rank r has chunks r and 3-r). Sequences are packed: each source file is a document,
the model keeps documents apart and targets that cross into the next file are not counted
(``task.pack=false`` for plain windows). Reports validation loss in nats and bits per byte.
"""
import torch

from hyena_cp.data.stdlib_text import load_stdlib_text
from hyena_cp.lazy import LazyCall, LazyConfig
from hyena_cp.train.tasks import LanguageModeling

model = LazyConfig.load_rel("hyena_lm_tiny.py", "model")

task = LazyCall(LanguageModeling)(
    # sequences as long as the model's context (256 bytes)
    data=LazyCall(load_stdlib_text)(seq_len="${model.max_sequence_length}", val_fraction=0.05, max_bytes=2_000_000),
    global_batch_size=16,
    eval_batch_size=16,
    eval_samples=128,  # 32 KiB of held-out source per evaluation
    pack=True,  # files as documents: no convolution or attention crosses a file boundary
)
optimizer = LazyCall(torch.optim.AdamW)(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
parallel = dict(
    cp=2,
    tp=1,  # tensor-parallel size; world = dp * cp * tp, and model.hyena.num_heads % (tp * cp) == 0
    megatron=True,  # a megatron-core model: built on the run mesh's TP and CP groups
    dp_mode="fsdp",  # FSDP2 over the dp x cp ranks of each TP shard, per TransformerLayer; "ddp" replicates
)
train = dict(
    steps=500,  # ~2.5 min on 2 CPU cores; 2.130 bits/byte (packed) on Python 3.11's standard library
    seed=0,
    log_every=10,
    eval_every=100,
    ckpt_every=100,
    warmup_steps=30,
    clip_grad_norm=1.0,
)
