"""`cmvim-client check --data DIR`: is this site folder ready to join a federated run?

Loads the site exactly as training does (`SiteData.for_run`: the manifest.csv or the BIDS dataset
the folder is, every scan decoded
and preprocessed with the run's settings, into the same cache training then reads: outside the
site folder, which check only reads; --cache-dir), and
prints what it saw: subjects, modalities, labels, splits, the shapes and voxel sizes of the
scans, how a BIDS dataset's PET images were read (tracer, units, the frames averaged: their
sidecars), and every problem with its row (a BIDS dataset: its visit's number), subject, column,
file and what is wrong. A row this
skips is a row training skips, and for the same reason. This runs at the hospital, for the
hospital: it shows subject ids; nothing is sent.
Exit status: 0 ready (problem rows are skipped in training), 1 fatal (no usable manifest or
no usable subject; with --strict, any problem).

The run's settings come from the run config the coordinator shares (`--config`): its
preprocessing, seed, split_fractions and, for a BIDS dataset, its `bids` section (which column
holds the diagnosis); without it, the run config's defaults. A progress bar shows on stderr
when that is a terminal.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections import Counter
from pathlib import Path

import nibabel as nib

from cmvim.config import ConfigError
from cmvim.data import DataError, SiteData, read_site_folder
from cmvim.data.volumes import scan_geometry, voxel_sizes
from cmvim.run_config import BidsConfig, RunConfig, run_config
from cmvim.tables import format_table

from . import qc


def manifest_ready(site_dir: Path, out=print, bids: BidsConfig | None = None) -> int:
    """Before joining: the manifest (manifest.csv or BIDS dataset) reads and has usable rows (0),
    else why not (1). Light on purpose: the run's preprocessing is not known yet, and
    `cmvim-client check --config` (the full check) or the first round decodes and preprocesses
    every scan, row by row."""
    try:
        manifest = read_site_folder(site_dir, bids)
    except DataError as err:
        out(f"FATAL: {err}")
        return 1
    rows = "rows" if manifest.format == "manifest.csv" else "visits"
    # before joining, a BIDS dataset's label map is the run's to give: a value the default map
    # lacks may be one the run maps, so those visits do not make the site unfit to join
    pending = [p for p in manifest.problems if p.kind == "unknown label"] if bids is None and rows == "visits" else []
    if not manifest.entries and not pending:
        out(f"FAILED: {manifest.format} has no usable {rows[:-1]} ({len(manifest.problems)} with problems: "
            f"cmvim-client check --data {site_dir})")
        return 1
    out(f"{manifest.format}: {len(manifest.entries)} usable {rows}, {len(manifest.problems)} with problems"
        + (f" ({len(pending)} of them labels the default bids.label_map lacks; the run's may map them)"
           if pending else "")
        + f" (the full check: cmvim-client check --data {site_dir} --config RUN.yaml)")
    return 0


def preprocessing_line(cfg: RunConfig) -> str:
    """What the run's preprocessing does to a scan, in one line."""
    p = cfg.preprocess
    grid = f"model grid {p.shape}^3 at {p.voxel_size if p.voxel_size is not None else 2.0:g} mm"
    if p.spatial == "template":
        margin = p.registration.brain_margin_mm
        extraction = ("no brain extraction" if margin is None else f"brain mask +{margin:g} mm" if margin
                      else "brain mask")
        bias = "N4, " if p.registration.bias_correction else ""
        return (f"Preprocessing: spatial template: T1 -> MNI152 2009a ({bias}affine, 12 dof), PET -> its T1 (rigid, "
                f"6 dof), one interpolation, {extraction}; {grid}")
    return f"Preprocessing: spatial none: scans taken as already in template space (no registration); {grid}"


