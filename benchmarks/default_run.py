"""What pretraining adds to the default run: `cmvim-sim` on quick.yaml (real Flower simulation,
the built-in cohort) with the pretrained encoder and with `finetune_init: fresh`, over seeds,
beside the linear baseline each run computes on the same splits.

    PYTHONPATH=. python benchmarks/default_run.py [--seeds 0 1 2] [--config quick.yaml] [--set KEY=VALUE ...]
        [--inits pretrained fresh] [--out runs/default-seeds]

A seed changes the model's initialisation, the augmentations and the train/val/test split (the
cohort stays the default one), so the spread over seeds includes the split's. Prints one row a
seed and the mean, with the paired difference pretrained - fresh.

`--inprocess` runs the same rounds without Flower's transport (FedAvg over the sites' SiteTask
rounds in this process, weighted by subjects: cmvim.simulations.baselines.train_rounds): the same numbers at a
fraction of the cost on a busy machine; the first seed's Flower run checks that they agree.
"""
from __future__ import annotations

import sys
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # benchmarks/ssl.py must not shadow the ssl module
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmvim.config import load_yaml
from cmvim.run_config import overridden
from cmvim.tables import format_table
from cmvim.simulations.assembly import config_path


def run(data: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(data))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cmvim.simulations.cli", "--config", str(config), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1"))
    metrics_path = out / "metrics.json"
    if proc.returncode != 0 or not metrics_path.exists():
        raise RuntimeError(f"cmvim-sim failed for {out}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    metrics = json.loads(metrics_path.read_text())
    aucs = [m["auc"] for m in metrics["sites"].values() if m.get("auc") is not None]
    linear = metrics.get("baselines", {}).get("linear", {}).get("mean_auc")
    return {"mean_auc": float(np.mean(aucs)), "pooled_auc": metrics["pooled"]["auc"], "linear": linear,
            "minutes": (time.perf_counter() - start) / 60}


def run_inprocess(data: dict) -> dict:
    """The run's phases as FedAvg rounds in this process, then every site's test split and the linear
    baseline, as cmvim-sim reports them."""
    import torch

    from cmvim.run_config import run_config
    from cmvim.results import mean_auc, site_entry
    from cmvim.site_task import SiteTask
    from cmvim.weights import initial_state
    from cmvim.simulations.cohort import prepare_cohort
    from cmvim.simulations.baselines import run_baselines, train_rounds
    from cmvim.simulations.assembly import prepare_sites

    start = time.perf_counter()
    torch.set_num_threads(1)
    cfg = prepare_cohort(run_config(data))
    sites = prepare_sites(cfg)
    tasks = [SiteTask(cfg, [site], name) for name, site in sites.items()]
    pretrained = None                    # fresh: the pretraining rounds would be thrown away, so skip them
    if cfg.finetune_init != "fresh":
        pretrained, _ = train_rounds(cfg, tasks, "pretrain", initial_state(cfg, "pretrain"))
    final, _ = train_rounds(cfg, tasks, "finetune", initial_state(cfg, "finetune", pretrained))
    entries = {task.name: site_entry(dict(task.evaluate("finetune", final, {}, "test").metrics)) for task in tasks}
    linear = run_baselines(cfg, sites, ["linear"], say=lambda *_: None)["linear"]["mean_auc"]
    return {"mean_auc": mean_auc(entries), "pooled_auc": float("nan"), "linear": linear,
            "minutes": (time.perf_counter() - start) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="quick.yaml")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "default-seeds")
    parser.add_argument("--inprocess", action="store_true", help="FedAvg rounds in this process, no Flower transport")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting over the config's, as cmvim-sim --set (repeatable)")
    parser.add_argument("--inits", nargs="+", choices=["pretrained", "fresh"], default=["pretrained", "fresh"],
                        help="which runs a seed makes (the table needs both; one alone prints its lines)")
    args = parser.parse_args()
    base = overridden(load_yaml(config_path(args.config)), args.set)
    rows, results = [], {}
    for seed in args.seeds:
        for init in args.inits:
            data = {**base, "seed": seed, "finetune_init": init, "baselines": ["linear"]}
            results[(seed, init)] = run_inprocess(data) if args.inprocess else run(data, args.out / f"seed{seed}-{init}")
            r = results[(seed, init)]
            print(f"seed {seed} {init:10s}: mean per-site AUC {r['mean_auc']:.3f} (pooled {r['pooled_auc']:.3f}), "
                  f"linear {r['linear']:.3f} [{r['minutes']:.1f} min]", flush=True)
        if len(args.inits) < 2:
            continue
        pre, fresh = results[(seed, "pretrained")], results[(seed, "fresh")]
        rows.append([seed, pre["mean_auc"], fresh["mean_auc"], pre["mean_auc"] - fresh["mean_auc"], pre["linear"],
                     pre["mean_auc"] - pre["linear"], round(pre["minutes"], 1)])
    if not rows:
        return
    columns = np.array([r[1:6] for r in rows], dtype=float)
    mean, sd = columns.mean(axis=0), columns.std(axis=0, ddof=1) if len(rows) > 1 else np.zeros(5)
    rows.append(["mean ± sd"] + [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean, sd)] + [""])
    headers = ["seed", "pretrained", "fresh", "pretrained - fresh", "linear baseline", "pretrained - linear",
               "minutes (pretrained run)"]
    print("\n" + format_table(headers, [[f"{v:.3f}" if isinstance(v, float) else v for v in r] for r in rows]))


if __name__ == "__main__":
    main()
