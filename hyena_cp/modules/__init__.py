from hyena_cp.modules.conditioning import AdaLNZero, FiLM
from hyena_cp.modules.hyena import Hyena
from hyena_cp.modules.mixer import QKVSequenceMixer
from hyena_cp.modules.norm import TensorParallelNorm

__all__ = ["Hyena", "QKVSequenceMixer", "FiLM", "AdaLNZero", "TensorParallelNorm"]
