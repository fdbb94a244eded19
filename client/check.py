"""`cmvim-client check --data DIR`: is this site folder ready to join a federated run?

Reads the manifest, decodes every scan and report once, and prints what it saw:
subjects, modalities, labels, splits, the shapes and voxel sizes of the scans,
and every problem with its row, subject, column, file and what is wrong. This
runs at the hospital, for the hospital: it shows subject ids; nothing is sent.
Exit status: 0 ready (problem rows are skipped in training), 1 fatal (no
usable manifest or no usable subject; with --strict, any problem).

The split counts are the run's: give the run config the coordinator shares (`--config`) and
they are what training will use (its seed and split_fractions, assigned by the same code as
training); without it, the run config's defaults.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import nibabel as nib

from cmvim.config import ConfigError
from cmvim.data import DataError, read_manifest, read_report
from cmvim.data.site import assign_splits
from cmvim.data.volumes import load_volume, voxel_sizes
from cmvim.run_config import SPLIT_FRACTIONS, RunConfig, run_config
from cmvim.tables import format_table


def check_site(site_dir: Path, strict: bool = False, out=print, cfg: RunConfig | None = None) -> int:
    out(f"Site check: {site_dir}")
    try:
        manifest = read_manifest(site_dir)
    except DataError as err:
        out(f"\nFATAL: {err}")
        return 1
    problems: list[DataError] = list(manifest.problems)
    geometry: Counter = Counter()
    usable = []
    modality_counts: Counter = Counter()
    for n, entry in enumerate(manifest.entries, start=1):
        ok = True
        for column in ("mri", "pet"):
            path = getattr(entry, column)
            if path is None:
                continue
            try:
                volume, affine = load_volume(path, column)
            except DataError as err:
                problems.append(err.with_context(subject=entry.subject_id, row=entry.row, column=column))
                ok = False
                continue
            modality_counts[column] += 1
            spacing = "x".join(f"{v:.2g}" for v in voxel_sizes(affine))
            geometry[(column, "x".join(map(str, volume.shape)), spacing, "".join(nib.aff2axcodes(affine)))] += 1
        if entry.report is not None:
            try:
                read_report(entry.report)
                modality_counts["report"] += 1
            except DataError as err:
                problems.append(err.with_context(subject=entry.subject_id, row=entry.row, column="report"))
                ok = False
        if ok:
            usable.append(entry)
        if n % 25 == 0:
            out(f"  checked {n}/{len(manifest.entries)} rows ...")

    try:
        seed, fractions = (cfg.seed, tuple(cfg.split_fractions)) if cfg else (0, SPLIT_FRACTIONS)
        splits = assign_splits(manifest.entries, seed, fractions)     # as training assigns them
    except DataError as err:
        out(f"\nFATAL: {err}")
        return 1
    labels = Counter(e.label or "unlabeled" for e in usable)
    split_counts = Counter(splits[e.subject_id] for e in usable)
    rows_total = len(manifest.entries) + len(manifest.problems)
    out(f"manifest.csv: {rows_total} rows, {len(usable)} usable, {rows_total - len(usable)} with problems\n")
    out(format_table(["what", "count"], [
        ["subjects", len({e.subject_id for e in usable})],
        ["visits", len(usable)],
        ["with MRI", modality_counts["mri"]],
        ["with PET", modality_counts["pet"]],
        ["with report", modality_counts["report"]],
        *[[f"label {lab}", labels[lab]] for lab in ("CN", "MCI", "AD", "unlabeled") if labels[lab]],
        *[[f"split {s}", split_counts[s]] for s in ("train", "val", "test") if split_counts[s]],
    ]))
    if geometry:
        out("\nShapes and voxel sizes seen")
        out(format_table(["modality", "shape", "voxel mm", "orientation", "files"],
                         [[*key, count] for key, count in sorted(geometry.items())]))
    if manifest.warnings:
        out("\nWarnings")
        for warning in manifest.warnings:
            out(f"  - {warning}")
    if problems:
        out(f"\nProblems ({len(problems)}; these rows are skipped in training)")
        out(format_table(["row", "subject", "column", "problem", "file"],
                         [[p.row, p.subject, p.column, p.problem, _relative(p.file, site_dir)] for p in problems]))
    fatal = not usable or (strict and problems)
    if not usable:
        out("\nFAILED: no usable subject in this site folder.")
    elif fatal:
        out(f"\nFAILED (--strict): {len(problems)} problem(s).")
    else:
        out(f"\nREADY: {len(usable)} subject-visits usable" + (f", {len(problems)} skipped." if problems else "."))
    return 1 if fatal else 0


def _relative(path: str | None, site_dir: Path) -> str:
    if path is None:
        return ""
    try:
        return str(Path(path).relative_to(site_dir))
    except ValueError:
        return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="the site folder (holding manifest.csv)")
    parser.add_argument("--strict", action="store_true", help="exit non-zero on any problem, not only fatal ones")
    parser.add_argument("--config", type=Path, help="the run config (YAML) the coordinator shares: split counts as "
                                                   "the run will assign them (default: the run config's defaults)")


def check_from_args(args: argparse.Namespace) -> int:
    try:
        cfg = run_config(args.config) if args.config else None
    except ConfigError as err:
        print(f"FATAL: {args.config}: {err}")
        return 1
    return check_site(args.data, strict=args.strict, cfg=cfg)