def check_site(site_dir: Path, strict: bool = False, out=print, cfg: RunConfig | None = None,
               qc_dir: Path | None = None, qc_visits: int = 12, cache_dir: Path | None = None) -> int:
    out(f"Site check: {site_dir}")
    cfg = cfg or RunConfig()
    out(preprocessing_line(cfg))
    try:
        with _quiet_data_log():
            site = SiteData.for_run(site_dir, cfg, cache_dir=cache_dir, show_progress=True,
                                    workers=os.cpu_count() or 1)
    except DataError as err:
        out(f"\nFATAL: {err}")
        return 1
    records, summary = site.records, site.summary
    problems = sorted(summary.skipped, key=lambda p: (p.row is None, p.row or 0))
    geometry: Counter = Counter()
    for record in records:
        for column in ("mri", "pet"):
            path = getattr(record.entry, column)
            if path is None:
                continue
            try:
                shape, affine = scan_geometry(path)
            except Exception:  # noqa: BLE001 - changed since it was loaded (readers raise many types): no traceback
                continue
            spacing = "x".join(f"{v:.2g}" for v in voxel_sizes(affine))
            geometry[(column, "x".join(map(str, shape)), spacing, "".join(nib.aff2axcodes(affine)))] += 1

    labels = Counter(r.entry.label or "unlabeled" for r in records)
    split_counts = Counter(r.split for r in records)
    bids = summary.source != "manifest.csv"
    rows = "visits" if bids else "rows"
    out(f"{summary.source}: {summary.rows} {rows}, {len(records)} usable, {summary.rows - len(records)} "
        f"with problems\npreprocessed into the cache {site.cache.root}\n")
    out(format_table(["what", "count"], [
        ["subjects", len({r.entry.subject_id for r in records})],
        ["visits", len(records)],
        ["with MRI", len(records)],
        ["with PET", sum(r.has_pet for r in records)],
        ["with report", sum(r.report is not None for r in records)],
        *[[f"label {lab}", labels[lab]] for lab in ("CN", "MCI", "AD", "unlabeled") if labels[lab]],
        *[[f"split {s}", split_counts[s]] for s in ("train", "val", "test") if split_counts[s]],
    ]))
    if geometry:
        out("\nShapes and voxel sizes seen")
        out(format_table(["modality", "shape", "voxel mm", "orientation", "files"],
                         [[*key, count] for key, count in sorted(geometry.items())]))
    pet_reads = Counter((r.entry.pet_reading.tracer, r.entry.pet_reading.units, r.entry.pet_reading.summary)
                        for r in records if r.has_pet and r.entry.pet_reading is not None)
    if pet_reads:
        out("\nPET as read (BIDS _pet.json sidecars: TracerName, Units, FrameTimesStart/FrameDuration)")
        out(format_table(["tracer", "units", "frames used", "visits"],
                         [[*key, count] for key, count in sorted(pet_reads.items())]))
    if cfg.preprocess.spatial == "template" and (records or problems):
        visits = qc.site_qc(site)
        if any(v.measures for v in visits):
            out("\nRegistration quality (correlations inside the template's brain; head scale: the affine's, "
                "1 = the template's size)")
            out(qc.summary_table(visits, site))
            lines = qc.outlier_lines(visits)
            if lines:
                out(f"Visits that stand out from this site's others (robust z beyond {qc.OUTLIER_Z:g}; used, but "
                    "look at them" + (f": {qc_dir}" if qc_dir else ": --qc DIR draws them") + ")")
                for line in lines:
                    out(f"  - {line}")
        if qc_dir is not None:
            for path in qc.write_qc(qc_dir, site, visits, qc_visits, site_dir.name):
                out(f"wrote {path}")
    elif qc_dir is not None:
        out(f"\n--qc: nothing to draw: preprocess.spatial is {cfg.preprocess.spatial} (no registration)")
    if summary.warnings:
        out("\nWarnings")
        for warning in summary.warnings:
            out(f"  - {warning}")
    if problems:
        visits = len({p.row for p in problems})
        out(f"\nProblems ({len(problems)}" + (f" in {visits} {rows}" if visits != len(problems) else "")
            + f"; these {rows} are skipped in training)")
        out(problems_table(problems, site_dir, bids))
    fatal = not records or (strict and problems)
    if not records:
        out("\nFAILED: no usable subject in this site folder.")
    elif fatal:
        out(f"\nFAILED (--strict): {len(problems)} problem(s).")
    else:
        out(f"\nREADY: {len(records)} subject-visits usable" + (f", {len(problems)} skipped." if problems else "."))
    return 1 if fatal else 0


@contextlib.contextmanager
def _quiet_data_log():
    """The loader logs a line per skipped row (row and kind: what a coordinator may see); here the
    problems table says it all, with subject and file, so those lines would only repeat it."""
    data_log = logging.getLogger("cmvim.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        data_log.setLevel(level)


def _relative(path: str | None, site_dir: Path) -> str:
    if path is None:
        return ""
    try:
        return str(Path(path).relative_to(site_dir))
    except ValueError:
        return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True,
                        help="the site folder: holding manifest.csv, or a BIDS dataset (dataset_description.json, "
                             "participants.tsv, sub-*/; docs/bids.md)")
    parser.add_argument("--strict", action="store_true", help="exit non-zero on any problem, not only fatal ones")
    parser.add_argument("--config", type=Path, help="the run config (YAML) the coordinator shares: preprocessing and "
                                                   "split counts as the run will do them (default: the run config's "
                                                   "defaults)")
    parser.add_argument("--qc", type=Path, metavar="DIR",
                        help="write DIR/qc_<site>.png (registered slices with the template's outline, flagged visits "
                             "in red) and DIR/qc_<site>.tsv (every visit's registration measures); needs matplotlib "
                             "(pip install 'cmvim[qc]')")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="where the preprocessed scans are cached (default: $CMVIM_CACHE/sites/<id of the site "
                             "folder>, else ~/.cache/cmvim/sites/...: outside the site folder, which is only read; "
                             "training and predict use the same default)")
    parser.add_argument("--qc-visits", type=int, default=12, metavar="N",
                        help="visits in the QC picture: every flagged one, then others spread over the site (default 12)")


def check_from_args(args: argparse.Namespace) -> int:
    try:
        cfg = run_config(args.config) if args.config else None
    except ConfigError as err:
        print(f"FATAL: {args.config}: {err}")
        return 1
    return check_site(args.data, strict=args.strict, cfg=cfg, qc_dir=args.qc, qc_visits=args.qc_visits,
                      cache_dir=args.cache_dir)


def problems_table(problems: list[DataError], site_dir: Path, bids: bool = False) -> str:
    """The rows a load skipped, for the hospital's eyes: row (a BIDS dataset's visit number),
    subject, column, problem, file."""
    problems = sorted(problems, key=lambda p: (p.row is None, p.row or 0))
    return format_table(["visit #" if bids else "row", "subject", "column", "problem", "file"],
                        [[p.row, p.subject, p.column, p.problem, _relative(p.file, site_dir)] for p in problems])
