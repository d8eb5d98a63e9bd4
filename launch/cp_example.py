"""Minimal context-parallel Hyena: shard, mix, gather, and check against one process.

    torchrun --standalone --nproc_per_node=2 launch/cp_example.py

Every rank builds the same mixer (same seed) and the same global input, keeps its own
shard (1-D: zigzag chunks; 2-D: a block of grid rows), runs forward + backward with
``cp_group``, and compares the gathered output and the CP-summed gradients with a
single-process run of the same model.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from hyena_cp import Hyena, QKVSequenceMixer
from hyena_cp.distributed import exit_process
from hyena_cp.host_memory import tune_host_memory
from hyena_cp.parallel import all_gather_seq, from_rank_major, group_sum, shard


def check(spatial_dims: int, shape: tuple[int, ...], group: dist.ProcessGroup) -> None:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    layout = "zigzag" if spatial_dims == 1 else "rows"
    torch.manual_seed(0)
    mixer = QKVSequenceMixer(hidden_dim=shape[-1], hyena=Hyena(hidden_dim=shape[-1], num_heads=world,
                                                               spatial_dims=spatial_dims))
    x = torch.randn(shape)

    x_local = shard(x, 1, layout, world, rank).requires_grad_(True)  # this rank's tokens
    y_local = mixer(x_local, cp_group=group)
    y_local.square().sum().backward()  # each rank's loss is its share of the global loss
    grads = group_sum(torch.cat([p.grad.flatten() for p in mixer.parameters()]), group)  # summed over CP
    y = from_rank_major(all_gather_seq(y_local.detach(), 1, group), 1, layout, world)  # global output
    if rank == 0:
        mixer.zero_grad()
        y_ref = mixer(x)  # the single-process run
        y_ref.square().sum().backward()
        ref_grads = torch.cat([p.grad.flatten() for p in mixer.parameters()])
        out_err = (y - y_ref).abs().max().item()
        grad_err = ((grads - ref_grads).norm() / ref_grads.norm()).item()
        print(f"{spatial_dims}-D {tuple(shape)} on {world} ranks: max |y_cp - y| = {out_err:.2e}, "
              f"relative grad error = {grad_err:.2e}")


def main() -> None:
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    world = dist.get_world_size()
    check(1, (2, 64 * world, 16 * world), group)  # [B, L, C]: causal sequence
    check(2, (2, 8 * world, 12, 16 * world), group)  # [B, H, W, C]: image grid
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    tune_host_memory()  # before the first large CPU tensor: huge pages, freed memory kept (hyena_cp.host_memory)
    main()
    exit_process(0)  # skips the interpreter's C++ teardown, which can abort a finished gloo worker
