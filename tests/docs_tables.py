"""Numbers as docs/ prints them: the lines of a pasted output block, the cells of a table row."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def block_after(doc: str, marker: str) -> list[str]:
    """The lines of the first fenced block after the line holding ``marker``."""
    lines = (DOCS / doc).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    opening = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    closing = next(i for i in range(opening + 1, len(lines)) if lines[i].startswith("```"))
    return lines[opening + 1 : closing]


def row(doc: str, label: str) -> list[str]:
    """The cells after the first cell of the table row whose first cell starts with ``label``."""
    for line in (DOCS / doc).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(label):
            return cells[1:]
    raise AssertionError(f"no table row {label!r} in docs/{doc}")
