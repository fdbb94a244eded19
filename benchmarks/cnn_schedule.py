"""The 3D CNN baseline's own schedule, chosen on validation splits (issue #32). On CMViM's
fine-tuning schedule (17 rounds x 1 epoch at lr 3e-4, chosen for a pretrained encoder) the CNN
from scratch does not learn; this is the search that gives it a schedule of its own, by the rule
CMViM's recipe was chosen by, on the data CMViM's recipe was chosen on.

    PYTHONPATH=. python benchmarks/cnn_schedule.py [--seeds 0 1 2] [--lrs 3e-4 1e-3 3e-3] [--epochs 1 3]
        [--max-rounds 30] [--rows FILE]
    PYTHONPATH=. python benchmarks/cnn_schedule.py --table-only

Data: the tuning cohort (quick.yaml's synthetic cohort, cohort seed 0: the one every choice of
CMViM's recipe was made on), split by each run seed as the default run splits it; none of the
reserved cohort seeds (31-33, 51-53, 61-63, 71-73) is read. Each candidate (lr, local epochs)
trains FedAvg over the three sites (train_cnn3d: the server's own aggregation) for --max-rounds
rounds; every round's global model scores every site's validation split. No test split is read.

A schedule is (lr, local epochs, R rounds); it is worth the mean per-site validation AUC of the
round finetune.select: best_val would choose among rounds 1..R (the latest of equals), so every R
up to --max-rounds comes from one training run. The choice: the best mean over the run seeds;
schedules within 0.005 of it count as equal, and the cheapest of them (fewest epochs in all) wins.
The chosen schedule is the run config's `cnn3d` default (cmvim/run_config.py); it is then measured
on the reserved cohort seeds by benchmarks/regimes.py (the `cnn3d own schedule` rows).

Per-subject validation scores of every round are kept at full precision in --rows, with the site,
the subject's index among the site's validation subjects, and the label; --table-only recomputes
the table and the choice from them. Per-site AUC here is the plain AUC of a site's validation
subjects (the run's evaluation also suppresses a class under min_cell_count: not at these sizes).
"""
from __future__ import annotations

import sys
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # benchmarks/ssl.py: not the ssl module
import argparse
import contextlib
import functools
import io
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmvim.metrics import auc_or_nan  # noqa: E402
from cmvim.tables import format_table, mean_sd  # noqa: E402

ROWS = ROOT / "docs" / "benchmarks" / "cnn_schedule_rows.jsonl"
EQUAL = 0.005               # validation AUCs this close count as equal: the cheaper schedule wins
ROUND_CAPS = (10, 17, 20, 30, 40)


def candidate_config(cfg, lr: float, epochs: int, rounds: int):
    """The run config with the CNN's schedule set to a candidate, every round kept (the selection
    among rounds is recomputed from the scores)."""
    from cmvim.run_config import PhaseConfig
    own = cfg.cnn3d or PhaseConfig()
    return replace(cfg, cnn3d=replace(own, lr=lr, local_epochs=epochs, rounds=rounds),
                   finetune=replace(cfg.finetune, select="last"))


@functools.cache
def seed_sites(seed: int):
    """(the default run config at this run seed, its sites split the seed's way): loaded once a seed,
    every candidate trains on them."""
    from cmvim.run_config import run_config
    from cmvim.simulations.assembly import DEFAULT_CONFIG, prepare_sites
    from cmvim.simulations.cohort import prepare_cohort

    with contextlib.redirect_stdout(io.StringIO()):            # the cohort's and the sites' load lines
        base = prepare_cohort(run_config(DEFAULT_CONFIG, seed=seed, baselines=[]))
        return base, prepare_sites(base)


