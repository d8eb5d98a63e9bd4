"""A tiny HyenaDNA-style model on the Python standard library's source (bytes as tokens), with
context parallelism over 2 ranks:

    torchrun --standalone --nproc_per_node=2 launch/train.py configs/hyenadna_tiny.py

HyenaDNA's block: LayerNorm pre-norms, an MLP with tanh-GELU and biases, and in every layer the
safari Hyena operator (implicit filter: a sine MLP of a positional table with a band at 1e-4 and
positions n/(l_max-1), times an exponential window plus HuggingFace's shift of 0.05; biases on
every projection and on the short filter). The table length ``l_max`` is the longest sequence
the model accepts. Converted HyenaDNA checkpoints load into the same model with their own sizes
(launch/convert.py, docs/evo2_hyenadna.md).
"""
import torch

from hyena_cp.data.stdlib_text import load_stdlib_text
from hyena_cp.lazy import LazyCall
from hyena_cp.megatron import build_hyena_lm
from hyena_cp.train.tasks import LanguageModeling

model = LazyCall(build_hyena_lm)(
    vocab_size=256,  # bytes (HyenaDNA's own vocabulary is 12 nucleotide tokens, padded to 16)
    max_sequence_length=256,
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=256,
    num_attention_heads=1,  # no attention layers
    layer_pattern="HH",
    hyena=dict(num_heads=64, short_kernel_size=3, filter="safari", bias=True,
               filter_options=dict(l_max=256, emb_dim=5, width=64, num_inner_mlps=2, sin_freq=10.0, shift=0.05)),
    block="megatron",
    normalization="LayerNorm",
    activation="gelu_tanh",
    position_embedding="none",
    hidden_dropout=0.0,
    config_overrides=dict(layernorm_epsilon=1e-5, add_bias_linear=True),
)

task = LazyCall(LanguageModeling)(
    data=LazyCall(load_stdlib_text)(seq_len="${model.max_sequence_length}", val_fraction=0.05, max_bytes=2_000_000),
    global_batch_size=16,
    eval_batch_size=16,
    eval_samples=128,
    pack=True,
)
optimizer = LazyCall(torch.optim.AdamW)(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
parallel = dict(cp=2, tp=1, megatron=True, dp_mode="fsdp")
train = dict(steps=300, seed=0, log_every=10, eval_every=100, ckpt_every=100, warmup_steps=30, clip_grad_norm=1.0)
