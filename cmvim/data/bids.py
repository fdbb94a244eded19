"""A site folder that is a BIDS dataset, read into the `Manifest` manifest.csv gives (docs/bids.md).

Hospitals that already keep their scans as BIDS (https://bids-specification.readthedocs.io)
should not have to write a manifest.csv beside it. What is read:

    dataset_description.json                           marks the folder as BIDS (a JSON object)
    participants.tsv                                   participant_id, <label_column>, <split_column>
    sub-<s>/[ses-<v>/]anat/*_T1w.nii[.gz]              the T1 MRI (required)
    sub-<s>/[ses-<v>/]pet/*_pet.nii[.gz] + _pet.json   FDG PET (optional; cmvim.data.pet reads its sidecar:
                                                       TracerName, frame timing, Units)
    sub-<s>/sub-<s>_sessions.tsv                       session_id, <label_column>: a visit's own label
    sub-<s>/[ses-<v>/]sub-<s>[_ses-<v>]_report.txt     the report (not a BIDS file: .bidsignore it)

Every session is a visit (`visit` is its label, "01" for ses-01; "" for a subject without
sessions) and one entry; `row` numbers the visits in the order listed (subjects, then their
sessions, sorted by name), so it stays put while the folder does. As in manifest.csv, problems
with the tables as a whole (an unreadable dataset_description.json, a participants.tsv without a
participant_id column) are fatal, and a visit's problem costs that visit only, named with the
file (and the table's line) it is in, every one of them (not only the first). A PET that cannot
be read (another tracer, a damaged file, no frame in the window) leaves an MRI-only visit, with a
warning naming the file and why. Several T1w (or FDG) images of one visit: the first by
name, run numbers compared as numbers (run-2 before run-10), with a warning naming the others.
A subject folder that participants.tsv does not list is loaded unlabelled, with a warning.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import re
from pathlib import Path

from ..names import SPLITS
from ..run_config import BidsConfig
from .errors import DataError, VisitProblems, each_problem
from .manifest import Manifest, ManifestEntry, _inside
from .pet import PetPolicy, PetReading, read_pet

DESCRIPTION = "dataset_description.json"
PARTICIPANTS = "participants.tsv"
MISSING = ("", "n/a")                      # how BIDS tables write a missing value


def is_bids(site_dir: str | Path) -> bool:
    return (Path(site_dir) / DESCRIPTION).exists()


def report_path(subject_dir: Path, subject: str, visit: str) -> Path:
    """Where a visit's report is read from: beside the visit's modality folders."""
    if not visit:
        return subject_dir / f"{subject}_report.txt"
    return subject_dir / f"ses-{visit}" / f"{subject}_ses-{visit}_report.txt"


class _Refused(Exception):
    """A path that resolves outside the site folder, or loops."""

    def __init__(self, problem: str, kind: str):
        super().__init__(problem)
        self.problem, self.kind = problem, kind


def read_bids(site_dir: str | Path, cfg: BidsConfig | None = None, check_files: bool = True,
              pet: PetPolicy | None = None) -> Manifest:
    """The dataset's visits as manifest entries. `check_files` is accepted for symmetry with
    read_manifest: every file an entry names was found on disk. `pet`: which tracers are read and
    a dynamic PET's window (default: the bids config's `accept_tracers`/`pet_window_min` where it
    has them, else FDG only, 30-60 min)."""
    site_dir = Path(site_dir)
    cfg = cfg or BidsConfig()
    policy = pet or PetPolicy.from_bids(cfg)
    site_root = site_dir.resolve()
    _read_description(site_dir, site_root)
    participants_path = site_dir / PARTICIPANTS
    manifest = Manifest(site_dir=site_dir, entries=[], format="BIDS dataset", path=participants_path)
    participants = _Participants.read(participants_path, site_root, cfg, manifest.warnings)
    seen = set()
    row = 0
    for subject_dir in _children(site_dir, "sub-", directories=True):
        subject = subject_dir.name
        seen.add(subject)
        visits = _visits(subject_dir, site_root)
        if subject not in participants.rows and participants.exists:
            manifest.warnings.append(f"{subject} is not in {PARTICIPANTS}: no label from it (only its "
                                     "sessions.tsv can give one), split by the seeded rule")
        sessions = _Sessions.read(subject_dir / f"{subject}_sessions.tsv", site_root, cfg) \
            if cfg.sessions_labels else _Sessions.empty()
        for visit, visit_dir, refused in visits:
            row += 1
            try:
                if refused is not None:
                    raise refused
                manifest.entries.append(_entry(row, subject, visit, site_dir, visit_dir, site_root,
                                               participants, sessions, cfg, policy, manifest.warnings))
            except DataError as err:
                manifest.problems.extend(each_problem(err.with_context(subject=subject, row=row)))
    missing = sorted(set(participants.rows) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        manifest.warnings.append(f"{PARTICIPANTS} lists {len(missing)} participant(s) without a folder: {shown}")
    return manifest


def _read_description(site_dir: Path, site_root: Path) -> None:
    """dataset_description.json must be a JSON object: a broken one means the folder is not
    what its owner thinks it is, so nothing is read from it."""
    path = site_dir / DESCRIPTION
    try:
        _resolve_inside(path, site_root)
        description = json.loads(path.read_bytes().decode("utf-8-sig"))
    except _Refused as refused:
        raise DataError(refused.problem, file=path, kind=refused.kind) from None
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror or type(exc).__name__})", file=path,
                        kind="unreadable file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"not valid JSON ({exc})", file=path, kind="bad BIDS dataset") from None
    if not isinstance(description, dict):
        raise DataError("not a JSON object: BIDS requires {\"Name\": ..., \"BIDSVersion\": ...}", file=path,
                        kind="bad BIDS dataset")


def _entry(row: int, subject: str, visit: str, site_dir: Path, visit_dir: Path, site_root: Path,
           participants: "_Participants", sessions: "_Sessions", cfg: BidsConfig, policy: PetPolicy,
           warnings: list[str]) -> ManifestEntry:
    """One visit; when it cannot be used, a DataError naming the file (VisitProblems: all of
    them). The PET is optional: a PET that cannot be read leaves an MRI-only visit, warned."""
    session = f"session 'ses-{visit}': " if visit else ""
    problems: list[DataError] = []
    given, label = None, None
    try:
        given = participants.row_of(subject)          # raises the subject's participants.tsv problem
        label = given.label if given else None
    except DataError as err:
        problems.append(err)
    try:
        from_sessions = sessions.label_of(visit)      # raises the session's sessions.tsv problem
        if from_sessions is not _Sessions.SILENT:
            label = from_sessions
    except DataError as err:
        problems.append(err)
    mri = _pick(visit_dir / "anat", "_T1w", site_dir, warnings)
    if mri is None:
        problems.append(DataError(f"{session}no T1w image (anat/*_T1w.nii[.gz]): every visit needs a T1 MRI",
                                  file=visit_dir / "anat", column="mri", kind="missing file"))
    report = report_path(site_dir / subject, subject, visit)
    paths = {"mri": mri, "report": report if report.exists() or report.is_symlink() else None}
    for column, path in paths.items():
        if path is None:
            continue
        try:
            _resolve_inside(path, site_root)
        except _Refused as refused:
            problems.append(DataError(session + refused.problem, file=path, column=column, kind=refused.kind))
    pet, reading, pet_problems, pet_warnings = _pick_pet(visit_dir / "pet", site_dir, site_root, policy)
    if problems:                      # the visit is skipped: its PET's problems are listed with the rest
        raise VisitProblems(problems + pet_problems)
    warnings.extend(pet_warnings)
    warnings.extend(f"{err.file and Path(err.file).relative_to(site_dir)}: {err.problem}; the visit is read "
                    "without PET" for err in pet_problems)
    return ManifestEntry(row=row, subject_id=subject, visit=visit, mri=mri, pet=pet, report=paths["report"],
                         label=label, split=given.split if given else None, pet_reading=reading)


def _pick_pet(folder: Path, site_dir: Path, site_root: Path, policy: PetPolicy
              ) -> tuple[Path | None, PetReading | None, list[DataError], list[str]]:
    """The visit's PET as its sidecar describes it: (image, reading, problems, warnings). Images
    of a tracer the run does not accept are left out (a warning); an image that cannot be read
    (damaged header, tracer conflict, no frame in the window, ...) is a problem; of several
    readable ones, the first by name is read (warned)."""
    images = sorted((p for p in _children(folder, "", directories=False)
                     if re.search(r"_pet\.nii(\.gz)?$", p.name)), key=lambda p: _natural(p.name))
    readable, problems, warnings = [], [], []
    for image in images:
        try:
            _resolve_inside(image, site_root)
            reading = read_pet(image, site_dir, policy)
        except _Refused as refused:
            problems.append(DataError(refused.problem, file=image, column="pet", kind=refused.kind))
            continue
        except DataError as err:
            if err.kind == "tracer not accepted":
                warnings.append(f"{image.relative_to(site_dir)}: {err.problem}")
            else:
                problems.append(err)
            continue
        readable.append((image, reading))
    if not readable:
        return None, None, problems, warnings
    (image, reading), others = readable[0], readable[1:]
    warnings.extend(reading.warnings)
    if others:
        warnings.append(f"{folder.relative_to(site_dir)}: several PET images; reading {image.name}, not "
                        f"{', '.join(p.name for p, _ in others)}")
    if problems:                      # a readable PET was found: the others' problems cost nothing
        warnings.extend(f"{Path(err.file).relative_to(site_dir)}: {err.problem} (not read)" for err in problems)
    return image, reading, [], warnings


def _visits(subject_dir: Path, site_root: Path) -> list[tuple[str, Path, DataError | None]]:
    """(visit, folder, problem) per session, or the subject folder as its one visit."""
    try:
        _resolve_inside(subject_dir, site_root)
    except _Refused as refused:
        return [("", subject_dir, DataError(f"subject folder: {refused.problem}", file=subject_dir,
                                            kind=refused.kind))]
    sessions = _children(subject_dir, "ses-", directories=True)
    if not sessions:
        return [("", subject_dir, None)]
    return [(s.name[len("ses-"):], s, None) for s in sessions]


def _pick(folder: Path, suffix: str, site_dir: Path, warnings: list[str]) -> Path | None:
    """The visit's image in `folder` named *<suffix>.nii[.gz]: the first by name when there are
    several (warned)."""
    where = folder.relative_to(site_dir)
    found = [p for p in _children(folder, "", directories=False)
             if re.search(rf"{suffix}\.nii(\.gz)?$", p.name)]
    if not found:
        return None
    found.sort(key=lambda p: _natural(p.name))
    if len(found) > 1:
        warnings.append(f"{where}: several images; reading {found[0].name}, not "
                        f"{', '.join(p.name for p in found[1:])}")
    return found[0]


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _children(folder: Path, prefix: str, directories: bool) -> list[Path]:
    """Entries of `folder` named prefix*, folders or files; none when it is missing or unreadable."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    out = []
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        try:
            kind_ok = entry.is_dir() if directories else entry.is_file()
        except OSError:                   # a symlink loop: is_* raise on some Pythons
            kind_ok = entry.is_symlink()
        if kind_ok or (entry.is_symlink() and not entry.exists()):
            out.append(entry)             # a dangling or looping link is listed: _resolve_inside names it
    return out


