"""What differential privacy costs: DP-SGD step time against non-private, and AUC against epsilon.

1. Step cost: one site of the default cohort, the run config's model, one fine-tuning round of
   the same number of steps with and without DP-SGD (Opacus per-sample gradients, clipping,
   noise); prints seconds per step and the ratio.
2. Utility: the federated run (`cmvim-sim`) with privacy.target_epsilon in --epsilons (inf = no
   DP), each in its own subprocess; prints mean per-site and pooled AUC and the epsilon each
   site spent.
3. Secure aggregation (--secagg): the run with and without SecAgg+ training rounds (AUC, median
   seconds a round per phase).
4. Central DP (--central NM ...): the same run under Flower's server-side fixed clipping with
   each noise multiplier; the clipping norm is the median norm of a site's first-round update
   (measured here, per phase: printed). Prints AUC, the epsilon Flower's accountant reports,
   and the epsilon the same noise on the average would cost with --many sites (noise std is
   noise_multiplier x clip / sites, so n sites allow a multiplier n/3 times larger).

    PYTHONPATH=. python benchmarks/dp.py [--config quick.yaml] [--epsilons inf 8 3 1] [--set key=value ...]
    PYTHONPATH=. python benchmarks/dp.py --skip-step --epsilons --secagg --central 0.001 0.01 0.1 1

`--set` overrides config values by dotted key for every run (e.g. pretrain.rounds=2).
"""
from __future__ import annotations

import sys
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # benchmarks/ssl.py must not shadow the ssl module
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from cmvim.config import load_yaml
from cmvim.run_config import overridden, run_config
from cmvim.site_task import SiteTask
from cmvim.weights import initial_state
from cmvim.simulations.assembly import config_path, prepare_sites
from cmvim.simulations.cohort import prepare_cohort