def run(seed: int, lr: float, epochs: int, max_rounds: int, rows_path: Path) -> list[dict]:
    """One candidate on one run seed: every round's validation scores, appended to rows_path."""
    import torch

    from cmvim.cnn3d import CnnTask
    from cmvim.simulations.baselines import train_cnn3d

    torch.set_num_threads(1)
    base, sites = seed_sites(seed)
    cfg = candidate_config(base, lr, epochs, max_rounds)
    tasks = [CnnTask(cfg, [site], name) for name, site in sites.items()]
    rows, start = [], time.perf_counter()

    def after_round(round_: int, shared: dict, local: dict) -> None:
        new = []
        for task in tasks:
            labels, scores = task.predict(shared, {}, "val")
            new += [{"seed": seed, "lr": lr, "epochs": epochs, "round": round_, "site": task.name, "index": i,
                     "label": int(y), "score": float(s)} for i, (y, s) in enumerate(zip(labels, scores))]
        with rows_path.open("a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in new)
        rows.extend(new)
        auc = np.nanmean([auc_or_nan(*site_scores(new, task.name)) for task in tasks])
        elapsed = time.perf_counter() - start
        print(f"  seed {seed} lr {lr:g} x{epochs} epochs: round {round_}/{max_rounds} mean per-site val AUC "
              f"{auc:.3f} [{elapsed:.0f} s, ETA {elapsed / round_ * (max_rounds - round_):.0f} s]", flush=True)

    train_cnn3d(cfg, tasks, after_round=after_round)
    return rows


def site_scores(rows: list[dict], site: str) -> tuple[np.ndarray, np.ndarray]:
    mine = sorted((r["index"], r["label"], r["score"]) for r in rows if r["site"] == site)
    return np.array([m[1] for m in mine], dtype=int), np.array([m[2] for m in mine])


def round_aucs(rows: list[dict]) -> dict[tuple, dict[int, float]]:
    """{(seed, lr, epochs): {round: mean per-site validation AUC}}."""
    grouped: dict = {}
    for r in rows:
        grouped.setdefault((r["seed"], r["lr"], r["epochs"]), {}).setdefault(r["round"], []).append(r)
    return {key: {round_: float(np.nanmean([auc_or_nan(*site_scores(found, s)) for s in sorted({r["site"]
                                                                                                for r in found})]))
                  for round_, found in by_round.items()}
            for key, by_round in grouped.items()}


def selected(aucs: dict[int, float], cap: int) -> tuple[int, float] | None:
    """(round, val AUC) that best_val chooses among rounds 1..cap (the latest of equals); None when
    the run did not reach cap."""
    if max(aucs) < cap:
        return None
    round_ = max((r for r in aucs if r <= cap), key=lambda r: (aucs[r], r))
    return round_, aucs[round_]


def choose(rows: list[dict]) -> tuple[str, dict | None]:
    """(the table of every schedule, the chosen one as {lr, local_epochs, rounds} or None)."""
    aucs = round_aucs(rows)
    seeds = sorted({k[0] for k in aucs})
    candidates = sorted({k[1:] for k in aucs})
    table, scored = [], []
    for lr, epochs in candidates:
        for cap in ROUND_CAPS:
            picks = [selected(aucs[(s, lr, epochs)], cap) for s in seeds if (s, lr, epochs) in aucs]
            if not picks or any(p is None for p in picks) or len(picks) < len(seeds):
                continue
            values = [p[1] for p in picks]
            scored.append((float(np.mean(values)), -epochs * cap, lr, epochs, cap))
            table.append([f"{lr:g}", epochs, cap, epochs * cap, mean_sd(values),
                          ", ".join(str(p[0]) for p in picks)])
    if not scored:
        return "no complete schedule yet", None
    best = max(s[0] for s in scored)
    cheapest = max((s for s in scored if s[0] >= best - EQUAL), key=lambda s: (s[1], s[0]))
    _, _, lr, epochs, cap = cheapest
    text = format_table(["lr", "local epochs", "rounds", "epochs in all",
                         f"val AUC of the best_val round (± SD over seeds {', '.join(map(str, seeds))})",
                         "chosen round per seed"], table)
    return (f"{text}\n\nchosen: lr {lr:g}, {epochs} local epoch(s) a round, {cap} rounds (best mean {best:.3f}; "
            f"within {EQUAL} of it the fewest epochs in all)"), {"lr": lr, "local_epochs": epochs, "rounds": cap}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds (the split, the initialisation)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3], help="local epochs a round")
    parser.add_argument("--max-rounds", type=int, default=30)
    parser.add_argument("--rows", type=Path, default=ROWS)
    parser.add_argument("--table-only", action="store_true", help="the table and the choice from --rows; no training")
    args = parser.parse_args()
    rows = read_rows(args.rows)
    if not args.table_only:
        for seed in args.seeds:
            for epochs in args.epochs:
                for lr in args.lrs:
                    done = {r["round"] for r in rows if (r["seed"], r["lr"], r["epochs"]) == (seed, lr, epochs)}
                    if len(done) >= args.max_rounds:
                        continue
                    if done:                 # a run cut short: its rounds are dropped and it runs again whole
                        rows = [r for r in rows if (r["seed"], r["lr"], r["epochs"]) != (seed, lr, epochs)]
                        args.rows.write_text("".join(json.dumps(r) + "\n" for r in rows))
                    rows += run(seed, lr, epochs, args.max_rounds, args.rows)
    table, _ = choose(rows)
    print(f"\nthe CNN's schedule on the tuning cohort's validation splits (cohort seed 0; mean per-site val AUC)\n{table}")


if __name__ == "__main__":
    main()
