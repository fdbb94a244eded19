"""manifest.csv: one row per subject-visit (the site data contract, docs/architecture.md).

Header problems (a required column missing, an empty file) are fatal: the
whole manifest raises. Row problems (a duplicate subject, an unknown label, a
missing file, a path escaping the site folder, a symlink loop, a DICOM folder holding
a link out of the site folder) cost that row only; they are collected in
`Manifest.problems`, every one with its row number and column.

The rest reads a site through cmvim.data.folder.read_site_folder: this manifest.csv, or the
BIDS dataset the folder is (cmvim.data.bids, which builds on this module), as the same entries.
"""
from __future__ import annotations

import csv
import difflib
import io
from dataclasses import dataclass, field
from pathlib import Path

from ..names import LABELS, SPLITS
from .errors import DataError
from .pet import PetReading

REQUIRED = ("subject_id", "mri")
OPTIONAL = ("pet", "report", "label", "split", "visit")
MODALITY_COLUMNS = ("mri", "pet")


@dataclass(frozen=True)
class ManifestEntry:
    row: int                       # line number in manifest.csv (the header is row 1); BIDS: the visit's number
    subject_id: str
    visit: str                     # "" when the manifest has no visit column
    mri: Path
    pet: Path | None
    report: Path | None
    label: str | None              # CN / MCI / AD, None = unlabeled
    split: str | None              # train / val / test, None = assigned by the seeded rule
    pet_reading: PetReading | None = None   # BIDS: the PET's tracer, units and frame weights (its sidecar)


@dataclass
class Manifest:
    site_dir: Path
    entries: list[ManifestEntry]
    problems: list[DataError] = field(default_factory=list)    # rows skipped, with why
    warnings: list[str] = field(default_factory=list)          # e.g. unused columns that look like typos
    format: str = "manifest.csv"                               # or "BIDS dataset" (cmvim.data.bids)
    path: Path | None = None                                   # the table rows come from: manifest.csv, participants.tsv


def read_manifest(site_dir: str | Path, check_files: bool = True) -> Manifest:
    site_dir = Path(site_dir)
    path = site_dir / "manifest.csv"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("no manifest.csv in the site folder", file=path, kind="missing manifest") from None
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror})", file=path, kind="unreadable file") from None
    try:
        text = raw.decode("utf-8-sig")           # tolerates a BOM
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = [r for r in reader]
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise DataError("empty manifest: a header row is required", file=path, kind="bad manifest")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        hints = []
        for column in missing:
            close = difflib.get_close_matches(column, header, n=1)
            hints.append(f"{column!r}" + (f" (found {close[0]!r}: a typo?)" if close else ""))
        raise DataError(f"required column(s) missing: {', '.join(hints)}; header is {rows[0]}",
                        file=path, row=1, kind="bad manifest")
    duplicated = sorted({h for h in header if h and header.count(h) > 1})
    if duplicated:
        raise DataError(f"column(s) appear more than once: {', '.join(duplicated)}", file=path, row=1,
                        kind="bad manifest")
    manifest = Manifest(site_dir=site_dir, entries=[], path=path)
    known = set(REQUIRED) | set(OPTIONAL)
    for column in header:
        if column and column not in known:
            close = difflib.get_close_matches(column, list(known), n=1, cutoff=0.75)
            if close:
                manifest.warnings.append(f"column {column!r} is not used; did you mean {close[0]!r}?")
    index = {name: i for i, name in enumerate(header)}
    seen: dict[tuple[str, str], int] = {}
    site_root = site_dir.resolve()
    for line_no, cells in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in cells):
            continue                                       # blank lines are not rows
        values = {name: (cells[i].strip() if i < len(cells) else "") for name, i in index.items()}
        try:
            entry = _parse_row(values, line_no, site_dir, site_root, path, check_files)
        except DataError as err:
            manifest.problems.append(err)
            continue
        key = (entry.subject_id, entry.visit)
        if key in seen:
            what = f"subject_id {entry.subject_id!r}" + (f" visit {entry.visit!r}" if entry.visit else "")
            manifest.problems.append(DataError(
                f"duplicate {what}: already on row {seen[key]}"
                + ("" if "visit" in index else "; add a 'visit' column for several visits of one subject"),
                file=path, row=line_no, column="subject_id", subject=entry.subject_id, kind="duplicate subject"))
            continue
        seen[key] = line_no
        manifest.entries.append(entry)
    return manifest


def _parse_row(values: dict[str, str], row: int, site_dir: Path, site_root: Path, manifest_path: Path,
               check_files: bool) -> ManifestEntry:
    subject = values.get("subject_id", "")

    def fail(column: str, problem: str, kind: str) -> DataError:
        return DataError(problem, file=manifest_path, row=row, column=column, subject=subject or None, kind=kind)

    if not subject:
        raise fail("subject_id", "empty subject_id", "bad manifest")
    if not values.get("mri"):
        raise fail("mri", "empty mri path: every subject needs a T1 MRI", "bad manifest")
    paths: dict[str, Path | None] = {}
    for column in ("mri", "pet", "report"):
        text = values.get(column, "")
        if not text:
            paths[column] = None
            continue
        relative = Path(text.replace("\\", "/"))
        if relative.is_absolute():
            raise fail(column, f"absolute path {text!r}: paths are relative to the site folder", "path outside site")
        try:
            resolved = (site_dir / relative).resolve()
        except (RuntimeError, OSError):            # RuntimeError: python 3.11's Path.resolve on a loop
            raise fail(column, f"path {text!r}: symlink loop", "symlink loop") from None
        if not _inside(resolved, site_root):
            raise fail(column, f"path {text!r} leads outside the site folder", "path outside site")
        if check_files and not (site_dir / relative).exists():
            raise fail(column, f"file not found: {text!r}", "missing file")
        if resolved.is_dir():
            _check_folder_links(site_dir / relative, text, site_root, column, fail)
        paths[column] = site_dir / relative
    label = values.get("label", "").upper() or None
    if label is not None and label not in LABELS:
        raise fail("label", f"unknown label {values['label']!r}; use {', '.join(LABELS)} or leave empty",
                   "unknown label")
    split = values.get("split", "").lower() or None
    if split is not None and split not in SPLITS:
        raise fail("split", f"unknown split {values['split']!r}; use {', '.join(SPLITS)} or leave empty",
                   "unknown split")
    return ManifestEntry(row=row, subject_id=subject, visit=values.get("visit", ""), mri=paths["mri"],
                         pet=paths["pet"], report=paths["report"], label=label, split=split)


def _inside(resolved: Path, site_root: Path) -> bool:
    return resolved == site_root or site_root in resolved.parents


def _check_folder_links(folder: Path, text: str, site_root: Path, column: str, fail) -> None:
    """A DICOM series folder's entries obey the same rule as manifest paths: a link in it that
    leads out of the site folder (or loops) costs the row, as a path in the manifest would."""
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return                                     # the reader names an unreadable folder
    for child in children:
        if not child.is_symlink():
            continue
        try:
            target = child.resolve()
        except (RuntimeError, OSError):
            raise fail(column, f"folder {text!r} holds a symlink loop: {child.name!r}", "symlink loop") from None
        if not _inside(target, site_root):
            raise fail(column, f"folder {text!r} holds a link leading outside the site folder: {child.name!r}",
                       "path outside site")
