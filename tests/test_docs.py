"""The documentation's shape, without running anything: the README stays a front door (at most
250 lines, a Documentation list that links every page of docs/), every relative link and
anchor of README.md and docs/*.md resolves, the pages state facts rather than how the project
was made, nothing in the repository points at a file outside it, and LICENSE / CITATION.cff
agree with setup.py. (The commands and code blocks are run by test_readme_commands.py and
test_readme_snippets.py.)"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
import yaml

from doc_pages import PAGES, README, page_name, read
from train_helpers import ROOT

MAX_README_LINES = 250
# narration of the project's own making, not facts about it (dates and machines say when)
HISTORY = re.compile(r"\bsessions?\b|\b(?:was|were) lent\b|\bfinal code\b|\bpredates this\b", re.I)
# files that exist only where the project was made: never named in the repository (spelled in
# pieces so that this file does not name them itself)
OUTSIDE = re.compile("|".join(re.escape(s) for s in ("DESIGN" + ".md", "PLATFORM" + "_NOTES", "shared" + "/",
                                                      "/work" + "/")))
CODE_DIRS = ("hyena_cp", "tests", "launch", "configs", "docs", ".ci")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def without_code(text: str) -> str:
    """Markdown with fenced blocks and inline code removed (links inside code are not links)."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))


def anchor(heading: str) -> str:
    """The code host's (GitHub's) anchor of a heading: lower case, punctuation dropped, blanks to '-'."""
    text = re.sub(r"[`*_]", "", heading.strip()).lower()
    text = "".join(ch for ch in text if ch in " -" or unicodedata.category(ch)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(h) for h in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", read(page), flags=re.S), re.M)}


def test_readme_is_a_front_door():
    lines = read(README).splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail to docs/ (max {MAX_README_LINES})"
    tables = re.findall(r"(?:^\|.*\n)+", read(README), re.M)
    assert max(len(t.splitlines()) for t in tables) <= 14, "a long table belongs in docs/"


def test_the_documentation_list_links_every_page():
    text = read(README)
    section = text.split("## Documentation", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^- \[[^\]]+\]\((docs/[^)#]+\.md)\)", section, re.M))
    pages = {page_name(p) for p in PAGES if p != README}
    assert pages <= listed, f"README's Documentation list misses {sorted(pages - listed)}"
    assert listed <= pages, f"README's Documentation list names missing pages {sorted(listed - pages)}"


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_relative_links_and_anchors_resolve(page):
    for target in LINK.findall(without_code(read(page))):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page_name(page)}: link {target!r}: {linked} does not exist"
        if fragment:
            assert linked.suffix == ".md" and fragment in anchors(linked), \
                f"{page_name(page)}: link {target!r}: no heading with that anchor in {linked.name}"


def test_anchor_follows_the_code_host():
    assert anchor("`torch.compile` under CP") == "torchcompile-under-cp"
    assert anchor("Ranks that disagree: the agreement check") == "ranks-that-disagree-the-agreement-check"


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_pages_state_facts_not_history(page):
    found = [(n, line) for n, line in enumerate(read(page).splitlines(), 1) if HISTORY.search(line)]
    assert not found, f"{page_name(page)} narrates how the project was made: {found}"


def test_history_check_catches_the_phrases_it_is_for():
    for phrase in ("the final code of session 5", "This table predates this session's changes",
                   "No GPU was lent in sessions 4 and 5"):
        assert HISTORY.search(phrase), phrase
    assert not HISTORY.search("Measured 2026-12-01 on a 2-core VM")


def repository_texts() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "setup.py", ROOT / "CITATION.cff"]
    for folder in CODE_DIRS:
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".sh", ".txt", "")
                  and "__pycache__" not in p.parts]
    return files


def test_nothing_names_a_file_outside_the_repository():
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in repository_texts()
             for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if OUTSIDE.search(line)]
    assert not found, "names a file outside the repository:\n" + "\n".join(found)
    assert OUTSIDE.search("see " + "DESIGN" + ".md") and OUTSIDE.search("shared" + "/spec/x.txt")


def test_license_and_citation_agree_with_setup():
    setup = (ROOT / "setup.py").read_text()
    version = re.search(r'version="([^"]+)"', setup)[1]
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0"
    assert citation["version"] == version and citation["license"] == "Apache-2.0"
    assert citation["title"] and citation["authors"] == [{"name": "hyena_cp contributors"}]
    assert 'license="Apache-2.0"' in setup
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text and "Copyright 2026 hyena_cp contributors" in license_text
