"""setup.py's torch floor against the ``torch.distributed`` APIs the code uses.

What this proves: (1) every API of `NEWER` (the ones added after torch 2.5, and the private
ones) exists, with the keyword arguments the code passes, in the torch running the tests;
(2) setup.py's floor is the newest version `NEWER` records; (3) every ``torch.distributed``
name that ``hyena_cp/`` and ``launch/`` import or reach as ``dist.<name>`` (an ``ast`` scan)
is recorded, in `NEWER` or in `OLD` (present in torch 2.5 and before), so a new API cannot
come in without someone recording its version. What it does not prove: that the recorded
versions are right (they come from PyTorch's pull requests and release dates, noted per
entry), nor that the code runs on the floor release: CI installs one torch (2.13), and
methods reached through objects (``mesh._flatten``) are listed by hand, not found by the scan.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import re

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from train_helpers import ROOT

# name -> (first release, source); a check of each below
NEWER = {
    "torch.distributed._composable.replicate_with_fsdp.replicate":
        ((2, 10), "FSDP2's replicate: pytorch#158207 (Jul 2025), 1-D mesh form #166433 (Nov 2025)"),
    "torch.distributed._composable.replicate_with_fsdp.ReplicateModule": ((2, 10), "pytorch#163888 (Sep 2025)"),
    "FSDPModule.set_force_sum_reduction_for_comms": ((2, 8), "pytorch#155915 (Jun 2025)"),
    "fully_shard(shard_placement_fn=)": ((2, 6), "FSDP2 per-parameter shard dims"),
    "torch.distributed.fsdp.fully_shard": ((2, 6), "FSDP2's public path (was torch.distributed._composable.fsdp)"),
    "torch.distributed.fsdp.FSDPModule": ((2, 6), "as fully_shard"),
    "torch.distributed.fsdp.MixedPrecisionPolicy": ((2, 6), "as fully_shard"),
    "P2POp(group_peer=)": ((2, 6), "group-relative peers"),
    "broadcast(group_src=)": ((2, 6), "group-relative peers"),
    "reduce(group_dst=)": ((2, 6), "group-relative peers"),
    "torch.nn.utils.get_total_norm": ((2, 6), "split out of clip_grad_norm_"),
    "DeviceMesh._flatten": ((2, 5), "private (by 2.5): the flattened dp_cp dimension"),
    "DeviceMesh.from_group(mesh=)": ((2, 5), "n-D meshes from existing groups (by 2.5)"),
    "torch.distributed.distributed_c10d._set_pg_timeout": ((2, 5), "private (by 2.5): mesh groups' timeouts"),
    "torch.distributed.distributed_c10d._get_default_store": ((2, 5), "private (before 2.5): the heartbeat's store"),
    "torch.distributed.distributed_c10d._resolve_process_group":
        ((2, 5), "private (by 2.5, what the functional collectives use): a group from its name in a custom op"),
}
OLD = {f"torch.distributed.{n}" for n in (
    "DistError HashStore P2POp PrefixStore ProcessGroup ReduceOp Store TCPStore all_gather_into_tensor all_reduce "
    "all_to_all_single barrier batch_isend_irecv broadcast destroy_process_group distributed_c10d get_backend "
    "get_process_group_ranks get_rank get_world_size group init_process_group irecv is_initialized isend reduce "
    "reduce_scatter_tensor checkpoint.FileSystemReader checkpoint.load checkpoint.save "
    "checkpoint.metadata.TensorStorageMetadata checkpoint.state_dict.StateDictOptions "
    "checkpoint.state_dict.get_state_dict checkpoint.state_dict.set_model_state_dict "
    "checkpoint.state_dict.set_optimizer_state_dict checkpoint.state_dict.set_state_dict device_mesh.DeviceMesh "
    "device_mesh.init_device_mesh tensor.DTensor tensor.Replicate tensor.Shard").split()}


def _has_kwarg(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _resolve(dotted: str):
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


CHECKS = {
    "FSDPModule.set_force_sum_reduction_for_comms": lambda: hasattr(FSDPModule, "set_force_sum_reduction_for_comms"),
    "fully_shard(shard_placement_fn=)": lambda: _has_kwarg(fully_shard, "shard_placement_fn"),
    "P2POp(group_peer=)": lambda: _has_kwarg(dist.P2POp.__init__, "group_peer"),
    "broadcast(group_src=)": lambda: _has_kwarg(dist.broadcast, "group_src"),
    "reduce(group_dst=)": lambda: _has_kwarg(dist.reduce, "group_dst"),
    "DeviceMesh._flatten": lambda: hasattr(DeviceMesh, "_flatten"),
    "DeviceMesh.from_group(mesh=)": lambda: _has_kwarg(DeviceMesh.from_group, "mesh"),
}


def _floor() -> tuple[int, int]:
    match = re.search(r'"torch>=(\d+)\.(\d+)"', (ROOT / "setup.py").read_text())
    assert match, "setup.py must pin a torch floor as torch>=X.Y"
    return int(match.group(1)), int(match.group(2))


def _used_names() -> set[str]:
    """``torch.distributed`` names imported (``from torch.distributed... import X``) or reached as
    ``<alias>.X`` / ``<alias>.distributed_c10d.X`` of an imported ``torch.distributed`` module."""
    used: set[str] = set()
    for path in [*ROOT.glob("hyena_cp/**/*.py"), *ROOT.glob("launch/*.py")]:
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({a.asname or a.name: a.name for a in node.names
                                if a.name.startswith("torch.distributed")})
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
                used.update(f"{node.module}.{a.name}" for a in node.names)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in aliases:
                used.add(f"{aliases[base.id]}.{node.attr}")
            elif isinstance(base, ast.Attribute) and base.attr == "distributed_c10d" and \
                    isinstance(base.value, ast.Name) and base.value.id in aliases:
                used.add(f"{aliases[base.value.id]}.{base.attr}.{node.attr}")
    return used


def test_every_newer_api_exists_in_this_torch():
    missing = [name for name in NEWER if not (CHECKS[name]() if name in CHECKS else callable(_resolve(name)))]
    assert not missing, f"torch {torch.__version__} lacks {missing}"


def test_setup_py_floor_is_the_newest_recorded_api():
    newest = max(version for version, _ in NEWER.values())
    assert _floor() == newest, f"setup.py says torch>={_floor()}, the newest API used needs {newest}: " + \
        ", ".join(n for n, (v, _) in NEWER.items() if v == newest)


def test_every_distributed_name_the_code_uses_is_recorded():
    unrecorded = sorted(n for n in _used_names() if n not in NEWER and n not in OLD)
    assert not unrecorded, f"record the torch version of {unrecorded} in NEWER (or OLD if in torch 2.5)"