def step_cost(data: dict, threads: int) -> tuple[float, float, int]:
    torch.set_num_threads(threads)
    cfg = prepare_cohort(run_config(data))
    site_name, site = next(iter(prepare_sites(cfg).items()))
    plain = SiteTask(cfg, [site], site_name)
    data_dp = json.loads(cfg.to_json())
    data_dp["privacy"] = {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    with tempfile.TemporaryDirectory() as tmp:
        private = SiteTask(run_config(data_dp), [site], site_name, ledger_path=Path(tmp) / "ledger.json",
                           run_key="bench")
        _, plan = private.privacy_plan()
        steps = plan["finetune"][1]
        shared = initial_state(cfg, "finetune")
        start = time.perf_counter()
        plain.train("finetune", 1, shared)
        plain_s = time.perf_counter() - start
        plain_steps = cfg.finetune.local_epochs * -(-len(plain._private_dataset("finetune")) // cfg.finetune.batch_size)
        start = time.perf_counter()
        private.train("finetune", 1, shared)
        dp_s = time.perf_counter() - start
    return plain_s / plain_steps, dp_s / steps, steps


def update_norms(data: dict) -> dict[str, float]:
    """Per phase, the median over sites of the L2 norm of one round's update from the initial model."""
    cfg = prepare_cohort(run_config(data))
    norms: dict[str, list[float]] = {"pretrain": [], "finetune": []}
    for name, site in prepare_sites(cfg).items():
        task = SiteTask(cfg, [site], name)
        for phase in norms:
            shared = initial_state(cfg, phase)
            trained = task.train(phase, 1, shared).shared
            norms[phase].append(float(torch.sqrt(sum(((trained[k] - shared[k]) ** 2).sum() for k in shared))))
    return {phase: float(torch.tensor(values).median()) for phase, values in norms.items()}


def federated_run(run: dict, name: str, out: Path) -> dict:
    config = out / f"{name}.yaml"
    config.write_text(yaml.safe_dump(run))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cmvim.simulations.cli", "--config", str(config), "--out",
                           str(out / name)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    metrics = json.loads((out / name / "metrics.json").read_text())
    aucs = [m["auc"] for m in metrics["sites"].values() if m.get("auc") is not None]
    return {"mean_auc": sum(aucs) / len(aucs), "pooled_auc": metrics["pooled"]["auc"],
            "spent": {s: m.get("epsilon") for s, m in metrics["sites"].items()},
            "central": metrics.get("central_dp"), "minutes": (time.perf_counter() - start) / 60}


def federated_auc(data: dict, eps: float, out: Path) -> dict:
    run = json.loads(json.dumps(data))
    if eps != float("inf"):
        run["privacy"] = {"enabled": True, "target_epsilon": eps, "max_grad_norm": 1.0}
    return federated_run(run, f"eps-{eps}", out)


def central_auc(data: dict, noise: float, clip: float, out: Path) -> dict:
    run = json.loads(json.dumps(data))
    run["central_dp"] = {"clipping": "server", "noise_multiplier": noise, "clipping_norm": clip, "delta": 1e-5}
    return federated_run(run, f"central-{noise}", out)


def epsilon_with_sites(noise: float, sites: int, many: int, releases: int, delta: float = 1e-5) -> float:
    """Epsilon of the same noise std on the average (noise x clip / sites) with `many` sites."""
    from cmvim.run_config import CentralDPConfig
    from flwr.serverapp import GaussianPrivacyEvent
    from cmvim.server.strategy import central_accountant
    scaled = noise * many / sites
    accountant = central_accountant(CentralDPConfig(clipping="server", noise_multiplier=scaled, delta=delta), many)
    accountant.compose(GaussianPrivacyEvent(scaled, many, many), releases)
    return accountant.get_epsilon(delta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="quick.yaml")
    parser.add_argument("--epsilons", nargs="*", type=float, default=[float("inf"), 8.0, 3.0, 1.0])
    parser.add_argument("--set", nargs="*", default=[], dest="sets")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the step-cost part")
    parser.add_argument("--skip-auc", action="store_true")
    parser.add_argument("--skip-step", action="store_true", help="skip the step-cost part")
    parser.add_argument("--central", nargs="*", type=float, default=[], help="central-DP noise multipliers")
    parser.add_argument("--many", type=int, default=300, help="sites for the extrapolated epsilon column")
    parser.add_argument("--secagg", action="store_true", help="also the run with SecAgg+ training rounds")
    parser.add_argument("--out", type=Path, default=Path("runs/dp-bench"))
    args = parser.parse_args()
    data = overridden(load_yaml(config_path(args.config)), args.sets)

    print(f"config {args.config} {' '.join(args.sets)}; model {data.get('model')}; {args.threads} thread(s)\n")
    if not args.skip_step:
        plain, private, steps = step_cost(data, args.threads)
        print("| training | s/step | ratio |\n| --- | ---: | ---: |")
        print(f"| non-private | {plain:.3f} | 1.0x |")
        print(f"| DP-SGD (per-sample grads, clip, noise) | {private:.3f} | {private / plain:.1f}x |\n", flush=True)
    if args.skip_auc:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.central:
        central_table(data, args)
    if args.secagg:
        secagg_table(data, args.out)
    if not args.epsilons:
        return
    print("| target epsilon | mean per-site AUC | pooled AUC | epsilon spent per site | minutes |")
    print("| ---: | ---: | ---: | --- | ---: |")
    for eps in args.epsilons:
        r = federated_auc(data, eps, args.out)
        spent = ", ".join(f"{s} {v:.2f}" for s, v in sorted(r["spent"].items()) if v is not None) or "-"
        print(f"| {'inf (no DP)' if eps == float('inf') else f'{eps:g}'} | {r['mean_auc']:.3f} | "
              f"{r['pooled_auc']:.3f} | {spent} | {r['minutes']:.1f} |", flush=True)


def median_round_seconds(out: Path, phase: str) -> float:
    seconds = sorted(r["seconds"] for r in json.loads((out / "metrics.json").read_text())["rounds"]
                     if r["phase"] == phase)
    return seconds[len(seconds) // 2]


def secagg_table(data: dict, out: Path) -> None:
    """The run with and without SecAgg+ training rounds, side by side."""
    secure = json.loads(json.dumps(data))
    secure["secure_aggregation"] = {"enabled": True}
    print("| training rounds | mean per-site AUC | pooled AUC | median s/round pretrain | median s/round finetune "
          "| minutes |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, run, name in (("plain FedAvg", data, "plain"), ("SecAgg+", secure, "secagg")):
        r = federated_run(run, name, out)
        print(f"| {label} | {r['mean_auc']:.3f} | {r['pooled_auc']:.3f} | "
              f"{median_round_seconds(out / name, 'pretrain'):.1f} | {median_round_seconds(out / name, 'finetune'):.1f} "
              f"| {r['minutes']:.1f} |", flush=True)
    print()


def central_table(data: dict, args) -> None:
    norms = update_norms(data)
    clip = min(norms.values())
    sites = run_config(data).cohort.sites
    print("median norm of a site's first-round update: " + ", ".join(f"{p} {n:.3f}" for p, n in norms.items())
          + f"; clipping norm {clip:.3f} (the smaller)\n")
    print(f"| noise multiplier | noise std on the average | mean per-site AUC | pooled AUC | epsilon ({sites} sites, "
          f"delta 1e-5) | epsilon, same noise std with {args.many} sites | minutes |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for noise in args.central:
        r = central_auc(data, noise, clip, args.out)
        c = r["central"]
        print(f"| {noise:g} | {noise * clip / sites:.2e} | {r['mean_auc']:.3f} | {r['pooled_auc']:.3f} | "
              f"{c['epsilon']:.3g} ({c['releases']} rounds) | "
              f"{epsilon_with_sites(noise, sites, args.many, c['releases']):.3g} | {r['minutes']:.1f} |", flush=True)
    print()


if __name__ == "__main__":
    main()
