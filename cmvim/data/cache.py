"""On-disk cache of preprocessed volumes, so later epochs and rounds never decode NIfTI/DICOM again.

An entry's key hashes the preprocessing config and, for every source file, its
path relative to the site folder, size and modification time (for a DICOM
folder: every file in it). A changed file or config is a different key, so a
stale entry is never read. A key starts with its config's fingerprint, so after a site is
loaded `prune` removes that config's entries no subject uses any more (files changed, rows
removed): the cache holds one entry per subject per preprocessing config, never a history.
Writes are atomic (temp file + rename): parallel simulated sites never see a
half-written entry.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np

CACHE_VERSION = "2"        # bump when the preprocessing code or the key changes meaning


def source_signature(path: Path, site_dir: Path) -> list:
    """(relative path, size, mtime_ns) of a file, or of every file in a DICOM folder."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    signature = []
    for file in files:
        stat = file.stat()
        signature.append((str(file.relative_to(site_dir)), stat.st_size, stat.st_mtime_ns))
    return signature


def _prefix(config_fingerprint: str) -> str:
    return f"v{CACHE_VERSION}-{config_fingerprint[:12]}-"


def cache_key(sources: Iterable[Path | None], site_dir: Path, config_fingerprint: str) -> str:
    """`v<version>-<config>-<sources>`: the config part lets `prune` tell a config's entries apart."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}:{config_fingerprint}".encode())
    for source in sources:
        digest.update(repr(source_signature(source, site_dir) if source is not None else None).encode())
    return _prefix(config_fingerprint) + digest.hexdigest()[:32]


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

    def prune(self, config_fingerprint: str, keep: set[str]) -> int:
        """Remove this config's entries whose key is not in `keep`, entries an older cache version
        wrote (never read again), and temp files a killed writer left over an hour ago. Entries
        of other preprocessing configs stay: another run may use them. Returns the files removed."""
        prefix, removed = _prefix(config_fingerprint), 0
        now = time.time()
        for path in self.root.iterdir():
            name = path.name
            if name.endswith(".npz"):
                stale = (name.startswith(prefix) and name[:-4] not in keep) or not name.startswith(f"v{CACHE_VERSION}-")
            else:
                try:
                    stale = name.endswith(".tmp") and now - path.stat().st_mtime > 3600
                except FileNotFoundError:           # a writer renamed it meanwhile
                    continue
            if stale:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def save(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **{name: a.astype(np.float16) for name, a in arrays.items()})
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
