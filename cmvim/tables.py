"""Plain-text tables a person can read in a terminal (and paste into markdown)."""
from __future__ import annotations

from typing import Sequence

MARKDOWN_MIN_WIDTH = 3       # GitHub renders a table only if each separator cell has a dash: `---`, `--:`


def format_table(headers: Sequence[str], rows: Sequence[Sequence], markdown: bool = True) -> str:
    """Columns padded to their widest cell; numbers right-aligned. markdown=True: a GitHub table
    (| separators, a `| --- | --: |` row with one cell per header, '|' in a cell escaped)."""
    cells = [[_cell(v, markdown) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if markdown:
        widths = [max(w, MARKDOWN_MIN_WIDTH) for w in widths]
    numeric = [all(_is_number(r[i]) for r in rows) and rows for i in range(len(headers))]

    def line(values, header=False):
        parts = [(v.rjust(w) if numeric[i] and not header else v.ljust(w))
                 for i, (v, w) in enumerate(zip(values, widths))]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    out = [line(headers, header=True)]
    if markdown:
        out.append("| " + " | ".join(("-" * (w - 1) + ":") if numeric[i] else "-" * w
                                     for i, w in enumerate(widths)) + " |")
    else:
        out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in cells]
    return "\n".join(out)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value, markdown: bool = False) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    text = "" if value is None else str(value)
    return text.replace("|", "\\|") if markdown else text
