"""Registration at the site (`preprocess.spatial: template`): what it costs per subject, how close
it lands to the known answer, and whether the default run on scans as scanners write them scores
what the same subjects score in template space.

    PYTHONPATH=. python benchmarks/registration.py [--cohort-seeds 31 32 33] [--seeds 0] [--subjects 120]
        [--timing-visits 20] [--scores docs/benchmarks/registration_scores.jsonl]
        [--skip-auc] [--references] [--extraction 0 4 8 none] [--steps 12]

Per cohort seed, the default run's cohort (3 sites x --subjects, 64^3, effect scale 1) is written
twice by cmvim-cohort's generator: in template space and in scanner space (the same subjects,
labels and splits: skull, posed heads, PET apart from its T1, scanner grids; docs/cohort.md).

1. Registration. Every scanner-space visit is preprocessed with the default settings; its T1 and
   PET transforms are scored against the generator's known ones (poses.json): the mean distance,
   over the template's brain voxels, between where the found and the true transform put them (mm).
   The per-subject time is measured on the first --timing-visits visits of each site, on one
   core (SimpleITK and torch at one thread), into an empty cache (first run: registration) and
   again (second run: the cache).
2. AUC. The default run (quick.yaml as it is: `spatial: template`; its rounds in this process,
   FedAvg weighted by subjects, as benchmarks/default_run.py --inprocess) on the template-space
   and on the scanner-space cohort, with the linear baseline (block means) on each, mean per-site
   test AUC. `--references` adds the pipeline before registration existed (`spatial: none`) on
   both: what it scored on template space, and what it falls to on scanner space.
   Every test subject's score goes to --scores (JSONL, full precision: model, space, cohort seed,
   run seed, site, label, score), so every AUC in the tables can be recomputed.

Cohort seeds 31, 32 and 33 are reserved for this report: no choice of the pipeline was made on
them (tuning used cohort seeds 3, 11 and 12). Last line:
`registration: median error X mm, Y s per subject, scanner-space AUC Z vs template W`.
"""
from __future__ import annotations

import sys
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # benchmarks/ssl.py must not shadow the ssl module
import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmvim.config import load_yaml
from cmvim.metrics import auc_or_nan
from cmvim.tables import format_table

RESERVED_COHORT_SEEDS = (31, 32, 33)


def cohort(seed: int, subjects: int, space: str) -> Path:
    from cmvim.simulations.cohort import CohortConfig, cached_cohort
    return cached_cohort(CohortConfig(sites=3, subjects=subjects, shape=64, seed=seed, space=space))


def run_config_for(cohort_path: Path, spatial: str, seed: int):
    from cmvim.run_config import run_config
    from cmvim.simulations.assembly import DEFAULT_CONFIG
    data = load_yaml(DEFAULT_CONFIG)
    data["seed"] = seed
    data["cohort"] = {**data["cohort"], "path": str(cohort_path)}
    data["preprocess"] = {**data["preprocess"], "spatial": spatial}
    data["baselines"] = []
    return run_config(data)


def brain_points():
    import nibabel as nib
    from cmvim.data.registration import load_template
    template = load_template()
    return nib.affines.apply_affine(template.affine, np.argwhere(template.brain > 0.5)[::3])


def transform_error(found: np.ndarray, truth: np.ndarray, points: np.ndarray) -> float:
    """Mean distance (mm) between where two template -> scan transforms put the brain's voxels."""
    import nibabel as nib
    return float(np.linalg.norm(nib.affines.apply_affine(found, points) - nib.affines.apply_affine(truth, points),
                                axis=1).mean())


