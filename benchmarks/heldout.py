"""The frozen recipe on cohorts no choice saw (issue #32): the default config as committed
(simulations/configs/quick.yaml, its rounds run in this process as benchmarks/registration.py runs
them: FedAvg over the three sites, the run's selection rule) on cohort seeds reserved for this
table, beside the linear baseline on the same splits. Every number is recomputed from the
per-subject test scores this script stores (docs/benchmarks/heldout_scores.jsonl, full precision).

    PYTHONPATH=. python benchmarks/heldout.py                  # runs the reserved seeds not yet stored
    PYTHONPATH=. python benchmarks/heldout.py --table-only     # the table from the stored scores

Reserved cohort seeds: 51, 52, 53. They were never used for any choice (registration tuning used
3, 11, 12; its report 31-33; the recipe's own choices cohort seed 0 and its re-splits) and must
never be: a change chosen by looking at this table turns them into tuning seeds.

Per cohort seed: each site's test AUC with a 95% stratified bootstrap CI (AD and CN subjects
redrawn apart, 2000 redraws), the mean per-site AUC, the pooled AUC over all sites' test
subjects with its CI, and the paired pooled difference CMViM - linear with its CI (the same
subjects redrawn for both). Across cohort seeds: mean ± SD (SD over the cohort seeds).

    PYTHONPATH=. python benchmarks/heldout.py --cnn            # + the 3D CNN where it is not stored

--cnn adds the supervised 3D CNN (`baselines: cnn3d`: FedAvg, its own schedule, the run config's
`cnn3d` section, chosen on the tuning cohort by benchmarks/cnn_schedule.py) on the same splits;
the tables show it once every stored cohort seed has it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # benchmarks/ssl.py: not the ssl module
sys.path.insert(0, str(ROOT))

from cmvim.metrics import auc_or_nan, stratified_auc_ci as stratified_ci  # noqa: E402
from cmvim.tables import ci_text, format_table, mean_sd  # noqa: E402


def _bench(name: str):
    """A sibling benchmark script by path (registration.py: its cohort, config and in-process
    default run; regimes.py: its model_scores): benchmarks/ is no package, and its ssl.py must not
    shadow the ssl module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"cmvim_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RESERVED_COHORT_SEEDS = (51, 52, 53)
SCORES = ROOT / "docs" / "benchmarks" / "heldout_scores.jsonl"
MODELS = ("cmvim", "linear")
CNN = "cnn3d"             # the 3D CNN on its own schedule: a column once every cohort seed has it (--cnn)


def cnn_scores(cfg) -> dict:
    """{site: (labels, scores)} of the 3D CNN on its own schedule, trained on the run's splits."""
    import contextlib
    import io

    import torch

    from cmvim.simulations.assembly import prepare_sites
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(io.StringIO()):
        sites = prepare_sites(cfg)
    return _bench("regimes").model_scores(cfg, sites, "cnn3d own schedule")


def score_rows(cohort_seed: int, seed: int, model: str, scores: dict) -> list[dict]:
    """One row per test subject: its site, index within the site's test split, label (1 = AD), score."""
    return [{"cohort_seed": cohort_seed, "seed": seed, "model": model, "site": site, "index": i, "label": int(label),
             "score": float(value)}
            for site, (labels, values) in scores.items() for i, (label, value) in enumerate(zip(labels, values))]


def _group(rows: list[dict]) -> dict:
    """{(cohort seed, seed): {model: {site: (labels, scores)}}}, subjects in stored order."""
    runs: dict = {}
    for row in rows:
        site = runs.setdefault((row["cohort_seed"], row["seed"]), {}).setdefault(row["model"], {}).setdefault(
            row["site"], ([], []))
        site[0].append(row["label"])
        site[1].append(row["score"])
    return {key: {m: {s: (np.array(v[0]), np.array(v[1])) for s, v in by.items()} for m, by in models.items()}
            for key, models in runs.items()}


