"""torch.distributed's tensor-in/tensor-out collectives under the names of the installed torch
(2.13 renamed them; the old names warn there)."""
from __future__ import annotations

import torch.distributed as dist

__all__ = ["all_gather_tensor", "reduce_scatter_tensor"]

all_gather_tensor = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
