"""On-disk cache of preprocessed volumes, so later epochs and rounds never decode NIfTI/DICOM again.

An entry's key hashes the preprocessing config and, for every source file, its
path relative to the site folder, size and modification time (for a DICOM
folder: every file in it). A changed file or config is a different key, so a
stale entry is never read; `prune` removes entries no subject uses any more.
Writes are atomic (temp file + rename): parallel simulated sites never see a
half-written entry.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

CACHE_VERSION = "1"        # bump when the preprocessing code changes meaning


def source_signature(path: Path, site_dir: Path) -> list:
    """(relative path, size, mtime_ns) of a file, or of every file in a DICOM folder."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    signature = []
    for file in files:
        stat = file.stat()
        signature.append((str(file.relative_to(site_dir)), stat.st_size, stat.st_mtime_ns))
    return signature


def cache_key(sources: Iterable[Path | None], site_dir: Path, config_fingerprint: str) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}:{config_fingerprint}".encode())
    for source in sources:
        digest.update(repr(source_signature(source, site_dir) if source is not None else None).encode())
    return digest.hexdigest()[:32]


def default_cache_dir(site_dir: Path) -> Path:
    """<site>/.cmvim_cache when the site folder is writable, else under ~/.cache/cmvim."""
    local = site_dir / ".cmvim_cache"
    if os.access(site_dir, os.W_OK):
        return local
    tag = hashlib.sha256(str(site_dir.resolve()).encode()).hexdigest()[:16]
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cmvim" / "sites" / tag


class VolumeCache:
    """Preprocessed arrays per key, stored as float16 .npz (normalised intensities need no more)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.path(key)
        try:
            with np.load(path) as data:
                return {name: data[name].astype(np.float32) for name in data.files}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):      # a damaged entry is a miss, rebuilt by the caller
            path.unlink(missing_ok=True)
            return None

    def save(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **{name: a.astype(np.float16) for name, a in arrays.items()})
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
