"""What a run tells a person and writes to its results folder: the progress line after every
round (sites, loss, validation AUC, privacy spent, ETA) and, at the end, the one writer of
metrics.json, summary.md, the ROC plots, the loss and validation AUC curves (cmvim.figures) and
the TensorBoard logs (cmvim.tracking), baselines included. (reconstruction.png is drawn once
pretraining ends, by the runner.)"""
from __future__ import annotations

import math
from pathlib import Path

from cmvim.config import to_dict
from cmvim.figures import mean_loss, plot_curves
from cmvim.calibration import Calibration
from cmvim.results import (add_calibration, calibration_table, mean_auc, plot_reliability, plot_rocs,
                           pooled_entry, site_table, write_metrics, write_summary)
from cmvim.run_config import RunConfig
from cmvim.tracking import write_tensorboard

from .central_dp import CentralDP


def say(text: str) -> None:
    print(text, flush=True)


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress(phase: str, round_: int, total: int, later_rounds: int, entry: dict, seconds: list[float],
             connected: int, earlier: dict | None = None) -> None:
    """The round's line: sites that trained, their loss (mean weighted by examples), validation
    AUC (`earlier`: the previous round's entry, whose validation this round's training carried),
    epsilon, time per round and the ETA of the run; then any site left out and why."""
    train = entry["train"]
    losses = {site: m.get("loss") for site, m in train.items() if m.get("loss") is not None}
    mean = mean_loss(train)
    # this phase's recent rounds predict its rest; a later phase is guessed from them too
    remaining = total - round_ + later_rounds
    recent = seconds[1:][-3:] or seconds       # a phase's first round includes starting the workers
    per_round = sum(recent) / len(recent)
    line = f"[{phase}] round {round_}/{total} | sites {len(train)}/{connected} | "
    if mean is not None:
        line += f"loss {mean:.4f} (" + ", ".join(f"{s} {v:.3f}" for s, v in sorted(losses.items())) + ")"
    elif train:
        line += "loss kept at the sites (DP)"        # under DP a site sends only its accounting
    else:
        line += "no updates"
    for validated, label in ((earlier, f" (round {round_ - 1})"), (entry, "")):
        aucs = [m["auc"] for m in (validated or {}).get("evaluate", {}).values()
                if isinstance(m.get("auc"), float) and math.isfinite(m["auc"])]
        if aucs:
            line += f" | val AUC{label} {sum(aucs) / len(aucs):.3f}"
    eps = {site: m["epsilon"] for site, m in train.items() if "epsilon" in m}
    if eps:
        line += " | epsilon " + ", ".join(f"{s} {v:.2f}" for s, v in sorted(eps.items()))
    if "central_dp" in entry:
        line += f" | central epsilon {entry['central_dp']['epsilon']:.2f}"
    line += f" | {entry['seconds']:.0f}s/round"
    if "site_work_seconds" in entry:
        queued = f", {entry['sites_at_once']} sites at a time" if "sites_at_once" in entry else ""
        line += f" (site work {entry['site_work_seconds']:.0f}s{queued}, overhead {entry['overhead_seconds']:.0f}s)"
    line += f" | ETA {fmt_duration(per_round * remaining)}"
    say(line)
    for rejection in entry["rejected"]:
        say(f"    ! site {rejection['site']} left out ({rejection['stage']}): {rejection['reason']}")


def privacy_spent(history: list[dict]) -> dict[str, dict]:
    """Per site, the epsilon (and delta) its last DP round reported: the run's spend there."""
    spent: dict[str, dict] = {}
    for entry in history:
        for name, metrics in entry["train"].items():
            if "epsilon" in metrics:
                spent[name] = {"epsilon": metrics["epsilon"], "delta": metrics["delta"]}
    return spent


def _drawn(what: str, draw):
    """`draw()`'s result, or None with one line saying why `what` was not written."""
    try:
        return draw()
    except Exception as exc:  # noqa: BLE001 - the metrics are written; a figure is not worth the run
        say(f"{what} not written ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})")
        return None


