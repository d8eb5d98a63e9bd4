"""Markdown tables and PNG plots (matplotlib, Agg backend) for the benchmark report."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from hyena_cp.bench.common import Section, Table

__all__ = ["table_markdown", "section_markdown", "write_report", "line_plot", "bar_plot"]


def _cell(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x).replace("|", "\\|")


def table_markdown(table: Table) -> str:
    lines = [f"**{table.title}**", "", "| " + " | ".join(table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    lines += [""] + [f"_{note}_" for note in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def section_markdown(section: Section) -> str:
    parts = [f"## {section.title}\n"]
    parts += [table_markdown(t) for t in section.tables]
    parts += [f"![{Path(p).stem}]({p})\n" for p in section.plots]
    parts += [f"- {note}" for note in section.notes]
    return "\n".join(parts).rstrip() + "\n"


def write_report(out: Path, header: Sequence[str], sections: Sequence[Section]) -> Path:
    """``out/bench.md`` (header lines, then every section) and ``out/bench.json`` (raw data)."""
    out.mkdir(parents=True, exist_ok=True)
    text = "# hyena_cp benchmarks\n\n" + "\n".join(header) + "\n\n" + "\n".join(section_markdown(s) for s in sections)
    path = out / "bench.md"
    path.write_text(text)
    raw = {s.title: s.data for s in sections}
    (out / "bench.json").write_text(json.dumps(raw, indent=1, default=str))
    return path


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def line_plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list[float], list[float]]],
              *, logx: bool = True, logy: bool = True) -> str:
    """One PNG with a line per series ``{name: (xs, ys)}``; returns the file name."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def bar_plot(path: Path, title: str, ylabel: str, groups: list[str], bars: dict[str, list[float]]) -> str:
    """Grouped bars: one group per entry of ``groups``, one bar per ``bars`` key."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    width = 0.8 / max(len(bars), 1)
    for i, (name, values) in enumerate(bars.items()):
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)  # below: bars fill the axes
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name
