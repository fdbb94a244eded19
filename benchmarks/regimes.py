"""Regimes where block means should fail (issue #32): the frozen recipe (simulations/configs/quick.yaml
as committed, its rounds in this process as benchmarks/heldout.py runs them), a fresh encoder on the
same fine-tuning schedule, the supervised 3D CNN (`baselines: cnn3d`: FedAvg, the recipe's
selection rule; model `cnn3d` on the recipe's fine-tuning schedule, `cnn3d own schedule` on the
run config's `cnn3d` section, chosen by benchmarks/cnn_schedule.py) and the linear baseline
(block means), on cohorts built to be harder than the default one:

  default      the default cohort (3 sites x 120 subjects, effect scale 1): the reference row
  effect 0.5   every disease effect at half its literature size
  subtypes     AD and MCI subjects split into typical, limbic-predominant and hippocampal-sparing
               atrophy/hypometabolism patterns (simulations/cohort.py SUBTYPES): no one region
               separates the classes
  progression  two visits a year apart per subject, the disease progressing between them (60
               subjects a site: the same 120 visits as the others); every visit is scored and a
               subject's score is the mean of its visits' (the table is per subject)
  CN vs MCI    the default cohort, the task CN vs MCI (model.positive: MCI; AD subjects have no
               class): MCI subjects carry ~0.45 of an AD subject's effects (docs/cohort.md)

    PYTHONPATH=. python benchmarks/regimes.py [--regimes subtypes ...] [--cohort-seeds 71 72]
    PYTHONPATH=. python benchmarks/regimes.py --table-only

Reserved cohort seeds: 71, 72, 73 (no choice was made on them; keep it so). Run seed 0. Every test
subject's score goes to docs/benchmarks/regime_scores.jsonl at full precision, with its site, its
index among the site's test subjects and its visit, so --table-only recomputes every number.
± is the SD over cohort seeds; the paired difference to the linear baseline is per cohort seed
(pooled test subjects) with its stratified-bootstrap 95% CI in the per-seed table.
"""
from __future__ import annotations

import argparse
import functools
import contextlib
import io
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # benchmarks/ssl.py: not the ssl module
sys.path.insert(0, str(ROOT))

from cmvim.metrics import auc_or_nan, stratified_auc_ci  # noqa: E402
from cmvim.tables import ci_text, format_table, mean_sd  # noqa: E402

RESERVED_COHORT_SEEDS = (71, 72, 73)
SCORES = ROOT / "docs" / "benchmarks" / "regime_scores.jsonl"
EFFECTS = ROOT / "docs" / "benchmarks" / "regime_effects.json"
REGIMES = {
    "default": {},
    "effect 0.5": {"effect_scale": 0.5},
    "subtypes": {"subtypes": True},
    "progression": {"visits": 2},
    "CN vs MCI": {},
}
# the task where a regime's differs from the recipe's AD vs CN (ModelConfig.positive)
REGIME_POSITIVE = {"CN vs MCI": "MCI"}
MODELS = ("linear", "cnn3d", "cnn3d own schedule", "cmvim fresh", "cmvim pretrained")
# which schedule each CNN row trains on: the recipe's fine-tuning schedule (the rows measured before
# the CNN had its own: `cnn3d: null`), or the run config's `cnn3d` section (benchmarks/cnn_schedule.py)
CNN_SCHEDULES = {"cnn3d": "fine-tuning", "cnn3d own schedule": "own"}
# subjects per site where a regime's differs from --subjects: progression's two visits a subject
# make 60 subjects the same 120 visits a site as the other regimes (and the same training cost)
REGIME_SUBJECTS = {"progression": 60}


