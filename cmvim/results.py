"""A run's results folder (the contract in docs/architecture.md):

    metrics.json      {"sites": {site: {"auc", "auc_ci", "acc", "sensitivity", "specificity", "n_test", ...}},
                       "pooled": {"auc", ...}, "rounds": [...], "config": {...}, "baselines": {...}}
    roc_<site>.png    ROC curve per site (and roc_pooled.png), from the shared score histograms
    summary.md        the per-site table and what the run was, for a person, and the figures there
                      (cmvim.figures' curves and reconstruction, cmvim.tracking's TensorBoard logs)
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

from .metrics import auc_ci_from_histograms, auc_from_histograms, calibration_from_histograms, roc_from_histograms
from .protocol import NUM_EXAMPLES, SUPPRESSED
from .tables import format_table

SITE_KEYS = ("auc", "auc_ci", "acc", "sensitivity", "specificity", "n_pos", "n_neg", SUPPRESSED)


def site_entry(metrics: dict) -> dict:
    """A site's evaluation MetricRecord -> its metrics.json entry (no histograms; NUM_EXAMPLES as n_test)."""
    entry = {k: metrics[k] for k in SITE_KEYS if k in metrics}
    entry["n_test"] = int(metrics.get(NUM_EXAMPLES, 0))
    return entry


def summed_histograms(histograms: dict[str, tuple[list, list]]) -> tuple[np.ndarray, np.ndarray]:
    """The sites' positive and negative score histograms, summed: the pooled ROC's input."""
    pos = np.sum([np.asarray(h[0]) for h in histograms.values()], axis=0)
    neg = np.sum([np.asarray(h[1]) for h in histograms.values()], axis=0)
    return pos, neg


def pooled_entry(histograms: dict[str, tuple[list, list]]) -> dict:
    """Pooled AUC over sites from the sum of their score histograms."""
    if not histograms:
        return {"auc": float("nan"), "n_test": 0}
    pos, neg = summed_histograms(histograms)
    return {"auc": auc_from_histograms(pos, neg), "auc_ci": auc_ci_from_histograms(pos, neg),
            "n_test": int(pos.sum() + neg.sum()), "sites": sorted(histograms),
            "method": "AUC of the summed per-site score histograms; auc_ci: 95% bootstrap (1000 redraws of each "
                      "class from its histogram)"}


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    return value


def write_metrics(out_dir: Path, sites: dict, pooled: dict, rounds: list, config: dict,
                  baselines: dict | None = None, failures: list | None = None,
                  summary: list[str] | None = None, extra: dict | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"sites": sites, "pooled": pooled, "rounds": rounds, "config": config, **(extra or {})}
    if summary:
        payload["summary"] = summary
    if baselines:
        payload["baselines"] = baselines
    if failures:
        payload["failures"] = failures
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(_clean(payload), indent=2))
    return path