def final_report(cfg: RunConfig, out_dir: Path, sites: dict, histograms: dict, history: list[dict],
                 failures: list[dict], elapsed: float, central: CentralDP, baselines: dict | None = None,
                 model: dict | None = None) -> dict:
    """metrics.json, the ROC plots, the curves, the TensorBoard logs and summary.md for the finished
    run; its table printed. Returns what metrics.json holds. `model`: where the exported model went
    and its decision rule."""
    pooled = pooled_entry(histograms)
    lines = [f"- strategy: {cfg.strategy.name}; rounds: pretrain {cfg.pretrain.rounds}, "
             f"finetune {cfg.finetune.rounds} (from a {cfg.finetune_init} encoder); model: {cfg.model.summary()}",
             f"- sites: {', '.join(sorted(sites))}; mean per-site AUC {mean_auc(sites):.3f}; pooled AUC "
             f"{pooled['auc']:.3f}", f"- wall time of the federated part: {fmt_duration(elapsed)}"]
    if failures:
        lines.append(f"- left out: {len(failures)} site-round(s); see metrics.json 'failures'")
    if cfg.privacy.enabled:
        spent = privacy_spent(history)
        for name, entry in sites.items():
            entry.update(spent.get(name, {}))
        pv = cfg.privacy
        setting = (f"noise multiplier {pv.noise_multiplier}" if pv.noise_multiplier is not None
                   else f"target epsilon {pv.target_epsilon}")
        lines.append(f"- differential privacy (DP-SGD at each site, {setting}, clip {pv.max_grad_norm}): epsilon "
                     "spent " + ", ".join(f"{n} {e['epsilon']:.2f} (delta {e['delta']:.0e})"
                                          for n, e in sorted(spent.items())))
    if cfg.secure_aggregation.enabled:
        sa = cfg.secure_aggregation
        lines.append(f"- secure aggregation (Flower SecAgg+): the server saw only the weighted sum of the sites' "
                     f"models each training round (weights quantized to {sa.quantization_range} levels over "
                     f"+-{sa.clipping_range:g} x max_weight {sa.max_weight:g} / num-examples)")
    decision = (model or {}).get("decision")
    transform = Calibration.from_dict(decision).apply if decision else None
    reliability = add_calibration(sites, pooled, histograms, transform)
    if "brier" in pooled:
        lines.append(f"- calibration of the reported scores on the test splits: pooled Brier {pooled['brier']:.3f}, "
                     f"ECE {pooled['ece']:.3f} (10 bins; reliability.png; from the sites' score histograms)")
    extra = {}
    if model:
        extra["model"] = model
        decision = model.get("decision", {})
        lines.append(f"- accuracy, sensitivity and specificity at the decision threshold {decision.get('threshold', 0.5):.3f} "
                     f"chosen on validation: {decision.get('note', '')}")
        lines.append(f"- the model: `{model['path']}/` (model.safetensors + config.json); score new subjects at a site "
                     f"with `cmvim-client predict --model {out_dir / model['path']} --data SITE_DIR --out scores.csv`"
                     if "path" in model else f"- {model.get('note', 'no model written')}")
    if central.active:
        extra["central_dp"], line = central.summary()
        lines.append(line)
    if baselines:
        lines.append(f"- baselines: {', '.join(baselines)} (same data, splits, engine and schedule): mean per-site "
                     "AUC " + ", ".join(f"{name} {b['mean_auc']:.3f}" for name, b in baselines.items()))
    path = write_metrics(out_dir, sites, pooled, history, to_dict(cfg), baselines=baselines, failures=failures,
                         summary=lines, extra=extra)
    # pictures for a person: one that cannot be drawn is a line, never a run without its summary
    _drawn("ROC plots", lambda: plot_rocs(out_dir, histograms, sites, cfg.model.task))
    _drawn("reliability diagram", lambda: plot_reliability(out_dir, reliability, cfg.model.classes[-1]))
    _drawn("curves", lambda: plot_curves(out_dir, history, cfg.finetune.probe_rounds, say=say))
    tensorboard = _drawn("TensorBoard logs", lambda: write_tensorboard(out_dir, history, sites, pooled, baselines,
                                                                          say=say))
    table = site_table(sites, pooled, baselines)
    heading = ("federated vs " + " vs ".join(baselines) + " (test AUC per site)") if baselines else "test metrics per site"
    say(f"\n{heading}:\n{table}")
    calibrated = calibration_table(sites, pooled)
    if calibrated:
        say(f"\ncalibration of the reported scores (test splits; Brier: mean squared error of P({cfg.model.classes[-1]}), ECE: 10 bins):\n"
            f"{calibrated}")
    write_summary(out_dir, "cmvim federated run" + (" with baselines" if baselines else ""),
                  table + (f"\n\n## Calibration of the reported scores (test splits)\n\n{calibrated}" if calibrated else ""),
                  lines, cfg.model.task)
    say(f"\nresults: {path}, {out_dir / 'summary.md'} (it lists the figures)"
        + (f"; TensorBoard: tensorboard --logdir {tensorboard}" if tensorboard else ""))
    return {"sites": sites, "pooled": pooled, "rounds": history, "failures": failures, "baselines": baselines}
