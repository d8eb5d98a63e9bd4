"""The command line every ``launch/*.py`` takes — a config file and ``key=value`` overrides — and how
a launcher reports a failure: once, in a few lines, by rank 0 (`run_launcher`).

A configuration or input mistake raises the same error on every rank before any collective (that is
what validation does), so printing it P times with P tracebacks, then torchrun's banner with
``error_file: <N/A>``, buries the one line that matters. `run_launcher` prints
``error: <message>`` on rank 0 only, exits with 1, and every rank records its own message in the
error file torchrun reads (``TORCHELASTIC_ERROR_FILE``), so the banner's "Root Cause" shows that
message, and a failure that happened on one rank only is still named there. torchrun stops every rank
as soon as one exits, so the other ranks wait (`PEER_GRACE_S`) for rank 0 to print and exit first. The
Python traceback is kept out of sight unless ``HYENA_CP_TRACEBACK=1``; errors that are not a user's
input (anything other than the exception types below) propagate with their traceback, as bugs should.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

from hyena_cp.lazy import ConfigKeyError

__all__ = ["config_args", "run_launcher", "check_launch", "USER_ERRORS"]

CONFIG_SUFFIXES = (".py", ".yaml", ".yml")
# what a user's config, overrides or inputs raise: a message, not a bug (the checkpoint and
# non-finite errors of the training loop are ValueError / RuntimeError subclasses named below)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, FileNotFoundError, ImportError, ConfigKeyError)
# Seconds a rank other than 0 waits after a user error before it exits: the same error is on its way
# on rank 0, and torchrun would otherwise stop rank 0 before it prints it. Ended early when rank 0
# exits (torchrun then stops this rank); only a failure on this rank alone costs the wait.
PEER_GRACE_S = 10.0


def config_args(argv: list[str] | None, usage: str) -> list[str] | None:
    """``[CONFIG, key=value, ...]`` from ``argv`` (``sys.argv[1:]`` when None), or None after
    printing ``usage`` to stderr when they are not that.

    Also silences megatron-core's "Transformer Engine and Apex are not installed" warning: it
    is said once per module on every rank, and on CPU it is expected and not actionable."""
    args = sys.argv[1:] if argv is None else argv
    if not args or not args[0].endswith(CONFIG_SUFFIXES) or any("=" not in a for a in args[1:]):
        print(usage, file=sys.stderr)
        return None
    config = Path(args[0])
    if not config.is_file():
        folder = config.parent if config.parent.is_dir() else Path("configs")
        known = sorted(p.name for p in folder.glob("*") if p.suffix in CONFIG_SUFFIXES) if folder.is_dir() else []
        raise FileNotFoundError(f"config {args[0]} does not exist; the configs in {folder}/ are: "
                                + (", ".join(known) if known else "(none)"))
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    return args


def _record_for_torchrun(error: BaseException, message: str) -> None:
    """Write ``message`` where torchrun looks for this process's failure (no-op outside torchrun)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    stack = traceback.format_exc() if os.environ.get("HYENA_CP_TRACEBACK") == "1" else \
        f"{message}\n(HYENA_CP_TRACEBACK=1 shows the Python traceback)"
    with open(path, "w") as f:
        json.dump({"message": {"message": message, "extraInfo": {"py_callstack": stack,
                                                                 "timestamp": str(int(time.time()))}}}, f)


def run_launcher(main: Callable[[], int]) -> int:
    """Run a launcher's ``main``; a user error (`USER_ERRORS`) becomes ``error: <message>`` printed by
    rank 0 alone, recorded for torchrun on every rank, and exit status 1 (module docstring)."""
    try:
        return main()
    except USER_ERRORS as error:
        message = f"{type(error).__name__}: {error}"
        _record_for_torchrun(error, message)
        if os.environ.get("HYENA_CP_TRACEBACK") == "1":
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {message}", file=sys.stderr, flush=True)
        else:
            time.sleep(PEER_GRACE_S)
        return 1


def check_launch(argv: list[str], world: int) -> str:
    """What a cluster script checks before it starts ``world`` processes: the config exists and loads,
    its overrides name existing keys with values of the right type, and ``parallel.cp x parallel.tp``
    divides ``world``. Returns a one-line summary of the layout; raises a user error otherwise."""
    from omegaconf import OmegaConf

    from hyena_cp.lazy import LazyConfig
    from hyena_cp.distributed.mesh import ParallelDims
    from hyena_cp.train.config import ParallelConfig, with_defaults

    args = config_args(argv, "usage: ... CONFIG.py [key=value ...]")
    if args is None:
        raise ValueError("expected a config file and key=value overrides")
    cfg = LazyConfig.apply_overrides(with_defaults(LazyConfig.load(args[0])), args[1:])
    parallel = ParallelConfig(**OmegaConf.to_container(cfg.parallel, resolve=True))
    dims = ParallelDims(world=world, cp=parallel.cp, tp=parallel.tp)
    return f"{args[0]}: world {world} = dp {dims.dp} x cp {dims.cp} x tp {dims.tp}"


if __name__ == "__main__":  # python -m hyena_cp.train.cli WORLD CONFIG.py [key=value ...] (launch/slurm.sh)
    def _check() -> int:
        print(check_launch(sys.argv[2:], int(sys.argv[1])), file=sys.stderr)
        return 0

    sys.exit(run_launcher(_check))
