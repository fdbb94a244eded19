"""Why the fine-tuning loss jumps at the switch from probe to fine-tuning rounds (issue #32): the
default run's probe rounds (quick.yaml, in process, FedAvg as benchmarks/finetune_rounds.py runs
them, its cached pretrained encoder reused), then one fine-tuning round at every site, measured
piece by piece:

  probe-fitted model  each site's training loss (cross-entropy, unweighted, eval mode) on clean
                      inputs (what the probe rounds fitted) and with the run's modality dropout
                      (what the fine-tuning round trains on): how much of the jump is the dropout
  one round of FT     per variant: each site's relative drift ||site - global|| / ||global|| of the
                      patch embedding, the Vim blocks and the head; the sites' own clean training
                      loss after their round; the FedAvg'd model's clean training loss and mean
                      per-site validation AUC (against the probe-fitted model's)

    PYTHONPATH=. python benchmarks/finetune_switch.py [--seeds 0 1] [--cache runs/finetune-rounds]

Cohort seed 0 (the tuning cohort: choices may be made here), run seeds as given.
"""
from __future__ import annotations

import sys
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # benchmarks/ssl.py must not shadow the ssl module
import argparse
import dataclasses
import contextlib
import copy
import io
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmvim.config import load_yaml          # noqa: E402
from cmvim.tables import format_table       # noqa: E402
from cmvim.simulations.assembly import config_path          # noqa: E402

VARIANTS = {
    "default (lr 3e-4, layer decay 0.75, dropout 0.3)": {},
    "no modality dropout": {"modality_dropout": 0.0},
    "lr / 3": {"finetune.lr": 1e-4},
    "layer decay 0.5": {"finetune.layer_decay": 0.5},
}


def _bench(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"cmvim_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_loss(task, shared: dict, dataset) -> float:
    """Mean unweighted cross-entropy of the model over a dataset, eval mode."""
    import torch
    import torch.nn.functional as F
    model = task._model("finetune", shared, {})
    model.eval()
    losses = []
    with torch.no_grad():
        for batch in task.views.loader(dataset, 16, False, 0):
            losses.append(F.cross_entropy(model(batch), batch["label"], reduction="none"))
    return float(torch.cat(losses).mean())


def drift(site: dict, global_: dict) -> dict[str, float]:
    groups = {"embedding": lambda k: "encoder.layers" not in k and k.startswith("image."),
              "blocks": lambda k: "encoder.layers" in k, "head": lambda k: k.startswith("head")}
    out = {}
    for name, member in groups.items():
        keys = [k for k in global_ if member(k) and global_[k].is_floating_point()]
        diff = sum(float((site[k] - global_[k]).double().pow(2).sum()) for k in keys) ** 0.5
        norm = sum(float(global_[k].double().pow(2).sum()) for k in keys) ** 0.5
        out[name] = diff / norm if norm else float("nan")
    return out


def seed_rows(data: dict, seed: int, cache: Path) -> list[list]:
    import torch

    from cmvim.run_config import overridden, run_config
    from cmvim.simulations.baselines import server_aggregation, train_rounds, validation_auc
    from cmvim.simulations.assembly import prepare_sites
    from cmvim.simulations.cohort import prepare_cohort
    from cmvim.site_task import SiteTask
    from cmvim.weights import initial_state

    rounds = _bench("finetune_rounds")
    torch.set_num_threads(1)
    seeded = rounds.seed_data(data, seed)
    encoder = cache / f"pretrained-{rounds.key(seeded, *rounds.FINETUNE_ONLY)}-seed{seed}.pt"
    with contextlib.redirect_stdout(io.StringIO()):
        cfg = prepare_cohort(run_config(seeded))
        sites = prepare_sites(cfg)
    tasks = [SiteTask(cfg, [site], name) for name, site in sites.items()]
    if encoder.exists():
        pretrained = torch.load(encoder, weights_only=True)
    else:
        cache.mkdir(parents=True, exist_ok=True)
        pretrained, _ = train_rounds(cfg, tasks, "pretrain", initial_state(cfg, "pretrain"))
        torch.save(pretrained, encoder)
    probe_cfg = copy.deepcopy(cfg)
    probe_cfg.finetune.rounds = cfg.finetune.probe_rounds
    probe_cfg.finetune.select = "last"
    probed, _ = train_rounds(probe_cfg, [SiteTask(probe_cfg, [s], n) for n, s in sites.items()], "finetune",
                             initial_state(cfg, "finetune", pretrained))
    clean = {t.name: train_loss(t, probed, t.views.dataset(["train"], True, augment=False)) for t in tasks}
    dropped = {t.name: train_loss(t, probed, t.views.finetuning()) for t in tasks}
    probe_val = validation_auc(tasks, probed, {t.name: {} for t in tasks})
    rows = [[seed, "after the probe rounds", "", "", "", f"{np.mean(list(clean.values())):.3f}",
             f"{np.mean(list(dropped.values())):.3f}", f"{np.mean(list(clean.values())):.3f}", f"{probe_val:.3f}"]]
    for name, settings in VARIANTS.items():
        vcfg = run_config(overridden(seeded, [f"{k}={v}" for k, v in settings.items()]))
        vcfg.cohort.path = cfg.cohort.path
        vtasks = [SiteTask(vcfg, [s], n) for n, s in sites.items()]
        results = [t.train("finetune", cfg.finetune.probe_rounds + 1, probed) for t in vtasks]
        drifts = [drift(r.shared, probed) for r in results]
        own = [train_loss(t, r.shared, t.views.dataset(["train"], True, augment=False))
               for t, r in zip(vtasks, results)]
        averaged = server_aggregation(dataclasses.replace(vcfg.strategy, min_nodes=1))(
            "finetune", cfg.finetune.probe_rounds + 1, {t.name: r for t, r in zip(vtasks, results)}, probed)
        after = np.mean([train_loss(t, averaged, t.views.dataset(["train"], True, augment=False)) for t in vtasks])
        val = validation_auc(vtasks, averaged, {t.name: {} for t in vtasks})
        rows.append([seed, name] + [f"{np.mean([d[g] for d in drifts]):.4f}" for g in ("embedding", "blocks", "head")]
                    + [f"{np.mean(own):.3f}", "", f"{after:.3f}", f"{val:.3f}"])
        print(f"  seed {seed}, {name}: done", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "finetune-rounds")
    args = parser.parse_args()
    data = load_yaml(config_path("quick.yaml"))
    rows = []
    for seed in args.seeds:
        rows += seed_rows(data, seed, args.cache)
    print(format_table(["seed", "model", "drift: embedding", "drift: blocks", "drift: head",
                        "sites' own clean train loss", "train loss with modality dropout",
                        "FedAvg'd clean train loss", "mean per-site val AUC"], rows))


if __name__ == "__main__":
    main()
