"""The tiny digits model with Hyena in the first two blocks and attention in the last two."""
from hyena_cp.lazy import LazyConfig

model = LazyConfig.load_rel("vit5_hyena_tiny.py", "model")
model.mixers = ["hyena"] * 2 + ["attention"] * 2
