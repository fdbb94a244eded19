"""Plain-text tables a person can read in a terminal (and paste into markdown)."""
from __future__ import annotations

import math
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


def mean_sd(values: Sequence[float], sign: str = "") -> str:
    """'mean ± SD (SD)' of the finite values (sample SD), the value alone for one, 'n/a' for none:
    how a benchmark table states a spread, labelled. `sign`: "+" writes the sign of the mean."""
    xs = [float(x) for x in values if math.isfinite(x)]
    if not xs:
        return "n/a"
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{mean:{sign}.3f}"
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return f"{mean:{sign}.3f} ± {sd:.3f} (SD)"


def ci_text(pair: Sequence[float], sign: str = "") -> str:
    """'[low, high]' of a confidence interval to 2 decimals, 'n/a' where it is undefined."""
    return f"[{pair[0]:{sign}.2f}, {pair[1]:{sign}.2f}]" if all(math.isfinite(v) for v in pair) else "n/a"
