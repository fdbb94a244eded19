"""A run's curves, for a person: the training loss and validation AUC of every round, from the
run's round history alone (no model: cmvim.tracking logs the same series to TensorBoard; the
reconstruction figure, which needs the model, is cmvim.reconstruction's).

    curves_loss.png       training loss per round: a panel per phase, a line per site and their
                          mean weighted by examples (the progress line's)
    curves_val_auc.png    validation AUC per fine-tuning round: per site, their mean (what
                          finetune.select: best_val selects by), the final model's round marked

A round history entry is the coordinator's record of one round (server/runner.py):
{"phase", "round", "seconds", "train": {site: {"loss", "num-examples", ...}},
"evaluate": {site: {"auc", ...}}, "selected": bool (best_val only), ...}. Matplotlib (the
[server] and [sim] extras) draws; without it a function says so in one line and draws nothing.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from .names import PHASES, Phase
from .protocol import NUM_EXAMPLES
from .results import mean_auc, pyplot

LOSS_FIGURE, AUC_FIGURE = "curves_loss.png", "curves_val_auc.png"

Series = list[tuple[int, float]]          # (round, value)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_loss(train: dict[str, dict]) -> float | None:
    """A round's training loss over the sites that sent one, weighted by their examples; None when
    none did (under DP-SGD the loss stays at the sites)."""
    losses = {site: m["loss"] for site, m in train.items() if _finite(m.get("loss"))}
    weight = sum(train[s].get(NUM_EXAMPLES, 0) for s in losses)
    if not losses:
        return None
    if weight <= 0:
        return sum(losses.values()) / len(losses)
    return sum(losses[s] * train[s].get(NUM_EXAMPLES, 0) for s in losses) / weight


def site_series(history: list[dict], phase: Phase, record: str, key: str) -> dict[str, Series]:
    """Per site, (round, value) of metric `key` in each `phase` round's `record` ("train" or
    "evaluate"); rounds where a site sent no finite value are left out."""
    series: dict[str, Series] = {}
    for entry in history:
        if entry["phase"] != phase:
            continue
        for site, metrics in entry.get(record, {}).items():
            if _finite(metrics.get(key)):
                series.setdefault(site, []).append((entry["round"], float(metrics[key])))
    return dict(sorted(series.items()))


def mean_series(history: list[dict], phase: Phase, record: str) -> Series:
    """The sites' mean per `phase` round: the example-weighted loss ("train"), or the plain mean of
    the validation AUCs ("evaluate"; the score finetune.select: best_val compares)."""
    out: Series = []
    for entry in history:
        if entry["phase"] != phase or not entry.get(record):
            continue
        value = mean_loss(entry[record]) if record == "train" else mean_auc(entry[record])
        if value is not None and math.isfinite(value):
            out.append((entry["round"], float(value)))
    return out


def final_round(history: list[dict]) -> tuple[int, str] | None:
    """The fine-tuning round whose model is final, and why: the last one `selected` by best_val,
    else the last round."""
    rounds = [e for e in history if e["phase"] == "finetune"]
    if not rounds:
        return None
    selected = [e["round"] for e in rounds if e.get("selected")]
    if selected:
        return selected[-1], "best validation AUC"
    return rounds[-1]["round"], "last round"


def _draw_series(ax, series: dict[str, Series], mean: Series, mean_label: str) -> None:
    for site, points in series.items():
        rounds, values = zip(*points)
        ax.plot(rounds, values, marker="o", ms=3, lw=1.2, alpha=0.8, label=f"site {site}")
    if mean:
        rounds, values = zip(*mean)
        ax.plot(rounds, values, color="black", lw=2.4, label=mean_label)


def plot_loss_curves(history: list[dict], path: Path, probe_rounds: int = 0,
                     say: Callable[[str], None] = print) -> Path | None:
    """curves_loss.png: a panel per phase that ran, a line per site and the weighted mean. The
    fine-tuning rounds that trained the head alone (LP-FT's probe rounds) are shaded: their loss
    is the head's on frozen features, not the whole model's."""
    phases = [p for p in PHASES if any(e["phase"] == p for e in history)]
    if not phases:
        return None
    plt = pyplot("the loss curves", say)
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(phases), figsize=(5.2 * len(phases), 3.8), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        series = site_series(history, phase, "train", "loss")
        _draw_series(ax, series, mean_series(history, phase, "train"), "mean (weighted by examples)")
        if phase == "finetune" and probe_rounds:
            ax.axvspan(0.5, probe_rounds + 0.5, color="0.9", zorder=0, label="head only (probe rounds)")
        if not series:
            ax.text(0.5, 0.5, "no loss reported\n(under DP-SGD it stays at the sites)", ha="center",
                    va="center", transform=ax.transAxes, color="0.4")
        ax.set(xlabel="round", ylabel="training loss", title=f"{phase}: training loss per round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_val_auc(history: list[dict], path: Path, say: Callable[[str], None] = print) -> Path | None:
    """curves_val_auc.png: validation AUC per fine-tuning round, per site and their mean, the
    round of the final model marked. None (no file) when no round was validated
    (evaluation.every_round: false)."""
    series = site_series(history, "finetune", "evaluate", "auc")
    if not series:
        return None
    plt = pyplot("the validation AUC curves", say)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.axhline(0.5, ls="--", color="0.7", lw=1, label="chance")
    mean = mean_series(history, "finetune", "evaluate")
    _draw_series(ax, series, mean, "mean over sites")
    final = final_round(history)
    if final:
        round_, why = final
        ax.axvline(round_, color="#c0392b", lw=1.5, ls=":", label=f"final model: round {round_} ({why})")
        score = dict(mean).get(round_)
        if score is not None:
            ax.plot([round_], [score], marker="*", ms=14, color="#c0392b", zorder=5)
    ax.set(xlabel="fine-tuning round", ylabel="validation AUC", ylim=(-0.02, 1.02),
           title="validation AUC per fine-tuning round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(out_dir: Path, history: list[dict], probe_rounds: int = 0,
                say: Callable[[str], None] = print) -> list[Path]:
    """The run's curves in `out_dir` (a figure this run cannot draw is removed, not left from an
    earlier run in the same folder); matplotlib's absence said once."""
    targets = [out_dir / LOSS_FIGURE, out_dir / AUC_FIGURE]
    for stale in targets:
        stale.unlink(missing_ok=True)
    if pyplot("the loss and validation AUC curves", say) is None:
        return []
    drawn = [plot_loss_curves(history, targets[0], probe_rounds, say), plot_val_auc(history, targets[1], say)]
    return [p for p in drawn if p is not None]