def tables(rows: list[dict]) -> tuple[str, str, str]:
    """(per-site table, per-cohort table, last line), recomputed from the stored scores."""
    runs = {key: found for key, found in _group(rows).items() if all(m in found for m in MODELS)}
    models = (*MODELS, CNN) if runs and all(CNN in found for found in runs.values()) else MODELS
    site_rows, cohort_rows, summary = [], [], {m: [] for m in (*models, "diff", "cnn diff")}
    for key in sorted(runs):
        found = runs[key]
        for model in models:                   # every model scored the same subjects in the same order
            assert all(np.array_equal(found[model][s][0], found["cmvim"][s][0]) for s in found["cmvim"]), (key, model)
        for site in sorted(found["cmvim"]):
            labels = found["cmvim"][site][0]
            cells = []
            for model in models:
                scores = found[model][site][1]
                cells += [f"{auc_or_nan(labels, scores):.3f}", ci_text(stratified_ci(labels, scores))]
            site_rows.append([key[0], site, int(labels.sum()), int((labels == 0).sum()), *cells])
        pooled = {m: (np.concatenate([found[m][s][0] for s in sorted(found[m])]),
                      np.concatenate([found[m][s][1] for s in sorted(found[m])])) for m in models}
        labels = pooled["cmvim"][0]
        means = {m: float(np.nanmean([auc_or_nan(*found[m][s]) for s in found[m]])) for m in models}
        aucs = {m: auc_or_nan(labels, pooled[m][1]) for m in models}
        diffs = {m: aucs[m] - aucs["linear"] for m in models if m != "linear"}
        cohort_rows.append([key[0], key[1], len(labels), *(f"{means[m]:.3f}" for m in models),
                            *(f"{aucs[m]:.3f} {ci_text(stratified_ci(labels, pooled[m][1]))}" for m in models),
                            *(f"{diffs[m]:+.3f} {ci_text(stratified_ci(labels, pooled[m][1], pooled['linear'][1]))}"
                              for m in diffs)])
        for model in models:
            summary[model].append(means[model])
        summary["diff"].append(diffs["cmvim"])
        if CNN in diffs:
            summary["cnn diff"].append(diffs[CNN])

    names = {"cmvim": "CMViM", "linear": "linear", CNN: "3D CNN"}
    others = [m for m in models if m != "linear"]
    if len(cohort_rows) > 1:
        cohort_rows.append(["mean ± SD over cohort seeds", "", "", *(mean_sd(summary[m]) for m in models),
                            *([""] * len(models)), mean_sd(summary["diff"], "+"),
                            *([mean_sd(summary["cnn diff"], "+")] if CNN in models else [])])
    per_site = format_table(["cohort seed", "site", "AD", "CN", *(h for m in models for h in (f"{names[m]} AUC", "95% CI"))],
                            site_rows)
    per_cohort = format_table(["cohort seed", "run seed", "test subjects",
                               *(f"{names[m]} mean per-site AUC" for m in models),
                               *(f"{names[m]} pooled AUC (95% CI)" for m in models),
                               *(f"pooled {names[m]} - linear (95% CI)" for m in others)], cohort_rows)
    last = (f"held-out (cohort seeds {', '.join(str(k[0]) for k in sorted(runs))}): CMViM mean per-site AUC "
            f"{mean_sd(summary['cmvim'])} vs linear {mean_sd(summary['linear'])}; "
            f"pooled difference {mean_sd(summary['diff'], '+')}"
            + (f"; 3D CNN {mean_sd(summary[CNN])} (pooled - linear {mean_sd(summary['cnn diff'], '+')})"
               if CNN in models else ""))
    return per_site, per_cohort, last


def main() -> None:
    bench = _bench("registration")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.reserved_seed_arguments(parser, RESERVED_COHORT_SEEDS, SCORES)
    parser.add_argument("--cnn", action="store_true", help="also the 3D CNN on its own schedule where not stored")
    args = parser.parse_args()
    rows = bench.read_scores(args.scores)
    if not args.table_only:
        done = {(r["cohort_seed"], r["seed"]) for r in rows}
        for cohort_seed in args.cohort_seeds:
            if (cohort_seed, args.seed) in done:
                print(f"cohort seed {cohort_seed}, run seed {args.seed}: stored, not run again", flush=True)
                continue
            print(f"cohort seed {cohort_seed}: building, registering and running the default recipe ...", flush=True)
            cfg = bench.run_config_for(bench.cohort(cohort_seed, args.subjects, "template"), "template", args.seed)
            model, linear, _ = bench.default_run_scores(cfg)
            new = score_rows(cohort_seed, args.seed, "cmvim", model) + score_rows(cohort_seed, args.seed, "linear",
                                                                                   linear)
            with args.scores.open("a") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in new)
            rows += new
        for cohort_seed in args.cohort_seeds if args.cnn else ():
            if any((r["cohort_seed"], r["seed"], r["model"]) == (cohort_seed, args.seed, CNN) for r in rows):
                continue
            print(f"cohort seed {cohort_seed}: the 3D CNN on its own schedule ...", flush=True)
            cfg = bench.run_config_for(bench.cohort(cohort_seed, args.subjects, "template"), "template", args.seed)
            new = score_rows(cohort_seed, args.seed, CNN, cnn_scores(cfg))
            with args.scores.open("a") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in new)
            rows += new
    per_site, per_cohort, last = tables(rows)
    print(f"\nper site (test split; 95% CI: stratified bootstrap, 2000 redraws)\n{per_site}\n")
    print(f"per cohort seed\n{per_cohort}\n")
    print(last)


if __name__ == "__main__":
    main()
