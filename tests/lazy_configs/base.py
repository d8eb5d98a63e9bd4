"""Fixture base config for tests/test_lazy.py."""
import torch
from torch import nn

from hyena_cp.lazy import LazyCall

model = LazyCall(nn.Sequential)(
    LazyCall(nn.Linear)(in_features=4, out_features=8, dtype=torch.float64),
    LazyCall(nn.GELU)(),
    LazyCall(nn.Linear)(in_features=8, out_features=2, dtype=torch.float64),
)
train = dict(lr=3e-4, steps=10, name="digits", dims=[1, 2], norm=None)
_private = dict(hidden=True)
not_a_dict = 5