def pyplot(what: str, say: Callable[[str], None] = print):
    """matplotlib's pyplot on the file-only backend, or None, saying in one line that `what` is not drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        say(f"{what} not drawn: matplotlib is not installed (pip install 'cmvim[server]', or at a site 'cmvim[qc]')")
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_rocs(out_dir: Path, histograms: dict[str, tuple[list, list]], sites: dict,
              task: str = "AD vs CN") -> list[Path]:
    """roc_<site>.png per site and pooled; none, saying so, where matplotlib is not installed."""
    plt = pyplot("ROC plots (the AUCs are in metrics.json and summary.md)", lambda text: print(text, flush=True))
    if plt is None:
        return []

    paths = []
    curves = dict(histograms)
    if len(histograms) > 1:
        pos, neg = summed_histograms(histograms)
        curves["pooled"] = (pos.tolist(), neg.tolist())
    for name, (pos, neg) in curves.items():
        fpr, tpr = roc_from_histograms(pos, neg)
        # the site's own AUC (exact scores) where it sent one; the curve is drawn from binned scores
        auc = sites.get(name, {}).get("auc")
        if auc is None or not math.isfinite(auc):
            auc = auc_from_histograms(pos, neg)
        fig, ax = plt.subplots(figsize=(4.2, 4.2))
        ax.plot([0, 1], [0, 1], ls="--", color="0.7", lw=1)
        label = f"AUC {auc:.3f}" if math.isfinite(auc) else "AUC undefined"
        ci = sites.get(name, {}).get("auc_ci")
        if ci and all(c is not None and math.isfinite(c) for c in ci):
            label += f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})"
        ax.plot(fpr, tpr, lw=2, color="#c0392b", marker="o", ms=3, label=label)
        n = int(np.sum(pos) + np.sum(neg))
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
               title=f"{'pooled' if name == 'pooled' else 'site ' + name}: {task} (n={n})")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"roc_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def add_calibration(sites: dict, pooled: dict, histograms: dict[str, tuple[list, list]], transform=None) -> dict:
    """Brier score and ECE (10 bins) of the reported scores, per site and pooled, into their
    entries (cmvim.metrics.calibration_from_histograms: from the sites' score histograms, as the
    ROC is); returns {name: reliability curve} for the diagram."""
    curves = {}
    named = dict(histograms)
    if histograms:
        pos, neg = summed_histograms(histograms)
        named["pooled"] = (pos, neg)
    for name, (pos, neg) in named.items():
        if float(np.sum(pos) + np.sum(neg)) == 0:
            continue
        found = calibration_from_histograms(pos, neg, transform)
        entry = pooled if name == "pooled" else sites.get(name)
        if entry is None:
            continue
        entry["brier"], entry["ece"] = found["brier"], found["ece"]
        curves[name] = found["reliability"]
    return curves


def calibration_table(sites: dict, pooled: dict) -> str:
    rows = [[name, _fmt(m.get("brier")), _fmt(m.get("ece")), m.get("n_test", 0)]
            for name, m in sorted(sites.items()) if "brier" in m]
    if "brier" in pooled:
        rows.append(["pooled", _fmt(pooled.get("brier")), _fmt(pooled.get("ece")), pooled.get("n_test", 0)])
    return format_table(["site", "Brier", "ECE", "n test"], rows) if rows else ""


def plot_reliability(out_dir: Path, curves: dict[str, list], positive: str = "AD") -> Path | None:
    """reliability.png: observed AD frequency against the mean reported score, per site and pooled
    (10 bins of the score; a point's size is its subjects)."""
    plt = pyplot("the reliability diagram (Brier and ECE are in metrics.json)", lambda text: print(text, flush=True))
    if plt is None or not curves:
        return None
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfect calibration")
    for name, curve in sorted(curves.items(), key=lambda item: item[0] == "pooled"):
        if not curve:
            continue
        x, y, n = (np.array(v, dtype=float) for v in zip(*curve))
        pooled = name == "pooled"
        ax.plot(x, y, lw=2.2 if pooled else 1, color="#c0392b" if pooled else None, alpha=1 if pooled else 0.7,
                marker="o", label=name if pooled else f"site {name}")
        ax.scatter(x, y, s=12 + 60 * n / n.max(), color="#c0392b" if pooled else None, alpha=0.5)
    ax.set(xlabel=f"mean reported P({positive}) in the bin", ylabel=f"observed share of {positive}", xlim=(0, 1), ylim=(0, 1),
           title="calibration on the test splits")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "reliability.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value, digits=3):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def site_table(sites: dict, pooled: dict, baselines: dict | None = None) -> str:
    """Per site: federated AUC [CI], accuracy, sensitivity, specificity, n; baselines' AUC beside it."""
    baselines = baselines or {}
    headers = ["site", "AUC", "95% CI", "acc", "sens", "spec", "n test"] + [f"AUC {b}" for b in baselines]
    rows = []
    for name, m in sorted(sites.items()):
        ci = m.get("auc_ci") or [None, None]
        rows.append([name, _fmt(m.get("auc")), f"{_fmt(ci[0], 2)}-{_fmt(ci[1], 2)}", _fmt(m.get("acc")),
                     _fmt(m.get("sensitivity")), _fmt(m.get("specificity")), m.get("n_test", 0)]
                    + [_fmt(b.get("sites", {}).get(name, {}).get("auc")) for b in baselines.values()])
    rows.append(["mean", _fmt(mean_auc(sites)), "", "", "", "", ""]
                + [_fmt(b.get("mean_auc")) for b in baselines.values()])
    pooled_ci = pooled.get("auc_ci")
    rows.append(["pooled", _fmt(pooled.get("auc")), f"{_fmt(pooled_ci[0], 2)}-{_fmt(pooled_ci[1], 2)}" if pooled_ci else "",
                 "", "", "", pooled.get("n_test", 0)]
                + [_fmt(b.get("pooled", {}).get("auc")) for b in baselines.values()])
    return format_table(headers, rows)


def mean_auc(sites: dict) -> float:
    aucs = [m["auc"] for m in sites.values() if m.get("auc") is not None and math.isfinite(m["auc"])]
    return float(np.mean(aucs)) if aucs else float("nan")


# the results folder's figures, in the order summary.md lists them: (file pattern, what it shows)
FIGURES = (("roc_*.png", "ROC curves (test split, per site and pooled)"),
           ("reliability.png", "reliability diagram of the reported scores (test split, per site and pooled)"),
           ("curves_loss.png", "training loss per round, per site and the mean weighted by examples"),
           ("curves_val_auc.png", "validation AUC per fine-tuning round, the final model's round marked"),
           ("reconstruction.png", "the pretrained model's reconstruction of one subject's masked scans"))


def figures_section(out_dir: Path) -> list[str]:
    """summary.md's list of the figures and logs present in `out_dir`."""
    lines = []
    for pattern, what in FIGURES:
        found = sorted(out_dir.glob(pattern))
        if found:
            lines.append(f"- {what}: " + ", ".join(f"`{p.name}`" for p in found))
    if any((out_dir / "tensorboard").glob("events.out.tfevents.*")):
        lines.append("- TensorBoard logs (loss, validation AUC, epsilon, round times per site and round; test "
                     "AUCs): `tensorboard --logdir tensorboard` in this folder")
    return ["## Figures", "", *lines, ""] if lines else []


def write_summary(out_dir: Path, title: str, table: str, lines: list[str], task: str = "AD vs CN") -> Path:
    path = out_dir / "summary.md"
    body = [f"# {title}", "", *lines, "", f"## Per-site test metrics ({task})", "", table, "",
            *figures_section(out_dir)]
    path.write_text("\n".join(body))
    return path
