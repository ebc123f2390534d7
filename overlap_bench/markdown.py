"""GitHub markdown tables, written by hand (no tabulate dependency): one builder for every report."""

from __future__ import annotations

from typing import Any, Iterable


def cell(x: Any) -> str:
    """Text safe inside a markdown table cell (pipes and backslashes escaped, line breaks flattened)."""
    if isinstance(x, (list, tuple)):
        x = " ".join(str(v) for v in x)
    return str(x).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def table(header: list[str], rows: Iterable[list[str]], align: str | None = None) -> str:
    """A markdown table of already-escaped cells; ``align`` has one ``l`` or ``r`` per column (default all ``l``)."""
    align = align or "l" * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
