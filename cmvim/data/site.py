"""A hospital's site folder as training data: validate, preprocess (cached), split, serve.

`SiteData.load(site_dir, cfg)` reads the manifest (manifest.csv, or the BIDS dataset the
folder is: `read_site_folder`), then loads and preprocesses
every subject once, up front, into the cache. A subject whose files are bad is
skipped and its error kept in `summary.skipped`, so training never meets a bad
file mid-run and no subject disappears without a line saying why: every bad file
is one bad row, whatever goes wrong with it (a subject whose visits disagree on
the split is left out whole, one line per row). Training, `cmvim-client check`, prediction
and the benchmarks load a run's site through `SiteData.for_run`, the one place that turns a run
config into `load`'s arguments, so check reports what training will skip. Subject ids stay in here:
datasets hand out opaque integer indices.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import VolumeCache, cache_key, default_cache_dir, transform_key
from .errors import DataError, VisitProblems, each_problem
from .folder import read_site_folder
from .manifest import ManifestEntry, _inside
from .pet import PetPolicy
from ..config import to_dict
from ..model_config import MODALITIES
from ..names import SPLITS
from ..progress import progress_bar
from ..run_config import SPLIT_FRACTIONS, BidsConfig, PreprocessConfig, RunConfig
from .preprocess import Volume, build_pipeline
from .registration import transform_fingerprint
from .reports import read_report, tokenize_reports
from .volumes import load_volume

log = logging.getLogger("cmvim.data")



CN_AD = ("CN", "AD")       # the default task's classes (cmvim.model_config.ModelConfig.classes)


def label_index(label: str | None, classes: Sequence[str] = CN_AD) -> int | None:
    """A label's class in the task whose labels are `classes` (CN/AD -> 0/1, CN/MCI -> 0/1,
    CN/MCI/AD -> 0/1/2); None for a label outside the task or none."""
    return classes.index(label) if label in classes else None


@dataclass
class Record:
    """One usable subject-visit. `entry` (with the subject id) never leaves this module's objects."""
    index: int
    entry: ManifestEntry
    key: str
    has_pet: bool
    report: str | None
    split: str
    qc: dict[str, float] = field(default_factory=dict)   # spatial template: the registration's QC measures


QC_PREFIX = "qc."          # cache entry arrays holding a visit's QC measures
WARNINGS = "warnings"      # a cache entry's array holding the visit's preprocessing warnings (bytes), so a hit repeats them
TRANSFORMS = "transforms"  # a cache entry's array holding the key of the transforms it was made with (bytes)


