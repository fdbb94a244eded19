"""Progress bars for the commands a person watches (tqdm, on stderr).

A bar draws only on a terminal: `disable=None` is tqdm's "off when stderr is not a TTY", so a
log file, a CI job, a SuperNode's captured output or a Ray worker gets no bar lines at all. The
ClientApp never asks for one. TQDM_DISABLE=1 turns them off on a terminal too (read here: tqdm's
own reading of it yields to the explicit `disable`).
"""
from __future__ import annotations

import os
import sys

from tqdm import tqdm


def progress_bar(total: int, desc: str, unit: str, leave: bool = False) -> tqdm:
    """A bar over `total` units; a no-op object when stderr is not a terminal."""
    off = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=True if off else None, leave=leave,
                dynamic_ncols=True)
