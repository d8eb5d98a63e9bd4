"""Tiny byte-level Hyena language model on megatron-core (CPU-friendly: a few hundred
training steps take minutes on 2 cores). Context parallel as is: num_heads=4 and
hidden_size=64 allow CP sizes 1, 2 and 4; seq 256 keeps zigzag chunks >= the short-conv halo.

    model = instantiate(cfg.model, pg_collection=mesh_pg_collection(groups))  # the run mesh's groups
    model = instantiate(cfg.model)                   # or after parallel_state.initialize_model_parallel

Hybrid variant: ``model.layer_pattern=HAH model.num_layers=3``: attention layers run under CP
(K/V gathered over the CP group) with rotary embeddings; ``model.position_embedding=none`` for NoPE.
Tensor parallel: vocab 256, hidden 64, 4 Hyena filter groups, 4 attention heads and ffn 128 split
over TP 2 or 4 (Hyena also needs num_heads % (TP*CP) == 0: TP 2 x CP 2 works).
"""
from hyena_cp.lazy import LazyCall
from hyena_cp.megatron import build_hyena_lm

model = LazyCall(build_hyena_lm)(
    vocab_size=256,  # bytes
    max_sequence_length=256,  # global context; Hyena filters are normalised by it (max_len)
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,  # used by "A" layers only
    layer_pattern="HH",
    position_embedding="rope",  # attention layers only (the transformer baseline); Hyena ignores it
    rotary_base=10000,
    hyena=dict(  # HyenaMixerConfig fields
        num_heads=4,  # filter groups: a multiple of the CP size
        short_kernel_size=3,
        filter_bands=8,
        filter_width=32,
        filter_depth=2,
        max_len=256,
    ),
    normalization="RMSNorm",
    hidden_dropout=0.0,  # CP parity needs identical dropout masks, i.e. none
)
