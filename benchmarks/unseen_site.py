"""An unseen hospital (issue #32): leave one site out. The frozen recipe (simulations/configs/quick.yaml
as committed, its rounds in this process as benchmarks/heldout.py runs them) federates on the other
sites - pretraining on their scans, fine-tuning on their labels - and the site left out scores its
own test split with the model as it comes, then with 10, 25 and 50 % of its own labelled
(train + val) subjects used to adapt it. The linear baseline (block means) is fitted on the same
sites and adapted with the same labels.

    PYTHONPATH=. python benchmarks/unseen_site.py                 # runs what is not stored yet
    PYTHONPATH=. python benchmarks/unseen_site.py --table-only    # the tables from the stored scores

Reserved cohort seeds: 61, 62, 63 (default cohort: 3 sites x 120 subjects, effect scale 1,
template space through the default registration). No choice was ever made on them; keep it so.

Conditions, at the site left out (its test split throughout; local labels drawn from its labelled
train + val subjects, stratified by class, at least 2 of each, --draws draws per fraction):
  cmvim zero-shot       the federated model as exported
  cmvim head refit      the model's own head refitted on the local labels, encoder frozen, as the
                        recipe's probe rounds fit it (probe_epochs at probe_lr, from the federated head)
  cmvim features + LR   a logistic regression (cmvim.linear.fit_logistic) on the frozen federated
                        encoder's features, local labels only
  linear zero-shot      the linear baseline fitted on the federated sites' labelled train + val
  linear local          the same fit on the local labels only (a hospital alone with block means)
  linear sites + local  the federated sites' labels and the local ones pooled
Every test subject's score goes to docs/benchmarks/unseen_site_scores.jsonl (full precision), so
each number is recomputed by --table-only. ± is the SD over cohort seeds x sites left out (and
over draws for the label fractions); 95% CIs of the zero-shot AUCs: stratified bootstrap.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # benchmarks/ssl.py: not the ssl module
sys.path.insert(0, str(ROOT))

from cmvim.metrics import auc_or_nan, stratified_auc_ci  # noqa: E402
from cmvim.tables import ci_text, format_table, mean_sd  # noqa: E402

RESERVED_COHORT_SEEDS = (61, 62, 63)
SCORES = ROOT / "docs" / "benchmarks" / "unseen_site_scores.jsonl"
FRACTIONS = (0.1, 0.25, 0.5)
ZERO_SHOT = ("cmvim zero-shot", "linear zero-shot")
ADAPTED = ("cmvim head refit", "cmvim features + LR", "linear local", "linear sites + local")


def _bench(name: str):
    """A sibling benchmark script by path: benchmarks/ is no package, and its ssl.py must not shadow ssl."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"cmvim_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def local_draws(records: list, binary: np.ndarray, fraction: float, draws: int, seed: int) -> list[list[int]]:
    """`draws` stratified draws of indices into records: round(fraction x n) of each class, at least 2."""
    out = []
    for draw in range(draws):
        rng = np.random.default_rng([seed, int(fraction * 1000), draw])
        chosen = []
        for cls in (0, 1):
            members = np.flatnonzero(binary == cls)
            take = min(len(members), max(2, int(round(fraction * len(members)))))
            chosen += rng.choice(members, take, replace=False).tolist()
        out.append(sorted(chosen))
    return out


def block_means(cfg, site, records: list) -> tuple[np.ndarray, np.ndarray]:
    """(is AD 0/1, the linear baseline's features) of records."""
    from cmvim.data import SiteDataset, make_loader
    from cmvim.linear import collect, regional_means
    dataset = SiteDataset(site, list(records), cfg.model.classes)
    x, y = collect(make_loader(dataset, 16, False), lambda batch: regional_means(batch, cfg.linear.grid))
    return (y == cfg.model.num_classes - 1).astype(int), x


