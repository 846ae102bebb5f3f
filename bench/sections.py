"""BENCHMARKS.md is written by several bench scripts: each owns a section between its own markers."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def write_section(section: str, begin: str, end: str, path: Path = BENCHMARKS) -> None:
    """``section`` (which starts with ``begin`` and ends with ``end``) in place of the old one
    between those markers, or appended when there is none; the rest of the file stays."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + section + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + section + "\n"
    path.write_text(new)