@dataclass
class SiteSummary:
    rows: int = 0
    loaded: int = 0
    skipped: list[DataError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    cache_hits: int = 0
    seconds: float = 0.0
    source: str = "manifest.csv"          # what the rows came from: "manifest.csv" or "BIDS dataset"

    def counts(self, records: list[Record]) -> dict:
        """Aggregates only: safe to send off-site."""
        return {
            "subjects": len({r.entry.subject_id for r in records}),
            "visits": len(records),
            "with_pet": sum(r.has_pet for r in records),
            "with_report": sum(r.report is not None for r in records),
            "labels": dict(Counter(r.entry.label or "unlabeled" for r in records)),
            "splits": dict(Counter(r.split for r in records)),
            "skipped": len({p.row for p in self.skipped}),     # visits: a visit may have several problems
        }


def drop_split_conflicts(entries: list[ManifestEntry], manifest_path: Path | None = None
                         ) -> tuple[list[ManifestEntry], list[DataError]]:
    """The entries of subjects whose visits agree on their split, and one problem per row of
    every subject whose visits do not (that subject is left out; the rest goes on)."""
    splits: dict[str, set[str]] = {}
    for e in entries:
        if e.split is not None:
            splits.setdefault(e.subject_id, set()).add(e.split)
    conflicting = {subject for subject, given in splits.items() if len(given) > 1}
    if not conflicting:
        return list(entries), []
    kept, problems = [], []
    for e in entries:
        if e.subject_id not in conflicting:
            kept.append(e)
            continue
        visits = "; ".join(f"row {o.row}" + (f" visit {o.visit!r}" if o.visit else "") + f": {o.split or 'no split'}"
                           for o in entries if o.subject_id == e.subject_id)
        problems.append(DataError(f"visits of one subject are in different splits ({visits}); the subject is "
                                  "left out until they share one", file=manifest_path, row=e.row, column="split",
                                  subject=e.subject_id, kind="split conflict"))
    return kept, problems


def assign_splits(entries: list[ManifestEntry], seed: int, fractions=SPLIT_FRACTIONS) -> dict[str, str]:
    """subject_id -> split. Manifest splits win; the rest by a seeded rule stratified by label.

    Visits of one subject always share a split; a subject whose visits disagree is an error
    (`drop_split_conflicts` takes such subjects out first).
    """
    given: dict[str, str] = {}
    for e in entries:
        if e.split is None:
            continue
        if given.setdefault(e.subject_id, e.split) != e.split:
            raise DataError(f"visits of one subject are in different splits ({given[e.subject_id]}, {e.split})",
                            row=e.row, column="split", subject=e.subject_id, kind="split conflict")
    by_subject: dict[str, list[str | None]] = {}
    for e in entries:
        by_subject.setdefault(e.subject_id, []).append(e.label)
    strata: dict[str, list[str]] = {}
    for subject, labels in by_subject.items():
        if subject in given:
            continue
        known = [lab for lab in labels if lab]
        stratum = Counter(known).most_common(1)[0][0] if known else "unlabeled"
        strata.setdefault(stratum, []).append(subject)
    splits = dict(given)
    for subjects in strata.values():
        # order by a seeded hash: independent of row order, stable when other sites change
        ordered = sorted(subjects, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
        n = len(ordered)
        n_test = int(round(n * fractions[2]))
        n_val = int(round(n * fractions[1]))
        for i, subject in enumerate(ordered):
            splits[subject] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return splits


def run_load_arguments(run_cfg: RunConfig, splits: tuple[int, tuple] | None = None) -> dict:
    """What of a run config decides how a site loads: `SiteData.load`'s run-dependent arguments.
    `splits`: the site's own (seed, fractions) for subjects its manifest gives no split (a
    deployed site's policy); None: the run config's."""
    seed, fractions = splits if splits is not None else (run_cfg.seed, run_cfg.split_fractions)
    return {"cfg": run_cfg.preprocess, "seed": seed, "use_reports": run_cfg.use_reports,
            "split_fractions": tuple(fractions), "bids": run_cfg.bids}


def run_load_key(site_dir: str | Path, run_cfg: RunConfig, splits: tuple[int, tuple] | None = None) -> tuple:
    """A hashable key for the site as `SiteData.for_run` loads it: equal exactly when the folder
    and every argument `run_load_arguments` passes are (a process that keeps loaded sites reuses
    one only under the same key)."""
    how = run_load_arguments(run_cfg, splits)
    return (str(Path(site_dir).resolve()),) + tuple((name, _key_part(value)) for name, value in sorted(how.items()))


def _key_part(value):
    if isinstance(value, PreprocessConfig):
        return value.fingerprint()
    if isinstance(value, BidsConfig):
        return json.dumps(to_dict(value), sort_keys=True)
    return value


class SiteData:
    def __init__(self, site_dir: Path, cfg: PreprocessConfig, records: list[Record], summary: SiteSummary,
                 cache: VolumeCache):
        self.site_dir, self.cfg, self.records, self.summary, self.cache = site_dir, cfg, records, summary, cache

    @classmethod
    def for_run(cls, site_dir: str | Path, run_cfg: RunConfig, splits: tuple[int, tuple] | None = None,
                **how) -> "SiteData":
        """The site as the run `run_cfg` reads it: its preprocessing, split seed and fractions
        (`splits`: the site's own, see run_load_arguments), reports and BIDS settings. Training,
        `cmvim-client check` and prediction all load through here, so they see the same rows.
        `how`: `load`'s per-call options (cache_dir, show_progress, workers, progress, pet)."""
        return cls.load(site_dir, **run_load_arguments(run_cfg, splits), **how)

    @classmethod
    def load(cls, site_dir: str | Path, cfg: PreprocessConfig | None = None, cache_dir: str | Path | None = None,
             seed: int = 0, use_reports: bool = True, split_fractions=SPLIT_FRACTIONS,
             progress: Callable[[int, int], None] | None = None, bids: BidsConfig | None = None,
             show_progress: bool = False, workers: int = 1, pet: PetPolicy | None = None) -> "SiteData":
        """`progress(n, total)` is called after each row; `show_progress` draws a bar on stderr
        when that is a terminal (commands a person watches; never the ClientApp: its output may
        be collected off-site). `bids`: labels and splits of a BIDS site folder (default: the
        run config's defaults). `workers` > 1: the visits not in the cache yet are preprocessed
        by that many forked processes first (registration takes ~1 s a visit on one core). `pet`: a
        BIDS site's accepted tracers and dynamic-PET window (default: `bids`'s, else FDG, 30-60 min).
        The cache is `cache_dir`, else a per-user folder outside the site folder (cache.default_cache_dir):
        nothing is written into the site folder."""
        site_dir = Path(site_dir)
        cfg = cfg or PreprocessConfig()
        start = time.perf_counter()
        manifest = read_site_folder(site_dir, bids, pet=pet)  # header problems raise: nothing to train on
        entries, conflicts = drop_split_conflicts(manifest.entries, manifest.path)
        summary = SiteSummary(rows=len(manifest.entries) + len({p.row for p in manifest.problems}),
                              skipped=list(manifest.problems) + conflicts, warnings=list(manifest.warnings),
                              source=manifest.format)
        cache = VolumeCache(Path(cache_dir) if cache_dir else default_cache_dir(site_dir))
        if _inside(cache.root.resolve(), site_dir.resolve()):
            summary.warnings.append(f"the cache ({cache.root}) is inside the site folder: preprocessed scans are "
                                    "written among the hospital's data; give a --cache-dir outside it")
        pipeline = build_pipeline(cfg)
        fingerprint = cfg.fingerprint()
        registration = transform_fingerprint(cfg.registration) if cfg.spatial == "template" else None
        transforms_used: set[str] = set()
        splits = assign_splits(entries, seed, tuple(split_fractions))
        records: list[Record] = []
        bar = progress_bar(len(entries), "preprocessing", "visit") if show_progress else None
        warmed = _preprocess_in_parallel(entries, cfg, cache.root, site_dir, workers, bar) if workers > 1 else {}
        for n, entry in enumerate(entries, start=1):
            try:
                records.append(cls._prepare(entry, len(records), cache, pipeline, fingerprint, site_dir,
                                            splits[entry.subject_id], use_reports, summary, registration,
                                            transforms_used))
                if entry.row in warmed:      # preprocessed just now, by a worker: no cache hit (its warnings
                    summary.cache_hits -= 1  # came from the entry, as a hit's do)
            except DataError as err:
                summary.skipped.extend(each_problem(err.with_context(subject=entry.subject_id, row=entry.row)))
            if progress:
                progress(n, len(entries))
            if bar is not None and entry.row not in warmed:
                bar.update(1)
        if bar is not None:
            bar.close()
        summary.loaded = len(records)
        cache.prune(fingerprint, {r.key for r in records},
                    (registration, transforms_used) if registration is not None else None)
        summary.seconds = time.perf_counter() - start
        for err in summary.skipped:
            # row, column and kind only: this runs inside the ClientApp too, whose output a
            # coordinator may see; `cmvim-client check` shows the hospital ids and files
            log.warning("skipped: %s (details: cmvim-client check --data <site folder>)", err.public_message())
        return cls(site_dir, cfg, records, summary, cache)

    @staticmethod
    def _prepare(entry: ManifestEntry, index: int, cache: VolumeCache, pipeline, fingerprint: str, site_dir: Path,
                 split: str, use_reports: bool, summary: SiteSummary, registration: str | None = None,
                 transforms_used: set[str] | None = None) -> Record:
        """One row, read and preprocessed into the cache. Whatever goes wrong is a DataError
        naming the file: an unexpected exception (a MemoryError, a reader's bug) too.
        `registration` (spatial template): the registration's fingerprint; the visit's transforms
        are read from and written to the cache under it (and their keys added to `transforms_used`).
        The PET is optional: one that cannot be read leaves an MRI-only visit, with a warning naming
        it; when the MRI cannot be read either, the visit's problems are both (VisitProblems)."""
        files = {m: getattr(entry, m) for m in MODALITIES if getattr(entry, m) is not None}
        reading = entry.pet_reading.key() if entry.pet_reading is not None else ""
        doing, file, column = "reading the report", entry.report, "report"
        try:
            report = None
            if use_reports and entry.report is not None:
                report = read_report(entry.report)
            doing, file, column = "reading the scans", entry.mri, "mri"
            key = cache_key([entry.mri, entry.pet], site_dir, fingerprint, reading)
            cached = cache.load(key)
            if cached is not None:
                summary.cache_hits += 1
                if WARNINGS in cached:
                    summary.warnings += cached[WARNINGS].tobytes().decode().split("\n")
                qc = {name[len(QC_PREFIX):]: float(value) for name, value in cached.items()
                      if name.startswith(QC_PREFIX)}
                if TRANSFORMS in cached and transforms_used is not None:      # still in use: not pruned
                    transforms_used.add(cached[TRANSFORMS].tobytes().decode())
            else:
                sample, visit_warnings = {"files": files}, []
                problems = []
                for modality, path in files.items():
                    doing, file, column = "reading the scan", path, modality
                    # a PET's frames: averaged by its sidecar's weights, or equally (warned)
                    frames = {} if modality != "pet" else {
                        "frame_weights": entry.pet_reading.weights if entry.pet_reading else None,
                        "warnings": visit_warnings}
                    try:
                        sample[modality] = Volume(*load_volume(path, modality, **frames))
                    except DataError as err:
                        problems.append(err.with_context(column=modality))
                if problems and "mri" not in sample:
                    raise VisitProblems(problems)
                for err in problems:          # the PET's: the model takes a visit without one
                    del files["pet"]
                    where = Path(err.file).relative_to(site_dir) if err.file and _inside(Path(err.file), site_dir) \
                        else err.file
                    visit_warnings.append(f"PET not used, the visit is read without it: {where}: {err.problem}")
                transforms = None
                if registration is not None:
                    doing, file, column = "reading the cached registration", entry.mri, None
                    transforms = transform_key([entry.mri, entry.pet], registration, reading)
                    sample["transforms"] = cache.load_transforms(transforms)
                    if transforms_used is not None:
                        transforms_used.add(transforms)
                # steps name the file a problem is in; one they cannot pin on a file is the MRI's
                doing, file, column = "preprocessing", entry.mri, None
                try:
                    sample = pipeline(sample)
                except DataError as err:
                    raise err.with_context(file=file) from None
                finally:           # a registration that failed its check is kept too: it is not redone
                    if transforms is not None and sample.get("transforms") is not None:
                        cache.save_transforms(transforms, sample["transforms"])
                visit_warnings = [f"manifest row {entry.row}: {warning}"
                                  for warning in visit_warnings + list(sample.get("warnings", []))]
                summary.warnings += visit_warnings
                doing, file, column = "writing the cache", cache.root, None
                qc = sample.get("qc", {})
                cached = {m: sample[m].data for m in MODALITIES if sample.get(m) is not None}
                cache.save(key, {**cached,
                                 **({WARNINGS: np.frombuffer("\n".join(visit_warnings).encode(), dtype=np.uint8)}
                                    if visit_warnings else {}),
                                 **{QC_PREFIX + name: np.float32(value) for name, value in qc.items()},
                                 **({TRANSFORMS: np.frombuffer(transforms.encode(), dtype=np.uint8)}
                                    if transforms is not None else {})})
        except DataError:
            raise
        except Exception as exc:
            # the traceback goes to the site's debug log only; the row's problem names the file and the type
            log.debug("manifest row %d: %s while %s", entry.row, type(exc).__name__, doing, exc_info=True)
            detail = str(exc)
            detail = f": {detail[:200]}" if detail else ""
            raise DataError(f"{type(exc).__name__} while {doing}{detail}", file=file, column=column,
                            kind="out of memory" if isinstance(exc, MemoryError) else "unexpected error") from None
        return Record(index=index, entry=entry, key=key, has_pet="pet" in cached, report=report, split=split, qc=qc)

    # -- views -------------------------------------------------------------------------------
    def subset(self, split: str | None = None, labeled: bool | None = None,
               classes: Sequence[str] = CN_AD) -> list[Record]:
        """Records of a split; labeled=True keeps those with a class for the task, False the rest."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        out = []
        for r in self.records:
            if split is not None and r.split != split:
                continue
            has_class = label_index(r.entry.label, classes) is not None
            if labeled is not None and has_class != labeled:
                continue
            out.append(r)
        return out

    def dataset(self, split: str | None = None, labeled: bool | None = None, classes: Sequence[str] = CN_AD,
                transform: Callable[[dict, torch.Generator], dict] | None = None) -> "SiteDataset":
        return SiteDataset(self, self.subset(split, labeled, classes), classes, transform)

    def counts(self) -> dict:
        return self.summary.counts(self.records)


def _preprocess_in_parallel(entries: list[ManifestEntry], cfg: PreprocessConfig, cache_root: Path, site_dir: Path,
                            workers: int, bar=None) -> dict[int, list[str]]:
    """Preprocess the entries whose cache entry is missing in `workers` forked processes (one
    thread each), into the cache the load then reads. Returns {row: warnings} of those that
    succeeded; a failing visit is left to the load, which names its problem (its registration,
    cached, is not redone)."""
    fingerprint = cfg.fingerprint()
    missing = []
    for entry in entries:
        try:
            reading = entry.pet_reading.key() if entry.pet_reading is not None else ""
            if not (cache_root / f"{cache_key([entry.mri, entry.pet], site_dir, fingerprint, reading)}.npz").exists():
                missing.append(entry)
        except OSError:                   # a file that is not there: the load says so
            continue
    if len(missing) < 2:
        return {}
    context = multiprocessing.get_context("fork")
    warmed = {}
    with ProcessPoolExecutor(min(workers, len(missing)), mp_context=context) as pool:
        futures = [pool.submit(_preprocess_one, entry, cfg, cache_root, site_dir) for entry in missing]
        for future in as_completed(futures):
            row, warnings = future.result()
            if warnings is not None:
                warmed[row] = warnings
            if bar is not None:
                bar.update(1)
    return warmed


def _preprocess_one(entry: ManifestEntry, cfg: PreprocessConfig, cache_root: Path, site_dir: Path
                    ) -> tuple[int, list[str] | None]:
    """One visit into the cache, in a worker: (row, its warnings), or (row, None) when it failed."""
    torch.set_num_threads(1)
    try:
        import SimpleITK as sitk
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    except ImportError:
        pass
    summary = SiteSummary()
    registration = transform_fingerprint(cfg.registration) if cfg.spatial == "template" else None
    try:
        SiteData._prepare(entry, 0, VolumeCache(cache_root), build_pipeline(cfg), cfg.fingerprint(), site_dir,
                          "train", False, summary, registration, set())
    except DataError:
        return entry.row, None
    return entry.row, summary.warnings


class SiteDataset(Dataset):
    """Items: {"mri", "pet": (1, S, S, S) float32, "mri_present", "pet_present", "report", "label", "index"}."""

    def __init__(self, site: SiteData, records: list[Record], classes: Sequence[str] = CN_AD,
                 transform: Callable[[dict, torch.Generator], dict] | None = None):
        self.site, self.records, self.classes, self.transform = site, records, tuple(classes), transform
        self.epoch = 0          # set by the training loop so augmentations differ per epoch, reproducibly
        self.seed = 0           # set per round by the caller, so rounds differ too

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        arrays = self.site.cache.load(record.key)
        if arrays is None:       # the cache was cleared under us: rebuild this one entry
            cfg = self.site.cfg
            SiteData._prepare(record.entry, record.index, self.site.cache, build_pipeline(cfg), cfg.fingerprint(),
                              self.site.site_dir, record.split, False, self.site.summary,
                              transform_fingerprint(cfg.registration) if cfg.spatial == "template" else None)
            arrays = self.site.cache.load(record.key)
        shape = (1,) + (self.site.cfg.shape,) * 3
        label = label_index(record.entry.label, self.classes)
        item = {
            "mri": torch.from_numpy(arrays["mri"]).reshape(shape),
            "pet": torch.from_numpy(arrays["pet"]).reshape(shape) if "pet" in arrays else torch.zeros(shape),
            "mri_present": True,
            "pet_present": "pet" in arrays,
            "report": record.report,
            "label": -1 if label is None else label,
            "index": record.index,
        }
        if self.transform is not None:
            generator = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.epoch) * 100_003 + record.index & 0x7FFFFFFF)
            item = self.transform(item, generator)
        return item


def collate(items: list[dict], max_report_bytes: int = 256, reports: bool = True) -> dict:
    """Stack items into the batch dict the model takes (reports tokenised byte-level; none when
    `reports` is off: the run does not use them)."""
    batch = {
        "mri": torch.stack([it["mri"] for it in items]),
        "pet": torch.stack([it["pet"] for it in items]),
        "mri_present": torch.tensor([it["mri_present"] for it in items]),
        "pet_present": torch.tensor([it["pet_present"] for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }
    if reports:
        batch["report_ids"], batch["report_present"] = tokenize_reports([it["report"] for it in items],
                                                                        max_report_bytes)
    return batch


def make_loader(dataset: SiteDataset, batch_size: int, shuffle: bool, seed: int = 0, max_report_bytes: int = 256,
                drop_last: bool = False, reports: bool = True, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """`pin_memory`: page-locked batches, so copies to a GPU overlap the compute (cmvim.device.to_device)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       drop_last=drop_last, num_workers=0, pin_memory=pin_memory,
                                       collate_fn=lambda items: collate(items, max_report_bytes, reports))