def leave_one_out(cfg, sites: dict, held_out: str, fractions, draws: int, say=print) -> list[dict]:
    """Every condition's test scores at the site `held_out`, as rows (without the cohort seed)."""
    import torch

    from cmvim.linear import fit_logistic, positive_scores
    from cmvim.simulations.baselines import train_rounds
    from cmvim.site_task import SiteTask
    from cmvim.weights import initial_state

    torch.set_num_threads(1)
    federated = {name: site for name, site in sites.items() if name != held_out}
    tasks = [SiteTask(cfg, [site], name) for name, site in federated.items()]
    say(f"  {held_out} left out: federating on {', '.join(federated)} ...")
    pretrained, _ = train_rounds(cfg, tasks, "pretrain", initial_state(cfg, "pretrain"))
    final, _ = train_rounds(cfg, tasks, "finetune", initial_state(cfg, "finetune", pretrained))

    site = sites[held_out]
    target = SiteTask(cfg, [site], held_out)
    classes = cfg.model.classes
    test = site.subset("test", True, classes)
    pool = site.subset("train", True, classes) + site.subset("val", True, classes)
    rows = []

    def keep(condition: str, fraction: float, draw: int, labels, scores, n_local: int):
        rows.extend({"held_out": held_out, "condition": condition, "fraction": fraction, "draw": draw,
                     "n_local": n_local, "index": i, "label": int(label), "score": float(score)}
                    for i, (label, score) in enumerate(zip(labels, scores)))

    labels, scores = target.predict(final, {}, "test")
    keep("cmvim zero-shot", 0.0, 0, labels, scores, 0)
    # the linear baseline fitted on the federated sites, features of every subject computed once
    parts = [block_means(cfg, s, s.subset("train", True, classes) + s.subset("val", True, classes))
             for s in federated.values()]
    y_sites, x_sites = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    y_test, x_test = block_means(cfg, site, test)
    y_pool, x_pool = block_means(cfg, site, pool)
    linear = fit_logistic(x_sites, y_sites, cfg.linear, seed=cfg.seed)
    keep("linear zero-shot", 0.0, 0, y_test, positive_scores(linear, x_test), 0)
    f_test_labels, f_test = target.features(final, {}, test)
    f_pool_labels, f_pool = target.features(final, {}, pool)
    assert (f_pool_labels == y_pool).all() and (f_test_labels == y_test).all()

    for fraction in fractions:
        for draw, chosen in enumerate(local_draws(pool, y_pool, fraction, draws, cfg.seed)):
            n = len(chosen)
            shared, local = target.refit_head(final, {}, [pool[i] for i in chosen])
            keep("cmvim head refit", fraction, draw, *target.predict(shared, local, "test"), n)
            probe = fit_logistic(f_pool[chosen], y_pool[chosen], cfg.linear, seed=cfg.seed)
            keep("cmvim features + LR", fraction, draw, y_test, positive_scores(probe, f_test), n)
            alone = fit_logistic(x_pool[chosen], y_pool[chosen], cfg.linear, seed=cfg.seed)
            keep("linear local", fraction, draw, y_test, positive_scores(alone, x_test), n)
            joined = fit_logistic(np.concatenate([x_sites, x_pool[chosen]]), np.r_[y_sites, y_pool[chosen]],
                                  cfg.linear, seed=cfg.seed)
            keep("linear sites + local", fraction, draw, y_test, positive_scores(joined, x_test), n)
        say(f"    {int(fraction * 100)} % of its labels ({n} subjects): "
            + ", ".join(f"{c} {_mean_auc(rows, c, fraction):.3f}" for c in ADAPTED))
    say("    zero-shot: " + ", ".join(f"{c} {_mean_auc(rows, c, 0.0):.3f}" for c in ZERO_SHOT))
    return rows


def _mean_auc(rows: list[dict], condition: str, fraction: float) -> float:
    draws: dict = {}
    for r in rows:
        if r["condition"] == condition and r["fraction"] == fraction:
            draws.setdefault(r["draw"], ([], []))
            draws[r["draw"]][0].append(r["label"])
            draws[r["draw"]][1].append(r["score"])
    return float(np.mean([auc_or_nan(np.array(y), np.array(s)) for y, s in draws.values()]))


def _runs(rows: list[dict]) -> dict:
    """{(cohort seed, seed, held out): {(condition, fraction, draw): (labels, scores, n_local)}}."""
    out: dict = {}
    for r in rows:
        cell = out.setdefault((r["cohort_seed"], r["seed"], r["held_out"]), {}).setdefault(
            (r["condition"], r["fraction"], r["draw"]), ([], [], r["n_local"]))
        cell[0].append(r["label"])
        cell[1].append(r["score"])
    return out


