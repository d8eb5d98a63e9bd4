"""A tiny StripedHyena 2 (Evo 2's architecture) on the Python standard library's source, bytes as
tokens (Evo 2's tokenizer is bytes too, vocabulary 512), with context parallelism over 2 ranks:

    torchrun --standalone --nproc_per_node=2 launch/train.py configs/evo2_tiny.py

Layers "SDHA": Hyena-SE (explicit FIR, 7 taps, no skip), Hyena-MR (explicit FIR with Savanna's fixed
exponential decay and a skip), Hyena-LI (modal filter, 16 real poles per channel, integer positions)
and attention (RoPE), each in Evo 2's block (RMSNorm with eps outside the root, gated MLP with GELU in
the first layer only, tied embeddings). Evo 2's MR has 128 taps; this one has 32 so that the zigzag
chunks of a 256-byte sequence at CP=2 (64 tokens) hold its halo of K-1 = 31 (at CP=4: 32 tokens).
The explicit FIRs run as direct convs with a point-to-point halo under CP, LI as the FFT conv.
Evo 2's converted checkpoints load into the same model (launch/convert.py, docs/evo2_hyenadna.md).
"""
import torch

from hyena_cp.data.stdlib_text import load_stdlib_text
from hyena_cp.lazy import LazyCall
from hyena_cp.megatron import build_hyena_lm
from hyena_cp.train.tasks import LanguageModeling

_common = dict(short_kernel_size=3, bias=False, out_proj_bias=True)  # Evo 2: only the output projection has a bias
model = LazyCall(build_hyena_lm)(
    vocab_size=512,  # Evo 2's byte tokenizer
    max_sequence_length=256,
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    layer_pattern="SDHA",
    hyena_layers=dict(
        S=dict(num_heads=16, filter="explicit", filter_options=dict(length=7), skip=False, **_common),
        D=dict(num_heads=16, filter="explicit", filter_options=dict(length=32, decay="savanna", L_cache=256),
               **_common),
        H=dict(num_heads=64, filter="modal", filter_options=dict(state_size=16, parametrization="savanna"),
               **_common),
    ),
    block="evo2",
    tie_embeddings=True,
    position_embedding="rope",
    rotary_base=10000,
    hidden_dropout=0.0,  # CP parity needs identical dropout masks, i.e. none
    config_overrides=dict(layernorm_epsilon=1e-6, add_bias_linear=True, add_qkv_bias=False),
)

task = LazyCall(LanguageModeling)(
    data=LazyCall(load_stdlib_text)(seq_len="${model.max_sequence_length}", val_fraction=0.05, max_bytes=2_000_000),
    global_batch_size=16,
    eval_batch_size=16,
    eval_samples=128,
    pack=True,  # files as documents: no convolution or attention crosses a file boundary
)
optimizer = LazyCall(torch.optim.AdamW)(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
parallel = dict(cp=2, tp=1, megatron=True, dp_mode="fsdp")
train = dict(steps=300, seed=0, log_every=10, eval_every=100, ckpt_every=100, warmup_steps=30, clip_grad_norm=1.0)
