"""Baselines with the same data, splits, engine and round schedule as the federated run:

  local        each site trains alone (R1 pretraining + R2 fine-tuning "rounds" of local epochs)
  centralized  all sites' training data pooled in one place: the upper reference
  linear       no deep model: a logistic regression on each subject's regional means, fit on every
               site's labelled training and validation subjects pooled (cmvim.linear)
  cnn3d        the supervised reference: a small 3D ResNet (cmvim.cnn3d) trained from scratch on MRI +
               PET, aggregated over the sites in this process by the server's own path (strategy), on the fine-tuning schedule (rounds, local
               epochs, lr, batch size) and selection rule (finetune.select) of the run
  cnn3d_centralized  the same network and schedule on all sites' training data pooled

All evaluate on every site's own test split, exactly like the federated model.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from cmvim.cnn3d import CnnTask, cnn_initial_state, cnn_run_config, describe
from cmvim.data import SiteData, make_loader
from cmvim.run_config import RunConfig
from cmvim.linear import collect, fit_logistic, positive_scores, regional_means
from cmvim.names import Phase
from cmvim.results import mean_auc, pooled_entry, site_entry
from cmvim.server.checkpoints import BestRound
from cmvim.site_task import SiteTask, evaluation_metrics
from cmvim.weights import initial_state


def train_rounds(cfg: RunConfig, tasks: list[SiteTask], phase: Phase, shared: dict,
                 aggregate=None, after_round=None) -> tuple[dict, dict[str, dict]]:
    """A phase's rounds in this process: one task trains alone (local, centralized), several are
    combined each round by the server's own aggregation (`server_aggregation` of the run's
    strategy: the guard, then Flower's FedAvg or whichever the config names; the federated run
    without Flower's transport, as benchmarks use it), or by `aggregate(phase, round, {site:
    RoundResult}, shared) -> shared`. `after_round(round, shared, local)` sees every round's
    global model (benchmarks score them). Under finetune.select: best_val the round is chosen
    by the federated run's rule (server.checkpoints.BestRound). Returns the shared parameters
    and each task's own (personalised) ones."""
    if aggregate is None and len(tasks) > 1:
        aggregate = server_aggregation(dataclasses.replace(cfg.strategy, min_nodes=1))
    local = {task.name: {} for task in tasks}
    best = BestRound() if phase == "finetune" and cfg.finetune.select == "best_val" else None
    for round_ in range(1, cfg.phase(phase).rounds + 1):
        results = [task.train(phase, round_, shared, local[task.name]) for task in tasks]
        local = {task.name: result.local for task, result in zip(tasks, results)}
        if aggregate is not None:
            shared = aggregate(phase, round_, {task.name: r for task, r in zip(tasks, results)}, shared)
        else:
            shared = results[0].shared
        if after_round is not None:
            after_round(round_, shared, local)
        if best is not None:
            best.offer(round_, validation_auc(tasks, shared, local), (shared, local))
    return best.value if best is not None and best.round else (shared, local)


def validation_auc(tasks: list[SiteTask], shared: dict, local: dict[str, dict]) -> float:
    """The mean per-site validation AUC of a model (each task scores its own validation split)."""
    entries = {}
    for task in tasks:
        # a task of one site scores itself; the centralized baseline's pooled task, site by site
        ones = [task] if len(task.sites) == 1 else [           # (a SiteTask, or a CnnTask: the same signature)
            type(task)(task.cfg, [site], task.name, limits=task.limits, device=str(task.device)) for site in task.sites]
        for one in ones:
            entries[f"{task.name}/{one.sites[0].site_dir.name}"] = site_entry(
                dict(one.evaluate("finetune", shared, local[task.name], "val").metrics))
    return mean_auc(entries)


def server_aggregation(strategy_cfg, tamper=None):
    """An `aggregate` for train_rounds that runs the server's own path: the guard, then the
    configured Flower strategy (one per phase, as the server makes them). `tamper(site, global,
    update) -> update` plays a dishonest site. The strategies' rejections: `.rejected`."""
    from cmvim.server.strategy import make_strategy, training_reply
    from flwr.app import ArrayRecord
    strategies: dict = {}
    flower_log = logging.getLogger("flwr")

    def aggregate(phase: str, round_: int, results: dict, shared: dict) -> dict:
        level = flower_log.level
        flower_log.setLevel(max(level, logging.WARNING))      # not Flower's "Received 3 results" every round
        try:
            if phase not in strategies:                        # one strategy a phase, made once
                strategies[phase] = make_strategy(strategy_cfg)
            strategy = strategies[phase]
            strategy.start_round(ArrayRecord(shared))
            replies = [training_reply(name, node, tamper(name, shared, r.shared) if tamper else r.shared, r.metrics)
                       for node, (name, r) in enumerate(results.items(), start=1)]
            arrays, _ = strategy.aggregate_train(round_, replies)
        finally:
            flower_log.setLevel(level)
        return arrays.to_torch_state_dict() if arrays is not None else shared

    aggregate.rejected = lambda: [r for s in strategies.values() for r in s.round_log.rejected]
    return aggregate


def _train(task: SiteTask, cfg: RunConfig, say) -> tuple[dict, dict]:
    pretrained, _ = train_rounds(cfg, [task], "pretrain", initial_state(cfg, "pretrain"))
    shared, local = train_rounds(cfg, [task], "finetune", initial_state(cfg, "finetune", pretrained))
    say(f"    {task.name}: trained ({cfg.pretrain.rounds} + {cfg.finetune.rounds} rounds)")
    return shared, local[task.name]


def _evaluate(cfg: RunConfig, sites: dict[str, SiteData], shared: dict, local: dict,
              name_of_model: str, task_type=SiteTask) -> dict:
    entries, histograms = {}, {}
    for name, site in sites.items():
        result = task_type(cfg, [site], name).evaluate("finetune", shared, local, "test")
        metrics = dict(result.metrics)
        entries[name] = site_entry(metrics)
        histograms[name] = result.histograms
    pooled = pooled_entry({k: v for k, v in histograms.items() if v is not None})
    return {"sites": entries, "pooled": pooled, "mean_auc": mean_auc(entries), "model": name_of_model}


def train_cnn3d(cfg: RunConfig, tasks: list[CnnTask], after_round=None) -> dict:
    """The 3D CNN's rounds: every task trains the same seeded initialisation on the CNN's own schedule
    (cmvim.cnn3d.cnn_run_config), aggregated each round by the server's own path, the round chosen
    as the run chooses its own (train_rounds); returns the chosen round's weights."""
    return train_rounds(cnn_run_config(cfg), tasks, "finetune", cnn_initial_state(cfg), after_round=after_round)[0]


def _cnn3d(cfg: RunConfig, sites: dict[str, SiteData], pooled: bool, say) -> dict:
    """The 3D CNN baseline (train_cnn3d): FedAvg over the sites, or one task holding every site's
    training data (pooled); then every site's test split."""
    tasks = ([CnnTask(cfg, list(sites.values()), "pooled")] if pooled
             else [CnnTask(cfg, [site], name) for name, site in sites.items()])
    shared = train_cnn3d(cfg, tasks)
    schedule = cnn_run_config(cfg).finetune
    say(f"    {'pooled' if pooled else 'FedAvg over ' + str(len(tasks)) + ' sites'}: trained "
        f"({schedule.rounds} rounds x {schedule.local_epochs} epochs)")
    out = _evaluate(cfg, sites, shared, {}, describe(cfg), task_type=CnnTask)
    out["n_train"] = sum(len(task.views.finetuning()) for task in tasks)
    return out


def linear_test_scores(cfg: RunConfig, sites: dict[str, SiteData]) -> tuple[dict[str, tuple], int]:
    """The linear baseline's fit and scores: fit once on every site's labelled train + val subjects
    pooled (its own cross-validation picks the L2 strength, as the deep model's validation split
    picks its round), then every site scores its own test split. Returns ({site: (is AD 0/1,
    P(AD)) of its test subjects}, the number of training subjects); benchmarks keep the scores."""
    num_classes = cfg.model.num_classes

    def features(site: SiteData, splits: list[str]):
        batches = (batch for split in splits
                   for batch in make_loader(site.dataset(split, labeled=True, classes=cfg.model.classes), 16, False))
        return collect(batches, lambda batch: regional_means(batch, cfg.linear.grid))

    parts = [features(site, ["train", "val"]) for site in sites.values()]
    x = np.concatenate([p[0] for p in parts if len(p[0])])
    y = np.concatenate([p[1] for p in parts if len(p[1])])
    model = fit_logistic(x, (y == num_classes - 1).astype(int), cfg.linear, seed=cfg.seed)
    scores = {}
    for name, site in sites.items():
        x_test, y_test = features(site, ["test"])
        scores[name] = ((y_test == num_classes - 1).astype(int), positive_scores(model, x_test) if len(y_test)
                        else np.zeros(0))
    return scores, int(len(y))


def _linear(cfg: RunConfig, sites: dict[str, SiteData]) -> dict:
    """The linear baseline (`linear_test_scores`), as the run reports it: per-site metrics only."""
    scores, n_train = linear_test_scores(cfg, sites)
    entries, histograms = {}, {}
    for name, (binary, positive) in scores.items():
        if len(binary) == 0:
            entries[name] = {"n_test": 0}
            continue
        metrics, histograms[name] = evaluation_metrics(cfg, binary, positive)
        entries[name] = site_entry(metrics)
    return {"sites": entries, "pooled": pooled_entry(histograms), "mean_auc": mean_auc(entries),
            "model": f"logistic regression (L2, {cfg.linear.folds}-fold CV) on {cfg.linear.grid}^3 regional means "
                     f"per modality", "n_train": n_train}


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
    if "linear" in which:
        start = time.perf_counter()
        say(f"\n== baseline: linear (logistic regression on {cfg.linear.grid}^3 regional means, all sites pooled) ==")
        out["linear"] = _linear(cfg, sites)
        out["linear"]["seconds"] = round(time.perf_counter() - start, 1)
    for name, pooled, what in (("cnn3d", False, "FedAvg over the sites"),
                               ("cnn3d_centralized", True, "all sites' training data pooled")):
        if name in which:
            start = time.perf_counter()
            say(f"\n== baseline: {name} (a 3D ResNet from scratch on MRI + PET, {what}) ==")
            out[name] = _cnn3d(cfg, sites, pooled, say)
            out[name]["seconds"] = round(time.perf_counter() - start, 1)
    return out