def registration_errors(root: Path, sites: dict, points: np.ndarray) -> dict[str, list[float]]:
    """T1 and PET errors of every registered visit, from the transforms the sites' caches hold."""
    from cmvim.data.cache import transform_key
    from cmvim.data.registration import transform_fingerprint
    poses = json.loads((root / "poses.json").read_text())
    errors: dict[str, list[float]] = {"mri": [], "pet": [], "failed": []}
    for name, site in sites.items():
        fingerprint = transform_fingerprint(site.cfg.registration)
        for record in site.records:
            entry = record.entry
            truth = poses[name][str(Path(entry.mri).relative_to(site.site_dir))]
            found = site.cache.load_transforms(transform_key([entry.mri, entry.pet], fingerprint))
            errors["mri"].append(transform_error(found["mri"], np.array(truth["template_to_mri"]), points))
            if entry.pet is not None:
                errors["pet"].append(transform_error(found["pet"], np.array(truth["template_to_pet"]), points))
        errors["failed"] += [err.kind for err in site.summary.skipped]
    return errors


def timing(root: Path, cfg, visits: int) -> tuple[float, float]:
    """Seconds per visit on one core: first run (registration) and second run (cache), over the
    first `visits` visits of every site."""
    import SimpleITK as sitk
    import torch

    from cmvim.data import SiteData
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="cmvim-registration-timing-"))
    try:
        first = second = 0.0
        count = 0
        for site_dir in sorted(p for p in root.iterdir() if (p / "manifest.csv").exists()):
            lines = (site_dir / "manifest.csv").read_text().splitlines()[:1 + visits]
            subset = work / site_dir.name
            subset.mkdir()
            (subset / "manifest.csv").write_text("\n".join(lines) + "\n")
            for line in lines[1:]:              # a copy: a site folder's files must lie inside it (no links out)
                subject = line.split(",")[0]
                shutil.copytree(site_dir / "subjects" / subject, subset / "subjects" / subject)
            for run in ("first", "second"):
                start = time.perf_counter()
                site = SiteData.load(subset, cfg.preprocess, cache_dir=work / f"cache-{site_dir.name}")
                seconds = time.perf_counter() - start
                if run == "first":
                    first += seconds
                    count += len(site.records) + sum(p.kind == "registration failed" for p in site.summary.skipped)
                else:
                    second += seconds
        return first / count, second / count
    finally:
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(0)      # back to ITK's default (every core)
        shutil.rmtree(work, ignore_errors=True)


def step_times(root: Path, cfg, visits: int) -> str:
    """Median seconds of each registration step on one core over site A's first `visits` visits:
    N4, the T1's rigid and affine stages, the PET's rigid, one resampling onto the model grid."""
    import csv

    import SimpleITK as sitk
    import torch

    from cmvim.data import registration as R
    from cmvim.data.grid import Volume
    from cmvim.data.volumes import load_volume
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    torch.set_num_threads(1)
    steps: dict[str, list[float]] = {"N4": [], "T1 rigid + affine": [], "PET rigid": [], "resampling": []}

    def read(name: str) -> Volume:
        data, affine = load_volume(root / "A" / name)
        return Volume(data.astype(np.float32), affine)

    def timed(step: str, work):
        start = time.perf_counter()
        out = work()
        steps[step].append(time.perf_counter() - start)
        return out

    try:
        grid, shape = R.model_grid(cfg.preprocess)
        with open(root / "A" / "manifest.csv") as handle:
            rows = list(csv.DictReader(handle))[:visits]
        for row in rows:
            raw = read(row["mri"])
            t1 = timed("N4", lambda: R.bias_corrected(raw))
            found = timed("T1 rigid + affine", lambda: R.register_t1(t1))
            if row.get("pet"):
                pet = read(row["pet"])
                timed("PET rigid", lambda: R.register_pet(pet, t1, found))
            timed("resampling", lambda: R.onto_grid(t1, found, grid, shape))
    finally:
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(0)
    return format_table(["step", "visits", "median s"],
                        [[name, len(v), f"{np.median(v):.3f}"] for name, v in steps.items() if v])


