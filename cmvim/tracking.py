"""A run's TensorBoard logs, written by the coordinator from its round history (the records
cmvim.figures reads; see there) with tensorboardX, a small pure-Python writer of TensorBoard's
event files (no TensorFlow). Look at them with `tensorboard --logdir DIR/tensorboard`.

Scalars, the step being the phase's round:
    <phase>/loss/<site>, <phase>/loss/mean          training loss (mean weighted by examples)
    <phase>/val_auc/<site>, <phase>/val_auc/mean    validation AUC (fine-tuning rounds validated)
    <phase>/epsilon/<site>                          DP-SGD: the epsilon a site has spent
    <phase>/central_epsilon                         central DP: the run's epsilon
    <phase>/round_seconds, <phase>/site_work_seconds, <phase>/overhead_seconds
and, at step 0, the final test AUCs: test/auc/<site>, test/auc/mean, test/auc/pooled, and a
baseline's beside them as test/auc_<baseline>/<site>, ...
"""
from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path
from typing import Callable

from .figures import mean_series, site_series
from .results import mean_auc

TENSORBOARD_DIR = "tensorboard"


def round_scalars(history: list[dict]) -> list[tuple[str, float, int]]:
    """(tag, value, step) of every per-round scalar in the history (tags in the module's docstring)."""
    scalars: list[tuple[str, float, int]] = []
    for phase in dict.fromkeys(e["phase"] for e in history):
        for record, key, name in (("train", "loss", "loss"), ("evaluate", "auc", "val_auc"),
                                  ("train", "epsilon", "epsilon")):
            for site, points in site_series(history, phase, record, key).items():
                scalars += [(f"{phase}/{name}/{site}", value, round_) for round_, value in points]
            if name != "epsilon":
                scalars += [(f"{phase}/{name}/mean", value, round_)
                            for round_, value in mean_series(history, phase, record)]
        for entry in (e for e in history if e["phase"] == phase):
            for key, tag in (("seconds", "round_seconds"), ("site_work_seconds", "site_work_seconds"),
                             ("overhead_seconds", "overhead_seconds")):
                if _finite(entry.get(key)):
                    scalars.append((f"{phase}/{tag}", float(entry[key]), entry["round"]))
            if _finite(entry.get("central_dp", {}).get("epsilon")):
                scalars.append((f"{phase}/central_epsilon", float(entry["central_dp"]["epsilon"]), entry["round"]))
    return scalars


def final_scalars(sites: dict, pooled: dict, baselines: dict | None = None) -> list[tuple[str, float, int]]:
    """(tag, value, 0) of the final test AUCs: per site, their mean and the pooled one; baselines beside."""
    scalars = []
    for prefix, results, pooled_auc in [("test/auc", sites, pooled.get("auc"))] + [
            (f"test/auc_{name}", b.get("sites", {}), b.get("pooled", {}).get("auc"))
            for name, b in (baselines or {}).items()]:
        values = {site: m.get("auc") for site, m in results.items()}
        values["mean"] = mean_auc(results)
        values["pooled"] = pooled_auc
        scalars += [(f"{prefix}/{name}", float(v), 0) for name, v in sorted(values.items()) if _finite(v)]
    return scalars


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def write_tensorboard(out_dir: Path, history: list[dict], sites: dict, pooled: dict, baselines: dict | None = None,
                      say: Callable[[str], None] = print) -> Path | None:
    """DIR/tensorboard/ holding one event file with the run's scalars (an earlier one there, from a
    run before a resume, is replaced: the history holds every round). Each round's point is
    timed by the history's round seconds, so TensorBoard's relative-time axis reads as the run's
    time. None, said in one line, where tensorboardX is not installed."""
    if importlib.util.find_spec("tensorboardX") is None:
        say("TensorBoard logs not written: tensorboardX is not installed (pip install 'cmvim[server]'); "
            "the same numbers are in metrics.json")
        return None
    from tensorboardX import SummaryWriter

    log_dir = Path(out_dir) / TENSORBOARD_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("events.out.tfevents.*"):
        old.unlink()
    # wall time per round: the run's end minus the rounds after it
    total = sum(float(e.get("seconds", 0.0)) for e in history)
    clock, start = {}, time.time() - total
    for entry in history:
        start += float(entry.get("seconds", 0.0))
        clock[(entry["phase"], entry["round"])] = start
    writer = SummaryWriter(logdir=str(log_dir))
    try:
        for tag, value, step in round_scalars(history):
            writer.add_scalar(tag, value, step, walltime=clock.get((tag.split("/")[0], step)))
        for tag, value, step in final_scalars(sites, pooled, baselines):
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()
    return log_dir
