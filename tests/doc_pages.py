"""The documentation pages the doc tests read: README.md and docs/*.md, with their fenced blocks.

Identical commands and code blocks on several pages count once (the first page that shows them
names them), so a page may repeat the README without making the suite run anything twice."""
from __future__ import annotations

import re
from pathlib import Path

from train_helpers import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# a whole script shown in the docs: its first line names it and the command that runs it
SCRIPT_HEADER = re.compile(r"# (?P<name>[\w-]+\.py): (?P<command>torchrun .+)")


def page_name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def read(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def python_blocks() -> dict[str, str]:
    """Every ``python`` block of the pages, each once: code -> the page that shows it first."""
    blocks: dict[str, str] = {}
    for page in PAGES:
        for code in fenced_blocks(read(page), "python"):
            blocks.setdefault(code, page_name(page))
    return blocks


def script_blocks() -> dict[str, tuple[str, str]]:
    """The python blocks that are whole scripts: file name -> (the torchrun command in their first
    line, code). The reader saves one under its name and runs the command."""
    scripts = {}
    for code in python_blocks():
        header = SCRIPT_HEADER.fullmatch(code.splitlines()[0])
        if header:
            scripts[header["name"]] = (header["command"], code)
    return scripts
