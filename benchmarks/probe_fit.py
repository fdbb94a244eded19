"""Where the default run loses to the linear baseline: the representation, or fitting the head?

    PYTHONPATH=. python benchmarks/probe_fit.py --weights runs/sim/checkpoints/pretrain_round012.pt

Takes a pretrained CMViM (a cmvim-sim run's last pretraining checkpoint, or any weights file
`finetune_init` accepts) and the run config's cohort and splits (default quick.yaml), and fits
a logistic regression (cmvim.linear.fit_logistic: L2, strength by cross-validated log-loss,
standardised features) on three feature sets of every labelled subject:

- the linear baseline's regional means (6^3 blocks per modality);
- the frozen encoder's tokens (what the `readout: tokens` head reads) of a FRESH encoder;
- the same tokens of the PRETRAINED encoder;
- those tokens averaged over 2^3 regions per modality, and over each modality (fewer numbers a
  subject: does pooling keep the signal?);

each fitted centrally on all sites' train+val subjects pooled (as the linear baseline is), on the
train subjects only (what fine-tuning sees), and federated: FedAvg over the sites of an L2
logistic regression on globally standardised features (each site L-BFGS on its own train
subjects from the global head, 30 rounds; the strength the central fit chose). Prints mean
per-site test AUC per cell. No Flower: a measurement of the representation and the fit.
"""
from __future__ import annotations

import sys
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # benchmarks/ssl.py must not shadow the ssl module
import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmvim.config import load_yaml
from cmvim.data import make_loader
from cmvim.linear import fit_logistic, positive_scores, regional_means
from cmvim.model import CMViMClassifier
from cmvim.run_config import run_config
from cmvim.simulations.assembly import config_path, prepare_sites
from cmvim.simulations.cohort import prepare_cohort
from cmvim.tables import format_table
from cmvim.weights import load_weights


def features(cfg, sites, model: CMViMClassifier | None):
    """{site: {split: (x, y)}}: regional means when `model` is None, else the frozen encoder's features."""
    out = {}
    for name, site in sites.items():
        out[name] = {}
        for split in ("train", "val", "test"):
            xs, ys = [], []
            for batch in make_loader(site.dataset(split, labeled=True, classes=cfg.model.classes), 16, False,
                                     reports=False):
                with torch.no_grad():
                    xs.append(regional_means(batch, cfg.linear.grid) if model is None
                              else model.features(batch).numpy())
                ys.append((batch["label"].numpy() == cfg.model.num_classes - 1).astype(int))
            out[name][split] = (np.concatenate(xs), np.concatenate(ys))
    return out


def mean_test_auc(data, score) -> float:
    return float(np.mean([roc_auc_score(d["test"][1], score(d["test"][0])) for d in data.values()]))


def central(data, splits: list[str], seed: int):
    x = np.concatenate([d[s][0] for d in data.values() for s in splits])
    y = np.concatenate([d[s][1] for d in data.values() for s in splits])
    model = fit_logistic(x, y, seed=seed)
    return mean_test_auc(data, lambda xt: positive_scores(model, xt)), model


def federated(data, strength: float, rounds: int = 30) -> float:
    """FedAvg of per-site L2 logistic regressions (L-BFGS from the global head) on features
    standardised with the sites' pooled mean and variance (aggregate sums a site could send)."""
    x_all = np.concatenate([d["train"][0] for d in data.values()])
    mean, std = np.nanmean(x_all, 0), np.nanstd(x_all, 0) + 1e-6     # a missing PET: imputed with the mean (0 here)
    mean, std = np.nan_to_num(mean), np.nan_to_num(std, nan=1.0)
    sizes = [len(d["train"][1]) for d in data.values()]
    lam = 1.0 / (strength * sum(sizes))
    w, b = torch.zeros(x_all.shape[1], dtype=torch.float64), torch.zeros((), dtype=torch.float64)

    def standard(x):
        return torch.from_numpy(np.nan_to_num((x - mean) / std).astype(np.float64))

    for _ in range(rounds):
        states = []
        for d in data.values():
            x, y = standard(d["train"][0]), torch.from_numpy(d["train"][1]).double()
            lw, lb = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
            opt = torch.optim.LBFGS([lw, lb], lr=1, max_iter=5)

            def closure():
                opt.zero_grad()
                loss = (torch.nn.functional.binary_cross_entropy_with_logits(x @ lw + lb, y)
                        + lam * (lw ** 2).sum() / 2)
                loss.backward()
                return loss
            opt.step(closure)
            states.append((lw.detach(), lb.detach()))
        w = sum(s[0] * n for s, n in zip(states, sizes)) / sum(sizes)
        b = sum(s[1] * n for s, n in zip(states, sizes)) / sum(sizes)
    return mean_test_auc(data, lambda xt: (standard(xt) @ w + b).numpy())


def row(label: str, data, seed: int) -> list:
    both, _ = central(data, ["train", "val"], seed)
    train_only, fitted = central(data, ["train"], seed)
    fed = federated(data, float(fitted[-1].C_[0]))
    return [label, data[next(iter(data))]["train"][0].shape[1], f"{both:.3f}", f"{train_only:.3f}", f"{fed:.3f}"]


def regions(x: np.ndarray, r: int, grid: int = 4, modalities: int = 2) -> np.ndarray:
    """Tokens (n, modalities * grid^3 * dim), in place, averaged over r^3 regions per modality."""
    n, k = x.shape[0], grid // r
    g = x.reshape(n, modalities, r, k, r, k, r, k, -1)
    return g.mean(axis=(3, 5, 7)).reshape(n, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="pretrained CMViM weights (a cmvim-sim pretraining checkpoint)")
    parser.add_argument("--config", default="quick.yaml")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cfg = prepare_cohort(run_config(load_yaml(config_path(args.config))))
    sites = prepare_sites(cfg)
    torch.manual_seed(cfg.seed)
    fresh = CMViMClassifier(cfg.model).eval()
    pretrained = CMViMClassifier(cfg.model)
    pretrained.load_pretrained(load_weights(args.weights))
    pretrained.eval()
    rows = []
    for label, model in (("regional means 6^3 (the linear baseline)", None), ("fresh encoder tokens", fresh),
                         ("pretrained encoder tokens", pretrained)):
        data = features(cfg, sites, model)
        rows.append(row(label, data, cfg.seed))
        print(f"  {label}: done [{time.perf_counter() - start:.0f}s]", flush=True)
    for label, r in (("pretrained tokens, 2^3 regions a modality", 2), ("pretrained tokens, modality means", 1)):
        rows.append(row(label, {n: {s: (regions(x, r), y) for s, (x, y) in d.items()} for n, d in data.items()},
                        cfg.seed))
    print(f"\nconfig {args.config}, weights {args.weights}, seed {cfg.seed}: mean per-site test AUC (AD vs CN)\n")
    print(format_table(["features", "dims", "central, train+val", "central, train", "federated (FedAvg LR), train"],
                       rows))


if __name__ == "__main__":
    main()
