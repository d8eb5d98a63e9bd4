"""The pieces of StripedHyena 2's (Evo 2's) block that megatron-core's ``TransformerLayer`` does
not have, as submodules of its spec (`hyena_cp.megatron.specs`, ``block="evo2"``):

- `EpsOutsideRMSNorm`: ``scale * x / (sqrt(mean(x^2)) + eps)`` — eps ADDED TO the RMS, not inside
  the square root as in torch's RMSNorm (a 5e-6 relative difference in Evo 2's logits: visible in
  float64, hidden in float32);
- `GatedMLP`: ``l3(φ(l1 x) * l2 x)``, three bias-free linears (l1, l2 column-parallel, l3
  row-parallel under TP); φ is GELU (erf) in the FIRST layer of the network and the identity in
  every other one (Evo 2's ``evo2_style_activations``; ``activation`` picks another rule);
- `QKVLinear`: megatron's attention gives its qkv projection a bias when ``add_bias_linear`` OR
  ``add_qkv_bias`` is set; Evo 2's attention has an output bias but no qkv bias, so its qkv
  projection takes ``add_qkv_bias`` alone.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hyena_cp.megatron.compat import ColumnParallelLinear, MegatronModule, RowParallelLinear, TransformerConfig

__all__ = ["EpsOutsideRMSNorm", "GatedMLP", "QKVLinear", "MLP_ACTIVATIONS"]

MLP_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu,
                   "identity": lambda x: x}


class EpsOutsideRMSNorm(nn.Module):
    """``weight * x / (||x||_2 / sqrt(D) + eps)`` over the last dim (see the module docstring).
    Built by ``TransformerLayer`` as ``(config=, hidden_size=, eps=)``; the weight starts at ones."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.pow(2).mean(-1, keepdim=True).sqrt()
        return self.weight * x / (rms + self.eps)


class GatedMLP(MegatronModule):
    """``l3(φ(l1 x) * l2 x)`` (see the module docstring), ``[s, b, h] -> ([s, b, h], None)``.

    Args:
        config: ``hidden_size``, ``ffn_hidden_size`` (F), ``init_method`` (l1, l2) and
            ``output_layer_init_method`` (l3).
        tp_group: the tensor-parallel group: l1 and l2 split F, l3 sums over it.
        activation: φ of the first layer (``first_activation``) and of every other one
            (``activation``), names of `MLP_ACTIVATIONS`. ``TransformerLayer`` tells the layer
            number (`set_layer_number`).
        bias: biases of the three linears (Evo 2: none).
    """

    def __init__(self, config: TransformerConfig, *, tp_group, first_activation: str = "gelu",
                 activation: str = "identity", bias: bool = False):
        super().__init__(config=config)
        for name in (first_activation, activation):
            if name not in MLP_ACTIVATIONS:
                raise ValueError(f"MLP activation {name!r} must be one of {sorted(MLP_ACTIVATIONS)}")
        h, f = config.hidden_size, config.ffn_hidden_size
        column = dict(config=config, init_method=config.init_method, bias=bias, gather_output=False,
                      skip_bias_add=False, tp_group=tp_group)
        self.l1, self.l2 = ColumnParallelLinear(h, f, **column), ColumnParallelLinear(h, f, **column)
        self.l3 = RowParallelLinear(f, h, config=config, init_method=config.output_layer_init_method, bias=bias,
                                    input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
        self.first_activation, self.later_activation = first_activation, activation
        self.activation = activation

    def set_layer_number(self, layer_number: int) -> None:
        """megatron's 1-based layer number: layer 1 is the network's first."""
        self.activation = self.first_activation if layer_number == 1 else self.later_activation

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """``padding_mask``: passed by ``TransformerLayer`` for MoE routing; a dense MLP is token-wise."""
        gate, _ = self.l1(hidden_states)  # s, b, F/T
        up, _ = self.l2(hidden_states)
        out, _ = self.l3(MLP_ACTIVATIONS[self.activation](gate) * up)  # s, b, h (summed over TP)
        return out, None


class QKVLinear(ColumnParallelLinear):
    """megatron's attention qkv projection with a bias exactly when ``config.add_qkv_bias``
    (see the module docstring); every other argument as megatron passes it."""

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, bias: bool, **kwargs: Any):
        super().__init__(input_size, output_size, config=config, bias=config.add_qkv_bias, **kwargs)
