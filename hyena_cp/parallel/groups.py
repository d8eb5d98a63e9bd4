"""Process-group helpers shared by every collective in `hyena_cp.parallel`.

Convention for the whole package: a ``group`` argument of ``None`` means "one process,
no context parallelism" (unlike ``torch.distributed``, where ``None`` means WORLD), so
single-process code never needs an initialized process group.
"""
from __future__ import annotations

from torch.distributed import ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    """Number of ranks in ``group``; ``None`` counts as one process."""
    return 1 if group is None else group.size()


def group_rank(group: ProcessGroup | None) -> int:
    """This process's rank within ``group`` (not the global rank); ``None`` gives 0."""
    return 0 if group is None else group.rank()


def is_parallel(group: ProcessGroup | None) -> bool:
    """True when ``group`` spans more than one rank, i.e. communication is needed."""
    return group_size(group) > 1


def check_group(group, name: str = "cp_group") -> None:
    """Raise ``ValueError`` unless ``group`` is None (one process) or a ``ProcessGroup`` this
    process belongs to (``new_group`` hands non-members a sentinel, not a group)."""
    if group is not None and not isinstance(group, ProcessGroup):
        raise ValueError(f"{name} must be a torch.distributed ProcessGroup this process belongs to, or None for one "
                         f"process; got {group!r} ({type(group).__name__}). Pass the group object returned by "
                         f"torch.distributed.new_group / DeviceMesh.get_group on every rank of the group")
