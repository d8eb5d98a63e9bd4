"""`hyena_cp.ops.channels_last.channels_last`: the same values and gradients as a ``movedim`` view,
with both the output and the gradient handed back contiguous (what the mixer relies on for
speed)."""
from __future__ import annotations

import pytest
import torch

from hyena_cp.ops.channels_last import channels_last


@pytest.mark.parametrize("shape", [(2, 5, 7), (2, 5, 3, 4)])
def test_channels_last_equals_movedim_and_its_gradient_is_contiguous(shape):
    torch.manual_seed(0)
    y = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = channels_last(y)
    assert out.is_contiguous() and torch.equal(out, y.movedim(1, -1))
    grad = torch.randn_like(out)
    seen = []
    y.register_hook(lambda g: seen.append(g.is_contiguous()))
    (got,) = torch.autograd.grad(out, y, grad)
    assert seen == [True]  # the gradient reaching y is contiguous channels first
    (want,) = torch.autograd.grad(y.movedim(1, -1), y, grad)
    assert torch.equal(got, want) and seen == [True, False]  # the view's is not
    assert torch.autograd.gradcheck(channels_last, (y,))