@functools.cache
def _bench(name: str):
    """A sibling benchmark script by path: benchmarks/ is no package, and its ssl.py must not shadow ssl."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"cmvim_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def regime_cohort(regime: str, cohort_seed: int, subjects: int) -> Path:
    from cmvim.simulations.cohort import CohortConfig, cached_cohort
    return cached_cohort(CohortConfig(sites=3, subjects=REGIME_SUBJECTS.get(regime, subjects), shape=64,
                                      seed=cohort_seed, **REGIMES[regime]))


def test_keys(site, classes) -> list[tuple[int, int]]:
    """(subject index within the site's test split, visit number) of each labelled test visit, in
    the order a task scores them; no subject id leaves this function."""
    records = site.subset("test", True, classes)
    subjects: dict[str, int] = {}
    return [(subjects.setdefault(r.entry.subject_id, len(subjects)), int(r.entry.visit or 1)) for r in records]


def model_scores(cfg, sites: dict, model: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{site: (is the task's positive 0/1, P(positive)) of its labelled test visits} of one model
    trained on every site."""
    from cmvim.cnn3d import CnnTask
    from cmvim.simulations.baselines import linear_test_scores, train_cnn3d, train_rounds
    from cmvim.site_task import SiteTask
    from cmvim.weights import initial_state

    if model == "linear":
        return linear_test_scores(cfg, sites)[0]
    if model in CNN_SCHEDULES:
        cnn_cfg = replace(cfg, cnn3d=None) if CNN_SCHEDULES[model] == "fine-tuning" else cfg
        tasks = [CnnTask(cnn_cfg, [site], name) for name, site in sites.items()]
        shared = train_cnn3d(cnn_cfg, tasks)
        return {task.name: task.predict(shared, {}, "test") for task in tasks}
    tasks = [SiteTask(cfg, [site], name) for name, site in sites.items()]
    if model == "cmvim fresh":
        fresh = replace(cfg, finetune_init="fresh")
        start = initial_state(fresh, "finetune")
    else:
        pretrained, _ = train_rounds(cfg, tasks, "pretrain", initial_state(cfg, "pretrain"))
        start = initial_state(cfg, "finetune", pretrained)
    final, local = train_rounds(cfg, tasks, "finetune", start)
    return {task.name: task.predict(final, local[task.name], "test") for task in tasks}


def run(regime: str, cohort_seed: int, seed: int, subjects: int, models: list[str], scores_path: Path,
        done: set) -> list[dict]:
    import torch

    from cmvim.simulations.assembly import prepare_sites
    bench = _bench("registration")
    torch.set_num_threads(1)
    cohort = regime_cohort(regime, cohort_seed, subjects)
    record_effects(regime, cohort_seed, cohort)
    cfg = bench.run_config_for(cohort, "template", seed)
    if regime in REGIME_POSITIVE:
        cfg = replace(cfg, model=replace(cfg.model, positive=REGIME_POSITIVE[regime]))
    with contextlib.redirect_stdout(io.StringIO()):
        sites = prepare_sites(cfg)
    keys = {name: test_keys(site, cfg.model.classes) for name, site in sites.items()}
    rows = []
    for model in models:
        if (regime, cohort_seed, seed, model) in done:
            continue
        start = time.perf_counter()
        scores = model_scores(cfg, sites, model)
        new = [{"regime": regime, "cohort_seed": cohort_seed, "seed": seed, "model": model, "site": name,
                "subject": subject, "visit": visit, "label": int(label), "score": float(score)}
               for name, (labels, values) in scores.items()
               for (subject, visit), label, score in zip(keys[name], labels, values)]
        with scores_path.open("a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in new)
        rows += new
        mean = np.nanmean([auc_or_nan(*per_subject(new, name)) for name in scores])
        print(f"  {regime}, cohort seed {cohort_seed}: {model} mean per-site AUC {mean:.3f} "
              f"[{time.perf_counter() - start:.0f} s]", flush=True)
    return rows


def per_subject(rows: list[dict], site: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(label, score) per subject (the mean of its visits' scores) of rows, one site or all pooled."""
    subjects: dict = {}
    for r in rows:
        if site is None or r["site"] == site:
            entry = subjects.setdefault((r["site"], r["subject"]), [r["label"], []])
            entry[1].append(r["score"])
    keys = sorted(subjects)
    return (np.array([subjects[k][0] for k in keys], dtype=int),
            np.array([float(np.mean(subjects[k][1])) for k in keys]))


def tables(rows: list[dict]) -> tuple[str, str]:
    """(per regime and model: mean over cohort seeds; per regime, cohort seed and model: pooled AUC and
    the paired difference to the linear baseline with its CI)."""
    runs: dict = {}
    for r in rows:
        runs.setdefault((r["regime"], r["cohort_seed"], r["seed"]), {}).setdefault(r["model"], []).append(r)
    summary: dict = {}
    detail = []
    order = {name: i for i, name in enumerate(REGIMES)}
    for key in sorted(runs, key=lambda k: (order.get(k[0], 99), k[1], k[2])):
        by_model = runs[key]
        linear = per_subject(by_model["linear"]) if "linear" in by_model else None
        for model in MODELS:
            if model not in by_model:
                continue
            rows_m = by_model[model]
            sites = sorted({r["site"] for r in rows_m})
            mean_site = float(np.nanmean([auc_or_nan(*per_subject(rows_m, s)) for s in sites]))
            labels, scores = per_subject(rows_m)
            pooled = auc_or_nan(labels, scores)
            diff, ci = float("nan"), [float("nan")] * 2
            if linear is not None and model != "linear" and np.array_equal(linear[0], labels):
                diff = pooled - auc_or_nan(*linear)
                ci = stratified_auc_ci(labels, scores, linear[1])
            cell = summary.setdefault((key[0], model), {"site": [], "pooled": [], "diff": []})
            cell["site"].append(mean_site)
            cell["pooled"].append(pooled)
            cell["diff"].append(diff)
            detail.append([key[0], key[1], model, len(labels), int(labels.sum()), f"{mean_site:.3f}",
                           f"{pooled:.3f}", "" if model == "linear" else f"{diff:+.3f} {ci_text(ci, '+')}"])
    summary_rows = []
    for (regime, model), cell in sorted(summary.items(), key=lambda kv: (order.get(kv[0][0], 99),
                                                                         MODELS.index(kv[0][1]))):
        summary_rows.append([regime, model, len(cell["site"]), mean_sd(cell["site"]), mean_sd(cell["pooled"]),
                             "" if model == "linear" else mean_sd(cell["diff"], "+")])
    return (format_table(["regime", "model", "cohort seeds", "mean per-site AUC", "pooled AUC",
                          "pooled - linear"], summary_rows),
            format_table(["regime", "cohort seed", "model", "test subjects", "positive", "mean per-site AUC",
                          "pooled AUC", "pooled - linear (95% CI)"], detail))


def record_effects(regime: str, cohort_seed: int, cohort: Path, path: Path = EFFECTS) -> None:
    """The disease effects measured on a regime cohort's written files (its cohort.json), kept beside
    the scores so the effect table needs no cohort."""
    effects = json.loads(path.read_text()) if path.exists() else {}
    effects[f"{regime}/{cohort_seed}"] = json.loads((cohort / "cohort.json").read_text())["effects"]
    path.write_text(json.dumps(effects, indent=1, sort_keys=True) + "\n")


def effect_table(path: Path = EFFECTS) -> str:
    """AD vs CN Cohen's d of the measures cmvim-cohort reports, per regime cohort (and per subtype)."""
    effects = json.loads(path.read_text()) if path.exists() else {}
    order = {name: i for i, name in enumerate(REGIMES)}
    rows = []
    for key in sorted(effects, key=lambda k: (order.get(k.split("/")[0], 99), k)):
        regime, seed = key.split("/")
        row = [regime, seed]
        for feature in ("hippocampal_tissue_ml", "pcc_suvr"):
            entry = effects[key][feature]
            row.append(f"{entry.get('AD_vs_CN_d', float('nan')):.2f}")
            subtypes = sorted(k for k in entry if k.startswith("AD_") and k.endswith("_vs_CN_d") and k != "AD_vs_CN_d")
            row.append(", ".join(f"{k[3:-8]} {entry[k]:.2f}" for k in subtypes))
        row += [f"{effects[key][feature].get('MCI_vs_CN_d', float('nan')):.2f}"
                for feature in ("hippocampal_tissue_ml", "pcc_suvr")]
        rows.append(row)
    return format_table(["regime", "cohort seed", "hippocampus AD vs CN d", "by subtype", "PCC SUVR AD vs CN d",
                         "by subtype", "hippocampus MCI vs CN d", "PCC SUVR MCI vs CN d"], rows)


def main() -> None:
    bench = _bench("registration")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    bench.reserved_seed_arguments(parser, RESERVED_COHORT_SEEDS, SCORES)
    args = parser.parse_args()
    rows = bench.read_scores(args.scores)
    if not args.table_only:
        for regime in args.regimes:                  # a regime over its cohort seeds before the next regime
            for cohort_seed in args.cohort_seeds:
                done = {(r["regime"], r["cohort_seed"], r["seed"], r["model"]) for r in rows}
                if all((regime, cohort_seed, args.seed, m) in done for m in args.models):
                    continue
                print(f"{regime}, cohort seed {cohort_seed}: building the cohort, registering, training ...",
                      flush=True)
                rows += run(regime, cohort_seed, args.seed, args.subjects, args.models, args.scores, done)
    summary, detail = tables(rows)
    print(f"\nper cohort seed (test subjects pooled over the sites; 95% CI: stratified bootstrap, 2000 redraws)\n"
          f"{detail}\n")
    print(f"over cohort seeds (± SD over cohort seeds)\n{summary}\n")
    print(f"disease effects measured on the written files (cmvim-cohort's measures; all subjects)\n{effect_table()}")


if __name__ == "__main__":
    main()