def _resolve_inside(path: Path, site_root: Path) -> Path:
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError):         # RuntimeError: python 3.11's Path.resolve on a loop
        raise _Refused("symlink loop", "symlink loop") from None
    if not _inside(resolved, site_root):
        raise _Refused("leads outside the site folder (a symlink?)", "path outside site")
    if not path.exists():
        raise _Refused("a link to nothing (the file it points to is missing)", "missing file")
    return resolved


def _read_tsv(path: Path) -> list[list[str]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return [[cell.strip() for cell in line] for line in csv.reader(io.StringIO(text, newline=""), delimiter="\t")]


class _Row:
    def __init__(self, line: int, label: str | None, split: str | None):
        self.line, self.label, self.split = line, label, split


class _Participants:
    """participants.tsv: participant_id -> its row (label and split mapped), or the row's problem."""

    def __init__(self, path: Path, exists: bool):
        self.path, self.exists = path, exists
        self.rows: dict[str, _Row | DataError] = {}

    def row_of(self, subject: str) -> _Row | None:
        row = self.rows.get(subject)
        if isinstance(row, DataError):
            raise row
        return row

    @classmethod
    def read(cls, path: Path, site_root: Path, cfg: BidsConfig, warnings: list[str]) -> "_Participants":
        if not path.exists() and not path.is_symlink():
            warnings.append(f"no {PARTICIPANTS}: every subject is unlabelled unless its sessions.tsv labels it")
            return cls(path, exists=False)
        table = cls(path, exists=True)
        try:
            _resolve_inside(path, site_root)
            lines = _read_tsv(path)
        except _Refused as refused:
            raise DataError(refused.problem, file=path, kind=refused.kind) from None
        except OSError as exc:
            raise DataError(f"cannot read ({exc.strerror or type(exc).__name__})", file=path,
                            kind="unreadable file") from None
        header = _header(lines, path, "participant_id")
        if cfg.label_column not in header:
            close = difflib.get_close_matches(cfg.label_column, header, n=1)
            warnings.append(f"{PARTICIPANTS} has no {cfg.label_column!r} column (bids.label_column)"
                            + (f"; did you mean {close[0]!r}?" if close else "")
                            + ": subjects are unlabelled unless their sessions.tsv labels them")
        index = {name: i for i, name in enumerate(header)}
        for line_no, cells in enumerate(lines[1:], start=2):
            if not any(cells):
                continue
            values = {name: (cells[i] if i < len(cells) else "") for name, i in index.items()}
            subject = _prefixed(values["participant_id"], "sub-")
            if subject == "sub-":
                continue                               # a row without an id names no folder
            if subject in table.rows:
                first = table.rows[subject]
                where = f"line {first.line}" if isinstance(first, _Row) else "another line"
                table.rows[subject] = DataError(
                    f"{PARTICIPANTS} line {line_no}: participant {subject!r} is listed twice (also {where}); "
                    "the subject is left out until one row remains", file=path, column="participant_id",
                    kind="duplicate subject")
                continue
            try:
                label = _label(values.get(cfg.label_column, ""), cfg, path, line_no)
                split = values.get(cfg.split_column, "").lower()
                if split in MISSING:
                    split = None
                elif split not in SPLITS:
                    raise DataError(f"{PARTICIPANTS} line {line_no}: unknown split {values[cfg.split_column]!r} "
                                    f"in column {cfg.split_column!r}; use {', '.join(SPLITS)} or n/a", file=path,
                                    column=cfg.split_column, kind="unknown split")
                table.rows[subject] = _Row(line_no, label, split)
            except DataError as err:
                table.rows[subject] = err
        return table


class _Sessions:
    """sub-X/sub-X_sessions.tsv: session label -> the label it gives (when it has the label column)."""
    SILENT = object()                                  # the table gives this session no label

    def __init__(self, labels: dict[str, str | None | DataError], problem: DataError | None = None):
        self.labels, self.problem = labels, problem

    @classmethod
    def empty(cls) -> "_Sessions":
        return cls({})

    def label_of(self, visit: str):
        if self.problem is not None:
            raise self.problem
        label = self.labels.get(visit, self.SILENT)
        if isinstance(label, DataError):
            raise label
        return label

    @classmethod
    def read(cls, path: Path, site_root: Path, cfg: BidsConfig) -> "_Sessions":
        if not path.exists() and not path.is_symlink():
            return cls.empty()
        try:
            _resolve_inside(path, site_root)
            lines = _read_tsv(path)
            header = _header(lines, path, "session_id")
        except _Refused as refused:
            return cls({}, DataError(refused.problem, file=path, kind=refused.kind))
        except OSError as exc:
            return cls({}, DataError(f"cannot read ({exc.strerror or type(exc).__name__})", file=path,
                                     kind="unreadable file"))
        except DataError as err:
            return cls({}, err)
        if cfg.label_column not in header:
            return cls.empty()                         # a sessions.tsv of ages and dates: nothing to read
        index = {name: i for i, name in enumerate(header)}
        labels: dict[str, str | None | DataError] = {}
        for line_no, cells in enumerate(lines[1:], start=2):
            if not any(cells):
                continue
            values = {name: (cells[i] if i < len(cells) else "") for name, i in index.items()}
            visit = _prefixed(values["session_id"], "ses-")[len("ses-"):]
            if visit in labels:
                labels[visit] = DataError(f"line {line_no}: session 'ses-{visit}' is listed twice", file=path,
                                          column="session_id", kind="duplicate session")
                continue
            value = values.get(cfg.label_column, "")
            if value.lower() in MISSING:
                continue                               # n/a here: participants.tsv's label stands
            try:
                labels[visit] = _label(value, cfg, path, line_no)
            except DataError as err:
                labels[visit] = DataError(f"session 'ses-{visit}': {err.problem}", file=path, column=err.column,
                                          kind=err.kind)
        return cls(labels)


def _header(lines: list[list[str]], path: Path, id_column: str) -> list[str]:
    """A BIDS table's header (fatal problems raised), which must hold its id column."""
    if not lines or not any(lines[0]):
        raise DataError("empty table: a header row is required", file=path, kind="bad BIDS table")
    header = [h.strip() for h in lines[0]]
    if id_column not in header:
        close = difflib.get_close_matches(id_column, header, n=1)
        hint = f" (found {close[0]!r}: a typo?)" if close else ""
        comma = "; columns are separated by tabs, not commas" if len(header) == 1 and "," in header[0] else ""
        raise DataError(f"no {id_column!r} column{hint}{comma}; header is {header}", file=path,
                        column=id_column, kind="bad BIDS table")
    duplicated = sorted({h for h in header if h and header.count(h) > 1})
    if duplicated:
        raise DataError(f"column(s) appear more than once: {', '.join(duplicated)}", file=path,
                        kind="bad BIDS table")
    return header


def _label(value: str, cfg: BidsConfig, path: Path, line_no: int) -> str | None:
    try:
        return cfg.label_of(value)
    except KeyError:
        known = ", ".join(sorted(cfg.label_map))
        raise DataError(f"{path.name} line {line_no}: {cfg.label_column} {value!r} is not in bids.label_map "
                        f"(known, any case: {known}; n/a = unlabelled)", file=path, column=cfg.label_column,
                        kind="unknown label") from None


def _prefixed(value: str, prefix: str) -> str:
    """BIDS ids carry their prefix (sub-01); a table that left it out (01) still names the folder."""
    return value if value.startswith(prefix) else prefix + value
