"""The command line every ``launch/*.py`` takes: a config file and ``key=value`` overrides."""
from __future__ import annotations

import sys
import warnings

__all__ = ["config_args"]

CONFIG_SUFFIXES = (".py", ".yaml", ".yml")


def config_args(argv: list[str] | None, usage: str) -> list[str] | None:
    """``[CONFIG, key=value, ...]`` from ``argv`` (``sys.argv[1:]`` when None), or None after
    printing ``usage`` to stderr when they are not that.

    Also silences megatron-core's "Transformer Engine and Apex are not installed" warning: it
    is said once per module on every rank, and on CPU it is expected and not actionable."""
    args = sys.argv[1:] if argv is None else argv
    if not args or not args[0].endswith(CONFIG_SUFFIXES) or any("=" not in a for a in args[1:]):
        print(usage, file=sys.stderr)
        return None
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    return args