def tables(rows: list[dict]) -> tuple[str, str, str]:
    """(per site left out, summary by condition and fraction, last line)."""
    runs = _runs(rows)
    per_site = []
    for key in sorted(runs):
        cells = runs[key]
        labels, cm, _ = cells[("cmvim zero-shot", 0.0, 0)]
        labels = np.array(labels)
        cmvim, linear = np.array(cm), np.array(cells[("linear zero-shot", 0.0, 0)][1])
        per_site.append([key[0], key[2], int(labels.sum()), int((labels == 0).sum()),
                         f"{auc_or_nan(labels, cmvim):.3f} {ci_text(stratified_auc_ci(labels, cmvim))}",
                         f"{auc_or_nan(labels, linear):.3f} {ci_text(stratified_auc_ci(labels, linear))}",
                         f"{auc_or_nan(labels, cmvim) - auc_or_nan(labels, linear):+.3f} "
                         f"{ci_text(stratified_auc_ci(labels, cmvim, linear))}"])
    summary = []
    fractions = sorted({k[1] for cells in runs.values() for k in cells if k[1] > 0})
    for fraction in [0.0, *fractions]:
        conditions = ZERO_SHOT if fraction == 0.0 else ADAPTED
        n_local = sorted({c[2] for cells in runs.values() for k, c in cells.items() if k[1] == fraction})
        row = [("none (zero-shot)" if fraction == 0.0 else f"{int(fraction * 100)} %"),
               "0" if fraction == 0.0 else f"{n_local[0]}-{n_local[-1]}"]
        for condition in ("cmvim zero-shot", "cmvim head refit", "cmvim features + LR", "linear zero-shot",
                          "linear local", "linear sites + local"):
            if condition not in conditions:
                row.append("")
                continue
            aucs = [auc_or_nan(np.array(c[0]), np.array(c[1])) for cells in runs.values()
                    for k, c in cells.items() if k[0] == condition and k[1] == fraction]
            row.append(mean_sd(aucs))
        summary.append(row)
    per_site_table = format_table(["cohort seed", "site left out", "AD", "CN", "CMViM zero-shot AUC (95% CI)",
                                   "linear zero-shot AUC (95% CI)", "CMViM - linear (95% CI)"], per_site)
    summary_table = format_table(["local labels", "n local", "CMViM as is", "CMViM head refit",
                                  "CMViM features + LR", "linear (other sites)", "linear local only",
                                  "linear other sites + local"], summary)
    zero = {c: [auc_or_nan(np.array(cells[(c, 0.0, 0)][0]), np.array(cells[(c, 0.0, 0)][1]))
                for cells in runs.values() if (c, 0.0, 0) in cells] for c in ZERO_SHOT}
    last = (f"unseen site ({len(runs)} sites left out): CMViM zero-shot {mean_sd(zero['cmvim zero-shot'])} vs "
            f"linear {mean_sd(zero['linear zero-shot'])}")
    return per_site_table, summary_table, last


def main() -> None:
    bench = _bench("registration")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", nargs="+", default=["A", "B", "C"], help="the sites to leave out, one at a time")
    parser.add_argument("--draws", type=int, default=5, help="draws of local labels per fraction")
    bench.reserved_seed_arguments(parser, RESERVED_COHORT_SEEDS, SCORES,
                                  seed_help="splits, initialisation, draws")
    args = parser.parse_args()
    rows = bench.read_scores(args.scores)
    if not args.table_only:
        from cmvim.simulations.assembly import prepare_sites
        done = {(r["cohort_seed"], r["seed"], r["held_out"]) for r in rows}
        for cohort_seed in args.cohort_seeds:
            todo = [s for s in args.sites if (cohort_seed, args.seed, s) not in done]
            if not todo:
                print(f"cohort seed {cohort_seed}: stored, not run again", flush=True)
                continue
            print(f"cohort seed {cohort_seed}: building and registering the cohort ...", flush=True)
            cfg = bench.run_config_for(bench.cohort(cohort_seed, args.subjects, "template"), "template", args.seed)
            with contextlib.redirect_stdout(io.StringIO()):
                sites = prepare_sites(cfg)          # once a cohort seed: each site left out reads the same
            for held_out in todo:
                new = [{"cohort_seed": cohort_seed, "seed": args.seed, **r}
                       for r in leave_one_out(cfg, sites, held_out, FRACTIONS, args.draws,
                                              say=lambda m: print(m, flush=True))]
                with args.scores.open("a") as handle:
                    handle.writelines(json.dumps(r) + "\n" for r in new)
                rows += new
    per_site, summary, last = tables(rows)
    print(f"\nzero-shot at the site left out (its test split; 95% CI: stratified bootstrap, 2000 redraws)\n"
          f"{per_site}\n")
    print(f"with local labels (mean test AUC at the site left out; ± SD over cohort seeds x sites left out x "
          f"draws)\n{summary}\n")
    print(last)


if __name__ == "__main__":
    main()
