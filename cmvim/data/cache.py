"""On-disk cache of preprocessed volumes, so later epochs and rounds never decode NIfTI/DICOM again.

An entry's key hashes the preprocessing config and, for every source file, its
path relative to the site folder, size and modification time (for a DICOM
folder: every file in it). A changed file or config is a different key, so a
stale entry is never read. A key starts with its config's fingerprint, so after a site is
loaded `prune` removes that config's entries no subject uses any more (files changed, rows
removed): the cache holds one entry per subject per preprocessing config, never a history.
Writes are atomic (temp file + rename): parallel simulated sites never see a
half-written entry.

The cache lives outside the site folder (`default_cache_dir`: under $CMVIM_CACHE or ~/.cache/cmvim,
folders 0700, files 0600): nothing is ever written into a hospital's data folder, which may be a
read-only export. `--cache-dir` (check, predict) or `cache_dir` puts it elsewhere.

Registrations (`spatial: template`) are cached beside them, one small JSON per visit keyed by
the bytes of its scans and the registration's settings (`transform_key`), so a run with other
model-grid or normalisation settings, or the same scans moved or renamed, registers nothing again.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np

CACHE_VERSION = "3"        # bump when the preprocessing code or the key changes meaning


def source_signature(path: Path, site_dir: Path) -> list:
    """(relative path, size, mtime_ns) of a file, or of every file in a DICOM folder."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    signature = []
    for file in files:
        stat = file.stat()
        signature.append((str(file.relative_to(site_dir)), stat.st_size, stat.st_mtime_ns))
    return signature


def content_digest(sources: Iterable[Path | None]) -> str:
    """SHA-256 over the bytes of every source file (every file of a DICOM folder, in name order):
    what a registration's result depends on, whatever the file's name, place or time."""
    digest = hashlib.sha256()
    for source in sources:
        if source is None:
            digest.update(b"\0none")
            continue
        files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
        for file in files:
            digest.update(f"\0{file.name if source.is_dir() else ''}\0".encode())
            with open(file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def transform_key(sources: Iterable[Path | None], registration_fingerprint: str, reading: str = "") -> str:
    """`tx-<registration settings>-<content>`: the key of a visit's cached transforms. `reading`:
    how the files are read beyond their bytes (a dynamic PET's frame weights)."""
    content = content_digest(sources) + (hashlib.sha256(reading.encode()).hexdigest() if reading else "")
    return f"tx-{registration_fingerprint[:12]}-{hashlib.sha256(content.encode()).hexdigest()[:32] if reading else content[:32]}"


def _prefix(config_fingerprint: str) -> str:
    return f"v{CACHE_VERSION}-{config_fingerprint[:12]}-"


def cache_key(sources: Iterable[Path | None], site_dir: Path, config_fingerprint: str, reading: str = "") -> str:
    """`v<version>-<config>-<sources>`: the config part lets `prune` tell a config's entries apart.
    `reading`: how the sources are read beyond their bytes (a dynamic PET's frame weights, from its
    sidecar and the run's window), so a changed sidecar or window is a different entry."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}:{config_fingerprint}:{reading}".encode())
    for source in sources:
        digest.update(repr(source_signature(source, site_dir) if source is not None else None).encode())
    return _prefix(config_fingerprint) + digest.hexdigest()[:32]


def cache_root() -> Path:
    """cmvim's per-user cache folder: $CMVIM_CACHE, else $XDG_CACHE_HOME/cmvim, else ~/.cache/cmvim
    (synthetic cohorts are cached under it too: simulations.cohort.cohort_cache_root)."""
    return Path(os.environ.get("CMVIM_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cmvim"))


def default_cache_dir(site_dir: Path) -> Path:
    """<cache root>/sites/<hash of the site folder's resolved path>: outside the site folder, which
    a hospital may well export read-only (a PACS export) and whose owner expects nothing written
    into it; one folder per site folder, so two sites never share entries."""
    tag = hashlib.sha256(str(Path(site_dir).resolve()).encode()).hexdigest()[:16]
    return cache_root() / "sites" / tag


class VolumeCache:
    """Preprocessed arrays per key, stored as float16 .npz (normalised intensities need no more)."""

    def __init__(self, root: Path):
        # preprocessed scans are patient data: the folders are the user's alone (0700), and entries
        # are 0600 (mkstemp's mode, kept by the rename)
        self.root = Path(root)
        missing = [p for p in (self.root, *self.root.parents) if not p.exists()]
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for folder in missing:        # mkdir's mode is masked by the umask; parents get the umask's
            folder.chmod(0o700)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.path(key)
        try:
            with np.load(path) as data:       # volumes as float32; byte arrays (a key's text) as they are
                return {name: data[name] if data[name].dtype == np.uint8 else data[name].astype(np.float32)
                        for name in data.files}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):      # a damaged entry is a miss, rebuilt by the caller
            path.unlink(missing_ok=True)
            return None

    def load_transforms(self, key: str) -> dict | None:
        """A visit's cached registration: {"mri": 4x4, "pet": 4x4 (when it has one)}, or None."""
        path = self.root / f"{key}.json"
        try:
            found = json.loads(path.read_text())
            return {modality: np.asarray(matrix, dtype=np.float64).reshape(4, 4) for modality, matrix in found.items()}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, AttributeError):     # damaged: a miss, registered again
            path.unlink(missing_ok=True)
            return None

    def save_transforms(self, key: str, transforms: dict[str, np.ndarray]) -> None:
        text = json.dumps({modality: np.asarray(m).tolist() for modality, m in transforms.items()})
        self._write(self.root / f"{key}.json", lambda fh: fh.write(text.encode()))

    def prune(self, config_fingerprint: str, keep: set[str], transforms: tuple[str, set[str]] | None = None) -> int:
        """Remove this config's entries whose key is not in `keep`, entries an older cache version
        wrote (never read again), and temp files a killed writer left over an hour ago. Entries
        of other preprocessing configs stay: another run may use them. `transforms`: (registration
        fingerprint, the transform keys in use): that registration's other transforms go too.
        Returns the files removed."""
        prefix, removed = _prefix(config_fingerprint), 0
        tx_prefix = f"tx-{transforms[0][:12]}-" if transforms else None
        now = time.time()
        for path in self.root.iterdir():
            name = path.name
            if name.endswith(".npz"):
                stale = (name.startswith(prefix) and name[:-4] not in keep) or not name.startswith(f"v{CACHE_VERSION}-")
            elif name.endswith(".json"):
                stale = tx_prefix is not None and name.startswith(tx_prefix) and name[:-5] not in transforms[1]
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
        # volumes as float16 (normalised intensities need no more), small values (QC measures) as float32
        self._write(self.path(key), lambda fh: np.savez(fh, **{
            name: a if isinstance(a, np.ndarray) and a.dtype == np.uint8 else
            np.asarray(a).astype(np.float16 if np.ndim(a) == 3 else np.float32) for name, a in arrays.items()}))

    def _write(self, path: Path, write) -> None:
        """Atomically: a temp file renamed into place."""
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
