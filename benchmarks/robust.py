"""What one hostile site does to the federation, under FedAvg and the robust options.

    PYTHONPATH=. python benchmarks/robust.py [--seeds 0 1] [--out docs/benchmarks/robust.md]

Four synthetic sites (a cohort built for this benchmark: 4 x 60 subjects at 32^3, effect_scale
2), the tiny model, fine-tuning from a fresh encoder as LP-FT (3 probe rounds, then 2 fine-tuning
rounds), each round through the server's own aggregation path (cmvim.server.strategy: the guard,
then Flower's strategy; simulations.baselines.server_aggregation). Site D is the attacker: it
sends its honest update (none), scaled by 10, negated (sign-flip), or negated and scaled by 10.
Reported: the mean test AUC of the three honest sites, mean over seeds, and which sites the
guard left out. Krum and Bulyan need more sites than four for one attacker (n >= 5 and 7).
"""
from __future__ import annotations

import sys
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # benchmarks/ssl.py must not shadow the ssl module
import argparse
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmvim.results import mean_auc, site_entry
from cmvim.run_config import StrategyConfig, run_config
from cmvim.simulations.baselines import server_aggregation, train_rounds
from cmvim.simulations.assembly import prepare_sites
from cmvim.simulations.cohort import prepare_cohort
from cmvim.site_task import SiteTask
from cmvim.tables import format_table
from cmvim.weights import initial_state

ATTACKS = {"none": None, "scaled x10": 10.0, "sign-flip": -1.0, "sign-flip x10": -10.0}
STRATEGIES = {
    "fedavg, no norm bound": dict(norm_bound=None),
    "fedavg + norm bound (default: reject > 5x median)": dict(),
    "fedavg + norm bound, clip": dict(norm_action="clip"),
    "fedmedian": dict(name="fedmedian", norm_bound=None),
    "fedtrimmedavg (beta 0.25)": dict(name="fedtrimmedavg", trim_beta=0.25, norm_bound=None),
}


def config(seed: int) -> dict:
    return {"seed": seed, "cohort": {"sites": 4, "subjects": 60, "shape": 32, "seed": 21, "effect_scale": 2.0},
            "model": {"preset": "tiny", "readout": "tokens"},
            "preprocess": {"shape": 32, "voxel_size": 6.0, "normalize": {"mri": "zscore", "pet": "suvr"}},
            "split_fractions": [0.6, 0.1, 0.3], "evaluation": {"bootstrap": 10}, "finetune_init": "fresh",
            "finetune": {"rounds": 5, "probe_rounds": 3, "probe_epochs": 30, "local_epochs": 1, "lr": 3e-4,
                         "batch_size": 8}, "strategy": {"min_nodes": 3}}


def tamper_with(scale: float | None):
    if scale is None:
        return None

    def tamper(site, global_, update):
        return {k: global_[k] + scale * (update[k] - global_[k]) for k in update} if site == "D" else update
    return tamper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "robust.md")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    aucs: dict = {}
    left_out: dict = {}
    for seed in args.seeds:
        cfg = prepare_cohort(run_config(config(seed)))
        sites = prepare_sites(cfg)
        tasks = [SiteTask(cfg, [site], name) for name, site in sites.items()]
        for attack, scale in ATTACKS.items():
            for label, overrides in STRATEGIES.items():
                strategy = StrategyConfig(**{"min_nodes": 3, **overrides})
                aggregate = server_aggregation(strategy, tamper_with(scale))
                final, _ = train_rounds(cfg, tasks, "finetune", initial_state(cfg, "finetune"), aggregate=aggregate)
                honest = {t.name: site_entry(dict(t.evaluate("finetune", final, {}, "test").metrics))
                          for t in tasks if t.name != "D"}
                aucs.setdefault((attack, label), []).append(mean_auc(honest))
                dropped = sorted({r["site"] for r in aggregate.rejected()})
                left_out.setdefault((attack, label), set()).update(dropped)
                print(f"seed {seed} {attack:14s} {label:50s} honest-site AUC {mean_auc(honest):.3f} "
                      f"left out/clipped {dropped or '-'} [{time.perf_counter() - start:.0f}s]", flush=True)
    rows = []
    for label in STRATEGIES:
        rows.append([label] + [f"{np.mean(aucs[(a, label)]):.3f}" + (" (D out)" if "D" in left_out[(a, label)] else "")
                               for a in ATTACKS])
    table = format_table(["aggregation", *(f"D sends: {a}" for a in ATTACKS)], rows)
    text = (f"# One hostile site of four (`benchmarks/robust.py`)\n\n"
            f"`PYTHONPATH=. python benchmarks/robust.py --seeds {' '.join(map(str, args.seeds))}` "
            f"({(time.perf_counter() - start) / 60:.0f} min on one core). Mean test AUC of the three honest sites "
            f"(AD vs CN), mean over seeds {args.seeds}; \"(D out)\": the guard left D out (or clipped it) "
            f"in at least one round.\n\n{table}\n\n{__doc__.split(chr(10) + chr(10), 1)[1]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
