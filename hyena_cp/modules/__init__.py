from hyena_cp.modules.conditioning import AdaLNZero, FiLM
from hyena_cp.modules.hyena import Hyena
from hyena_cp.modules.long_conv import LongConv
from hyena_cp.modules.mixer import QKVSequenceMixer
from hyena_cp.modules.norm import TensorParallelNorm

__all__ = ["Hyena", "LongConv", "QKVSequenceMixer", "FiLM", "AdaLNZero", "TensorParallelNorm"]
