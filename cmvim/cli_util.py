"""Shared bits of the command-line entry points."""
from __future__ import annotations

import sys


def not_yet(command: str, issue: int, what: str) -> int:
    """Say plainly that a command is not built yet, and exit with status 2."""
    print(f"{command}: {what} is not built yet (issue #{issue}). Nothing was done.", file=sys.stderr)
    return 2
