"""`cmvim-client predict --model DIR --data SITE_DIR --out FILE.csv`: score every subject-visit of a
site folder with a model a run exported (its results' model/), at the site. Nothing is sent.

The site folder is read as training reads it (manifest.csv or a BIDS dataset; the model's
preprocessing, into the site's per-user cache, never into its folder); a row that cannot be read is listed with its problem, as
`cmvim-client check` lists it, and the rest are scored. The CSV has one row per scored visit:

    subject_id, visit, split, label, inputs, score, predicted, model_probability

and FILE.json beside it says what produced them: the model (its folder, the SHA-256 of its
weights file and tensors, its run fingerprint), the threshold and calibration, the cmvim version
and the time. `inputs` names what a row was scored from (`mri+pet`, or `mri` where the visit has
no PET or the model reads none).

`score` is the calibrated P(AD) (P(MCI) for a CN vs MCI model) the run reported its metrics on (config.json's decision: Platt
scaling fitted on validation, or the model's own probability when the run could not fit it),
`predicted` the label at the stored threshold, `model_probability` the classifier's softmax P(AD)
before calibration. `split` is the split the training run gave the subject (the manifest's, or
the run's seeded rule with the model's seed): a run's test subjects are marked `test`, so their
scores reproduce the run's test metrics. `label` is the folder's label where it has one.
Exit status: 0 when at least one visit was scored, 1 otherwise.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
from collections import Counter
from pathlib import Path

import numpy as np

from cmvim.data import DataError, SiteData
from cmvim.data.site import SiteDataset
from cmvim.device import DeviceError, Precision, resolve_device
from cmvim.durable import write_atomic
from cmvim.metrics import binary_metrics
from cmvim.names import PRECISIONS
from cmvim.portable import ModelFileError, load_model
from cmvim.tables import format_table

from .check import _quiet_data_log, preprocessing_line, problems_table

COLUMNS = ["subject_id", "visit", "split", "label", "inputs", "score", "predicted", "model_probability"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="the model folder a run wrote (DIR/model: "
                                                                  "model.safetensors + config.json)")
    parser.add_argument("--data", type=Path, required=True, help="the site folder (manifest.csv or a BIDS dataset)")
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write (one row per scored visit)")
    parser.add_argument("--device", default="auto", help="auto (a CUDA GPU where there is one), cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="fp32", choices=[p for p in PRECISIONS if p != "auto"],
                        help="fp32 (default) gives the scores the run's CPU evaluation gave; bf16/fp16 on a GPU are "
                             "faster and differ in the last digits")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, help="where preprocessed volumes are cached (default: the site's "
                                                       "per-user cache outside its data folder, $CMVIM_CACHE/sites/... or "
                                                       "~/.cache/cmvim/sites/..., the one training and check use)")


def predict_from_args(args: argparse.Namespace, out=print) -> int:
    try:
        portable = load_model(args.model)
        device = resolve_device(args.device)
    except (ModelFileError, DeviceError) as err:
        out(f"FATAL: {err}")
        return 1
    cfg = portable.cfg
    out(preprocessing_line(cfg) + " (the model's own, from its config.json)")
    try:
        with _quiet_data_log():           # the problems table below says it all
            site = SiteData.for_run(args.data, cfg, cache_dir=args.cache_dir, show_progress=True,
                                    workers=os.cpu_count() or 1)
    except DataError as err:
        out(f"FATAL: {err}")
        return 1
    if site.summary.skipped:
        out(f"Problems ({len(site.summary.skipped)}; these rows are not scored)")
        out(problems_table(site.summary.skipped, args.data, site.summary.source != "manifest.csv"))
    if not site.records:
        out("FAILED: no usable subject-visit in the site folder: nothing scored")
        return 1
    rows, summary = score_site(portable, site, device, Precision.resolve(args.precision, device), args.batch_size)
    write_scores(args.out, rows)
    write_provenance(provenance_path(args.out), portable, args.model, rows)
    decision = portable.calibration
    out(f"scored {len(rows)} subject-visits with {args.model} (threshold {decision.threshold:.3f}; "
        f"{'calibrated' if decision.calibrated else 'uncalibrated'} scores) -> {args.out} "
        f"(what produced them: {provenance_path(args.out)})")
    if summary:
        out(f"\nOn the folder's labelled visits ({portable.cfg.model.task}), at the model's threshold")
        out(format_table(["split", "n", "AUC", "acc", "sens", "spec"], summary))
    return 0


def score_site(portable, site: SiteData, device, precision: Precision, batch_size: int = 8
               ) -> tuple[list[dict], list[list]]:
    """(one CSV row per record, a per-split table of metrics on the labelled visits of the task's
    positive class and CN)."""
    from cmvim import engine
    from cmvim.data.views import SiteViews
    cfg = portable.cfg
    model = portable.model.to(device)
    dataset = SiteDataset(site, list(site.records), cfg.model.classes)
    loader = SiteViews(cfg, [site], pin_memory=device.type == "cuda").loader(dataset, batch_size, False, 0)
    _, probabilities = engine.predict(model, loader, precision)
    positive = probabilities[:, -1]
    scores = portable.calibration.apply(positive)
    if cfg.model.num_classes == 2:
        predicted = [portable.labels[i] for i in portable.calibration.predict(positive)]
    else:
        predicted = [portable.labels[i] for i in probabilities.argmax(axis=1)]
    reads_pet = "pet" in cfg.model.modalities
    rows = [{"subject_id": r.entry.subject_id, "visit": r.entry.visit, "split": r.split, "label": r.entry.label or "",
             "inputs": "mri+pet" if r.has_pet and reads_pet else "mri",
             "score": f"{s:.6f}", "predicted": p, "model_probability": f"{q:.6f}"}
            for r, s, p, q in zip(dataset.records, scores, predicted, positive)]
    summary, negative, positive = [], cfg.model.classes[0], cfg.model.classes[-1]
    for split in ("train", "val", "test", None):
        chosen = [i for i, r in enumerate(dataset.records)
                  if (split is None or r.split == split) and r.entry.label in (negative, positive)]
        labels = np.array([dataset.records[i].entry.label == positive for i in chosen], dtype=int)
        if len(chosen) == 0 or labels.min() == labels.max():
            continue
        m = binary_metrics(labels, scores[chosen], threshold=portable.calibration.threshold, bootstrap=0)
        summary.append([split or "all", m["n"], f"{m['auc']:.3f}", f"{m['acc']:.3f}", f"{m['sensitivity']:.3f}",
                        f"{m['specificity']:.3f}"])
    return rows, summary


def provenance_path(csv_path: Path) -> Path:
    return Path(csv_path).with_suffix(".json")


def write_provenance(path: Path, portable, model_dir: Path, rows: list[dict]) -> None:
    """FILE.json: which model, decision and cmvim produced the scores (no subject ids)."""
    import datetime
    import json

    from cmvim import __version__
    meta = portable.meta
    record = {
        "model": {"folder": str(Path(model_dir).resolve()), "files": meta.get("files", {}),
                  "fingerprint": meta.get("fingerprint", {}), "cmvim_version": meta.get("cmvim_version"),
                  "task": meta.get("task"), "intended_use": meta.get("intended_use")},
        "decision": portable.calibration.to_dict(),
        "preprocess_spatial": portable.cfg.preprocess.spatial,
        "rows": len(rows), "inputs": dict(sorted(Counter(r["inputs"] for r in rows).items())),
        "cmvim_version": __version__,
        "scored_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_atomic(path, lambda handle: handle.write((json.dumps(record, indent=2) + "\n").encode()))


def write_scores(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda handle: handle.write(buffer.getvalue().encode()))
