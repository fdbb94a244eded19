"""`cmvim-cohort`: write a realistic synthetic multi-site AD cohort as site folders.

    cmvim-cohort --sites 3 --subjects 40 --shape 64 --out cohort/ --seed 0

Each DIR/<site>/ holds manifest.csv and the files it names (the site data
contract), or with --format bids a BIDS dataset (docs/bids.md), ready for
`cmvim-client check --data DIR/<site>`. DIR/cohort.json holds the site
profiles, counts and the effect sizes measured on the files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cmvim.cli_util import HelpFormatter, add_version, require_extra
from cmvim.tables import format_table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmvim-cohort", description=__doc__, formatter_class=HelpFormatter)
    add_version(parser)
    parser.add_argument("--sites", type=int, default=3, help="number of sites (A, B, C, ...)")
    parser.add_argument("--subjects", type=int, default=40, help="subjects per site")
    parser.add_argument("--shape", type=int, default=64, help="cubic volume size in voxels (MNI space)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="the random seed: the same seed writes the same cohort")
    parser.add_argument("--pet-missing", type=float, default=0.15, help="mean fraction of subjects without PET")
    parser.add_argument("--unlabeled", type=float, default=0.2, help="mean fraction of subjects without a label")
    parser.add_argument("--report-informativeness", type=float, default=0.6,
                        help="0: reports say nothing about the findings, 1: they always describe them")
    parser.add_argument("--name-diagnosis", action="store_true", help="let reports name the diagnosis")
    parser.add_argument("--effect-scale", type=float, default=1.0, help="scale disease effects (>1: easier)")
    parser.add_argument("--subtypes", action="store_true",
                        help="AD and MCI subjects get an AD subtype: typical, limbic-predominant or hippocampal-sparing "
                             "(docs/cohort.md), so no one region separates the classes")
    parser.add_argument("--visits", type=int, default=1,
                        help="visits per subject, a year apart, the disease progressing between them (a visit column "
                             "in manifest.csv)")
    parser.add_argument("--dicom-sites", help="comma-separated sites that export DICOM (default: B, E, ...)")
    parser.add_argument("--workers", type=int, help="processes (default: one per site, up to the core count)")
    parser.add_argument("--format", choices=("manifest", "bids"), default="manifest",
                        help="site folders as manifest.csv + files (default), or as BIDS datasets (NIfTI only: "
                             "--dicom-sites does not apply)")
    parser.add_argument("--space", choices=("template", "scanner"), default="template",
                        help="template: scans in MNI space, brain only (default); scanner: the same subjects as "
                             "scanners write them: skull, scalp and neck, heads posed +-15 degrees and +-30 mm, world "
                             "origins up to 100 mm from the brain, scanner voxel orders (LPS, sagittal, ...) and "
                             "anisotropic voxels, PET posed apart from its T1 on its own grid (docs/cohort.md); "
                             "DIR/poses.json holds every scan's true template transform")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    require_extra("cmvim-cohort", "sim", ("nilearn",))    # it carries the MNI152 templates the cohorts are built from
    from .cohort import CohortConfig, generate_cohort
    try:
        cfg = CohortConfig(sites=args.sites, subjects=args.subjects, shape=args.shape, seed=args.seed,
                           pet_missing=args.pet_missing, unlabeled=args.unlabeled,
                           report_informativeness=args.report_informativeness, name_diagnosis=args.name_diagnosis,
                           effect_scale=args.effect_scale, subtypes=args.subtypes, visits=args.visits,
                           dicom_sites=tuple(args.dicom_sites.split(",")) if args.dicom_sites else None,
                           format=args.format, space=args.space)
    except ValueError as exc:
        parser.error(str(exc))
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} exists and is not empty: choose a new folder")
    print(f"writing {cfg.sites} sites x {cfg.subjects} subjects at {cfg.shape}^3 to {args.out} ...", flush=True)
    summary = generate_cohort(args.out, cfg, workers=args.workers)
    print(f"done in {summary.seconds:.1f} s\n")
    print(summary.table())
    print("\nEffects measured on the written files (all subjects, true labels):")
    rows = []
    for feature, entry in summary.effects.items():
        if feature == "site_wm_intensity":
            continue
        rows.append([feature, entry["mean_CN"], entry["mean_MCI"], entry["mean_AD"],
                     entry.get("MCI_vs_CN_pct"), entry.get("MCI_vs_CN_d"), entry.get("AD_vs_CN_pct"),
                     entry.get("AD_vs_CN_d")])
    print(format_table(["measure", "CN", "MCI", "AD", "MCI vs CN %", "d", "AD vs CN %", "d"], rows))
    by_subtype = [[feature, subtype, entry[f"AD_{subtype}_vs_CN_pct"], entry[f"AD_{subtype}_vs_CN_d"]]
                  for feature, entry in summary.effects.items() if feature != "site_wm_intensity"
                  for subtype in ("typical", "limbic", "hippocampal_sparing") if f"AD_{subtype}_vs_CN_d" in entry]
    if by_subtype:
        print("\nAD subjects by subtype, against all CN:")
        print(format_table(["measure", "AD subtype", "vs CN %", "d"], by_subtype))
    print(f"\nsummary: {args.out / 'cohort.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
