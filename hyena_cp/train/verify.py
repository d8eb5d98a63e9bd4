"""Checksums of checkpoint folders, and the choice of the newest one that verifies.

A committed checkpoint folder ``step_N/`` holds ``checksums.json``: the size and SHA-256 of
every other file of the folder (DCP's shards and ``.metadata``, ``meta.json``), recorded when
the checkpoint is saved (`hyena_cp.train.checkpoint.Checkpointer.save`) and checked before it
is loaded (`verify_folder`). A bit flip (same size), a truncated or grown file, a missing file
(``.metadata``, ``meta.json``, a shard) or a missing or unreadable ``checksums.json`` each make
the folder fail, with a sentence saying which file and what is wrong.

Trust model: the checksums detect ACCIDENTAL corruption (disk and network errors, partial
copies, truncation by a full disk, an interrupted ``rsync``), not tampering: anyone who can
write a file of the folder can rewrite ``checksums.json`` to match. A checkpoint stays as
trusted as code (see "Trust model" in `hyena_cp.train.checkpoint`).

`newest_verified` is the choice every reader of a run folder makes: the checkpoint the
``latest`` pointer names if it verifies, else the newest ``step_N`` folder that does, with
what was wrong with every folder it looked at on the way. Only folders named exactly as
checkpoints are saved, ``step_<8 or more digits>``, are candidates; ``*.tmp`` (saves in progress) and folders set aside
(`set_aside`: ``step_N.unverified-K``, ``step_N.replaced-K``) are not.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CHECKSUMS", "LATEST", "Choice", "digest_files", "newest_verified", "read_pointer", "set_aside",
           "step_folders", "verify_folder", "write_checksums"]

CHECKSUMS = "checksums.json"
LATEST = "latest"
META = "meta.json"
REQUIRED = (".metadata", META)  # what every checkpoint has besides its shards (DCP's index, ours)
_STEP = re.compile(r"step_(\d{8,})")  # the names `Checkpointer.path` gives
_HASH_THREADS = 8  # hashlib releases the GIL: files hash in parallel (I/O and SHA-256 overlap)


def _digest(path: Path) -> dict[str, int | str]:
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": sha}


def digest_files(folder: Path, names: list[str]) -> dict[str, dict[str, int | str]]:
    """``{name: {"bytes", "sha256"}}`` of the files ``names`` of ``folder``, hashed in parallel."""
    with ThreadPoolExecutor(max_workers=max(1, min(_HASH_THREADS, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda n: _digest(folder / n), names)))


def write_checksums(folder: Path, digests: dict[str, dict[str, int | str]]) -> None:
    """Write ``checksums.json`` (the caller makes the folder durable and commits it)."""
    text = json.dumps({"algorithm": "sha256", "files": dict(sorted(digests.items()))}, indent=1) + "\n"
    with open(folder / CHECKSUMS, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _recorded(folder: Path) -> tuple[dict[str, dict], str | None]:
    """The file records of ``checksums.json``, or what is wrong with it."""
    path = folder / CHECKSUMS
    if not path.is_file():
        return {}, f"{CHECKSUMS} is missing (the folder is incomplete, or was not written by a committed save)"
    try:
        files = json.loads(path.read_bytes().decode("utf-8"))["files"]
        if not all(isinstance(r["bytes"], int) and isinstance(r["sha256"], str) for r in files.values()):
            raise ValueError("a record without bytes or sha256")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return {}, f"{CHECKSUMS} is unreadable ({type(e).__name__}: {e})"
    return files, None


def verify_folder(folder: str | os.PathLike[str]) -> str | None:
    """What is wrong with checkpoint ``folder`` (None: every recorded file has its recorded size
    and SHA-256, and DCP's ``.metadata`` and our ``meta.json`` are among them). Reads every file."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it is not a folder"
    problems = [f"{n} is missing" for n in REQUIRED if not (folder / n).is_file()]
    files, problem = _recorded(folder)
    if problem is not None:
        return "; ".join([*problems, problem])
    problems += [f"{n} is missing" for n in files if n not in REQUIRED and not (folder / n).is_file()]
    problems += [f"{n} is not in {CHECKSUMS}" for n in REQUIRED if n not in files and (folder / n).is_file()]
    present = [n for n in files if (folder / n).is_file()]
    try:
        actual = digest_files(folder, present)
    except OSError as e:
        return "; ".join([*problems, f"a file cannot be read ({e})"])
    for name in present:
        want, got = files[name], actual[name]
        if got["bytes"] < want["bytes"]:
            problems.append(f"{name} is truncated ({got['bytes']} of {want['bytes']} bytes)")
        elif got["bytes"] != want["bytes"]:
            problems.append(f"{name} has {got['bytes']} bytes, {want['bytes']} recorded")
        elif got["sha256"] != want["sha256"]:
            problems.append(f"{name} is corrupt (its SHA-256 differs from the recorded one; same size)")
    return "; ".join(problems) or None


def read_pointer(root: Path) -> tuple[str | None, str | None]:
    """The checkpoint name in ``root/latest`` and what is wrong with the pointer (None, None: no
    pointer). A name is returned only if it is a ``step_N`` folder name that exists."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None, None
    raw = pointer.read_bytes()
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"{pointer} is not UTF-8 text ({len(raw)} bytes, starting {raw[:16]!r})"
    if not _STEP.fullmatch(name):
        return None, f"{pointer} does not name a checkpoint folder (it holds {name[:60]!r}, not step_<N>)"
    if not (root / name).is_dir():
        return None, f"{pointer} names {name}, which does not exist"
    return name, None


def step_folders(root: Path) -> list[Path]:
    """The candidate checkpoint folders ``step_<N>`` under ``root``, oldest first (by step)."""
    found = [p for p in root.iterdir() if p.is_dir() and _STEP.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


@dataclass
class Choice:
    """What `newest_verified` found: the chosen folder's name (None: none verified), what was
    wrong with each folder it rejected on the way (newest first) and with the pointer."""

    chosen: str | None = None
    rejected: dict[str, str] = field(default_factory=dict)
    pointer_problem: str | None = None

    def to_json(self) -> str:
        return json.dumps({"chosen": self.chosen, "rejected": self.rejected, "pointer_problem": self.pointer_problem})

    @classmethod
    def from_json(cls, text: str) -> Choice:
        return cls(**json.loads(text))


def newest_verified(root: str | os.PathLike[str]) -> Choice:
    """The checkpoint under ``root`` to read: the pointer's if it verifies, else the newest
    ``step_N`` folder that verifies. Verifies (reads) each folder it tries, newest first, and
    stops at the first that verifies; moves nothing."""
    root = Path(root)
    name, pointer_problem = read_pointer(root)
    choice = Choice(pointer_problem=pointer_problem)
    order = [name] if name else []
    order += [p.name for p in reversed(step_folders(root)) if p.name != name]
    for candidate in order:
        problem = verify_folder(root / candidate)
        if problem is None:
            choice.chosen = candidate
            break
        choice.rejected[candidate] = problem
    return choice


def set_aside(folder: Path, why: str) -> Path:
    """Rename ``folder`` to ``<name>.<why>-<k>`` (the first free k), so it is neither read, nor
    rotated away, nor overwritten by a new save of its step; returns the new path."""
    k = 1
    while (target := folder.with_name(f"{folder.name}.{why}-{k}")).exists():
        k += 1
    os.rename(folder, target)
    return target