def default_run_scores(cfg) -> tuple[dict, dict, dict]:
    """The default run's rounds in this process and the linear baseline on the same splits:
    ({site: (labels, scores)} of the final model's test subjects, the same for the linear model,
    the sites)."""
    import contextlib
    import io

    import torch

    from cmvim.site_task import SiteTask
    from cmvim.weights import initial_state
    from cmvim.simulations.baselines import linear_test_scores, train_rounds
    from cmvim.simulations.assembly import prepare_sites

    torch.set_num_threads(1)
    with contextlib.redirect_stdout(io.StringIO()):
        sites = prepare_sites(cfg)
    tasks = [SiteTask(cfg, [site], name) for name, site in sites.items()]
    pretrained, _ = train_rounds(cfg, tasks, "pretrain", initial_state(cfg, "pretrain"))
    final, local = train_rounds(cfg, tasks, "finetune", initial_state(cfg, "finetune", pretrained))
    model = {task.name: task.predict(final, local[task.name], "test") for task in tasks}
    linear, _ = linear_test_scores(cfg, sites)
    return model, linear, sites


def mean_site_auc(scores: dict) -> float:
    aucs = [auc_or_nan(labels, values) for labels, values in scores.values()]
    aucs = [a for a in aucs if np.isfinite(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def score_rows(cohort_seed: int, seed: int, space: str, spatial: str, model: str, scores: dict) -> list[dict]:
    return [{"cohort_seed": cohort_seed, "seed": seed, "space": space, "spatial": spatial, "model": model,
             "site": site, "label": int(label), "score": float(value)}
            for site, (labels, values) in scores.items() for label, value in zip(labels, values)]


def reserved_seed_arguments(parser, cohort_seeds, scores: Path, seed_help: str = "splits, initialisation") -> None:
    """The options every benchmark on reserved cohort seeds shares (heldout.py, unseen_site.py,
    regimes.py): which cohort seeds, the run seed, the cohort's size, where the per-subject scores
    live, and --table-only to recompute the tables from them."""
    parser.add_argument("--cohort-seeds", type=int, nargs="+", default=list(cohort_seeds))
    parser.add_argument("--seed", type=int, default=0, help=f"the run seed ({seed_help})")
    parser.add_argument("--subjects", type=int, default=120, help="per site (the default run's cohort: 120)")
    parser.add_argument("--scores", type=Path, default=scores)
    parser.add_argument("--table-only", action="store_true", help="recompute the tables from --scores, run nothing")


def read_scores(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def auc_table(rows: list[dict]) -> tuple[str, dict]:
    """Mean per-site test AUC per (cohort seed, run seed) and pipeline, recomputed from the scores."""
    runs: dict[tuple, dict] = {}
    for row in rows:
        key = (row["cohort_seed"], row["seed"])
        entry = runs.setdefault(key, {}).setdefault((row["space"], row["spatial"], row["model"]), {})
        labels, values = entry.setdefault(row["site"], ([], []))
        labels.append(row["label"])
        values.append(row["score"])
    columns = [("template", "template", "cmvim"), ("template", "template", "linear"), ("scanner", "template", "cmvim"),
               ("scanner", "template", "linear"), ("template", "none", "cmvim"), ("scanner", "none", "cmvim")]
    table, values = [], {c: [] for c in columns}
    diffs = []
    for key in sorted(runs):
        found = runs[key]
        aucs = {c: mean_site_auc({s: (np.array(v[0]), np.array(v[1])) for s, v in found[c].items()})
                if c in found else float("nan") for c in columns}
        for c in columns:
            values[c].append(aucs[c])
        diff = aucs[columns[2]] - aucs[columns[0]]
        diffs.append(diff)
        table.append([key[0], key[1]] + [f"{aucs[c]:.3f}" if np.isfinite(aucs[c]) else "" for c in columns]
                     + [f"{diff:+.3f}" if np.isfinite(diff) else ""])

    def summary(xs: list[float]) -> str:
        xs = [x for x in xs if np.isfinite(x)]
        if not xs:
            return ""
        return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    table.append(["mean ± SD", ""] + [summary(values[c]) for c in columns] + [summary(diffs)])
    headers = ["cohort seed", "run seed", "template space: CMViM", "template: linear", "scanner space: CMViM",
               "scanner: linear", "template, spatial none: CMViM", "scanner, spatial none: CMViM",
               "scanner - template (CMViM)"]
    means = {c: float(np.nanmean(values[c])) if any(np.isfinite(values[c])) else float("nan") for c in columns}
    return format_table(headers, table), means


def extraction_table(cohort_seed: int, subjects: int, margins: list[str]) -> str:
    """Brain extraction variants on one cohort seed, cheaply (the transforms are cached): for each
    `registration.brain_margin_mm` (a number, or "none": no extraction), how close each scanner-space
    visit's model input is to the same subject's template-space input (correlation over the model
    grid, median over visits, per modality), and the linear baseline's mean per-site test AUC."""
    import contextlib
    import io

    from cmvim.simulations.baselines import linear_test_scores
    from cmvim.simulations.assembly import prepare_sites

    def load(path: Path, spatial: str, margin):
        cfg = run_config_for(path, spatial, 0)
        cfg.preprocess.registration.brain_margin_mm = margin
        with contextlib.redirect_stdout(io.StringIO()):
            return cfg, prepare_sites(cfg)

    ref_cfg, reference = load(cohort(cohort_seed, subjects, "template"), "none", None)
    ref_arrays = {(name, r.entry.subject_id): site.cache.load(r.key) for name, site in reference.items()
                  for r in site.records}
    rows = [["template space, spatial none (reference)", "1", "1", f"{mean_site_auc(linear_test_scores(ref_cfg, reference)[0]):.3f}"]]
    for margin in margins:
        value = None if margin == "none" else float(margin)
        cfg, sites = load(cohort(cohort_seed, subjects, "scanner"), "template", value)
        fidelity = {"mri": [], "pet": []}
        for name, site in sites.items():
            for record in site.records:
                arrays, ref = site.cache.load(record.key), ref_arrays.get((name, record.entry.subject_id))
                for modality in fidelity:
                    if ref is not None and modality in arrays and modality in ref:
                        fidelity[modality].append(np.corrcoef(arrays[modality].ravel(), ref[modality].ravel())[0, 1])
        label = "no extraction" if value is None else f"template brain mask + {value:g} mm"
        rows.append([f"scanner space, {label}", f"{np.median(fidelity['mri']):.3f}", f"{np.median(fidelity['pet']):.3f}",
                     f"{mean_site_auc(linear_test_scores(cfg, sites)[0]):.3f}"])
    return format_table(["model input", "MRI vs template-space input (median r)", "PET (median r)",
                         "linear baseline, mean per-site AUC"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort-seeds", type=int, nargs="+", default=list(RESERVED_COHORT_SEEDS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="run seeds (splits, initialisation)")
    parser.add_argument("--subjects", type=int, default=120, help="per site (the default run's cohort: 120)")
    parser.add_argument("--timing-visits", type=int, default=20, help="visits per site timed on one core")
    parser.add_argument("--scores", type=Path, default=ROOT / "docs" / "benchmarks" / "registration_scores.jsonl")
    parser.add_argument("--skip-auc", action="store_true", help="registration error and time only")
    parser.add_argument("--references", action="store_true",
                        help="also run both cohorts without registration (spatial none): the pipeline before")
    parser.add_argument("--extraction", nargs="+", metavar="MM|none",
                        help="only compare brain extraction margins (mm, or none) on the first cohort seed: input "
                             "fidelity and the linear baseline (the transforms are cached, so this is quick)")
    parser.add_argument("--steps", type=int, metavar="VISITS",
                        help="only time each registration step on the first cohort seed's scanner space, "
                             "site A's first VISITS visits, one core")
    args = parser.parse_args()
    if args.steps:
        root = cohort(args.cohort_seeds[0], args.subjects, "scanner")
        cfg = run_config_for(root, "template", 0)
        print(f"cohort seed {args.cohort_seeds[0]}, scanner space: registration steps on one core")
        print(step_times(root, cfg, args.steps))
        return
    if args.extraction:
        print(extraction_table(args.cohort_seeds[0], args.subjects, args.extraction))
        return

    points = brain_points()
    reg_rows, all_errors, first_times, cached_times = [], {"mri": [], "pet": []}, [], []
    done = {(r["cohort_seed"], r["seed"], r["space"], r["spatial"], r["model"]) for r in read_scores(args.scores)}
    for cohort_seed in args.cohort_seeds:
        scanner = cohort(cohort_seed, args.subjects, "scanner")
        cfg = run_config_for(scanner, "template", 0)
        first, cached = timing(scanner, cfg, args.timing_visits)
        first_times.append(first)
        cached_times.append(cached)
        from cmvim.simulations.assembly import prepare_sites
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            sites = prepare_sites(cfg)
        errors = registration_errors(scanner, sites, points)
        for modality in ("mri", "pet"):
            all_errors[modality] += errors[modality]
        mri, pet = np.array(errors["mri"]), np.array(errors["pet"])
        reg_rows.append([cohort_seed, len(mri), f"{np.median(mri):.2f}", f"{np.percentile(mri, 95):.2f}",
                         f"{mri.max():.2f}", len(pet), f"{np.median(pet):.2f}", f"{np.percentile(pet, 95):.2f}",
                         f"{pet.max():.2f}", len(errors["failed"]), f"{first:.2f}", f"{cached:.3f}",
                         f"{first / cached:.0f}x"])
        print(f"cohort seed {cohort_seed}: registered {len(mri)} T1s, {len(pet)} PETs; "
              f"{first:.2f} s per visit first run, {cached:.3f} s cached", flush=True)
        if args.skip_auc:
            continue
        runs = [("template", "template"), ("scanner", "template")]
        runs += [("template", "none"), ("scanner", "none")] if args.references else []
        for seed in args.seeds:
            for space, spatial in runs:
                if (cohort_seed, seed, space, spatial, "cmvim") in done:
                    continue
                start = time.perf_counter()
                path = scanner if space == "scanner" else cohort(cohort_seed, args.subjects, "template")
                model, linear, _ = default_run_scores(run_config_for(path, spatial, seed))
                rows = score_rows(cohort_seed, seed, space, spatial, "cmvim", model)
                rows += score_rows(cohort_seed, seed, space, spatial, "linear", linear)
                args.scores.parent.mkdir(parents=True, exist_ok=True)
                with args.scores.open("a") as fh:
                    fh.writelines(json.dumps(r) + "\n" for r in rows)
                print(f"  cohort seed {cohort_seed} run seed {seed} {space} space, spatial {spatial}: mean per-site "
                      f"AUC {mean_site_auc(model):.3f}, linear {mean_site_auc(linear):.3f} "
                      f"[{(time.perf_counter() - start) / 60:.1f} min]", flush=True)

    print("\nRegistration against the generator's known transforms (mean distance over the template's brain, mm) "
          "and time per visit on one core")
    print(format_table(["cohort seed", "T1s", "T1 median", "T1 p95", "T1 max", "PETs", "PET median", "PET p95",
                        "PET max", "failed QC", "s / visit, first run", "s / visit, cached", "first / cached"],
                       reg_rows))
    mri = np.array(all_errors["mri"])
    median, per_subject = float(np.median(mri)), float(np.mean(first_times))
    line = f"registration: median error {median:.2f} mm, {per_subject:.2f} s per subject"
    rows = [r for r in read_scores(args.scores) if r["cohort_seed"] in args.cohort_seeds and r["seed"] in args.seeds]
    if rows:
        table, means = auc_table(rows)
        print("\nMean per-site test AUC, the default run (recomputed from " + str(args.scores.relative_to(ROOT)
              if args.scores.is_relative_to(ROOT) else args.scores) + ")")
        print(table)
        line += (f", scanner-space AUC {means[('scanner', 'template', 'cmvim')]:.3f} vs template "
                 f"{means[('template', 'template', 'cmvim')]:.3f}")
    print("\n" + line)


if __name__ == "__main__":
    main()
