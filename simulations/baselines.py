"""Baselines with the same data, splits, engine and round schedule as the federated run:

  local        each site trains alone (R1 pretraining + R2 fine-tuning "rounds" of local epochs)
  centralized  all sites' training data pooled in one place: the upper reference

Both evaluate on every site's own test split, exactly like the federated model.
"""
from __future__ import annotations

import time

from cmvim.data import SiteData
from cmvim.federation import RunConfig
from cmvim.results import mean_auc, pooled_entry, site_entry
from cmvim.site_task import SiteTask, initial_state


def _train(task: SiteTask, cfg: RunConfig, say) -> tuple[dict, dict]:
    shared, local = initial_state(cfg, "pretrain"), {}
    for round_ in range(1, cfg.pretrain.rounds + 1):
        result = task.train("pretrain", round_, shared, local)
        shared, local = result.shared, result.local
    pretrained = shared
    shared, local = initial_state(cfg, "finetune", pretrained), {}
    for round_ in range(1, cfg.finetune.rounds + 1):
        result = task.train("finetune", round_, shared, local)
        shared, local = result.shared, result.local
    say(f"    {task.name}: trained ({cfg.pretrain.rounds} + {cfg.finetune.rounds} rounds)")
    return shared, local


def _evaluate(cfg: RunConfig, sites: dict[str, SiteData], shared: dict, local: dict,
              name_of_model: str) -> dict:
    entries, histograms = {}, {}
    for name, site in sites.items():
        result = SiteTask(cfg, [site], name).evaluate("finetune", shared, local, "test")
        metrics = dict(result.metrics)
        entries[name] = site_entry(metrics)
        histograms[name] = result.histograms
    pooled = pooled_entry({k: v for k, v in histograms.items() if v is not None})
    return {"sites": entries, "pooled": pooled, "mean_auc": mean_auc(entries), "model": name_of_model}


def run_baselines(cfg: RunConfig, sites: dict[str, SiteData], which: list[str], say=print) -> dict:
    out = {}
    if "local" in which:
        start = time.perf_counter()
        say("\n== baseline: local (each site alone) ==")
        entries, histograms = {}, {}
        for name, site in sites.items():
            shared, local = _train(SiteTask(cfg, [site], name), cfg, say)
            result = SiteTask(cfg, [site], name).evaluate("finetune", shared, local, "test")
            entries[name] = site_entry(dict(result.metrics))
            histograms[name] = result.histograms
        out["local"] = {"sites": entries, "pooled": pooled_entry(histograms), "mean_auc": mean_auc(entries),
                        "seconds": round(time.perf_counter() - start, 1)}
    if "centralized" in which:
        start = time.perf_counter()
        say("\n== baseline: centralized (all sites' data pooled) ==")
        shared, local = _train(SiteTask(cfg, list(sites.values()), "pooled"), cfg, say)
        out["centralized"] = _evaluate(cfg, sites, shared, local, "centralized")
        out["centralized"]["seconds"] = round(time.perf_counter() - start, 1)
    return out
