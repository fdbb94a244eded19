"""Files that survive a crash, a power cut or a full disk: written to a temporary sibling (0600),
fsynced, renamed over the old file, the folder fsynced. A reader sees the old file or the new
one, never half of one. The privacy ledger, the release log, the server's checkpoints and a
site's personalised weights are written this way."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomic(path: Path, write: Callable[[BinaryIO], object], mode: int = 0o600) -> None:
    """`write(file)` into a temporary sibling, fsync it, rename it over `path`, fsync the folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)                        # the rename itself survives a power cut
    finally:
        os.close(folder)
