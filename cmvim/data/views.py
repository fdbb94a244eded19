"""The views of a site's data that a round trains or evaluates on: which splits, labelled or
not, with which augmentation, batched how; several sites' data pooled into one (the
centralized baseline)."""
from __future__ import annotations

import torch
from torch.utils.data import ConcatDataset

from ..run_config import AugmentConfig, RunConfig
from .augment import ModalityDropout, PretrainAugment
from .site import SiteData, SiteDataset, label_index, make_loader


class _EveryPart:
    """An attribute of a Pooled dataset that lives in each part: read from the first, set on all."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj.parts[0], self.name)

    def __set__(self, obj, value):
        for part in obj.parts:
            setattr(part, self.name, value)


class Pooled(torch.utils.data.Dataset):
    """Several sites' datasets as one. Setting `epoch` or `seed` (the augmentation counters the
    training loop and the round set) sets them in every part."""

    def __init__(self, parts: list[SiteDataset]):
        self.parts, self.concat = parts, ConcatDataset(parts)

    def __len__(self):
        return len(self.concat)

    def __getitem__(self, i):
        return self.concat[i]

    @property
    def records(self):
        return [r for part in self.parts for r in part.records]

    epoch = _EveryPart()
    seed = _EveryPart()


def _then(first, second):
    """Two item transforms, one after the other (each draws from the same generator in turn)."""
    def both(item: dict, generator) -> dict:
        return second(first(item, generator), generator)
    return both


class SiteViews:
    """Datasets and loaders over one site's data (or several sites' pooled), as the run config says."""

    def __init__(self, cfg: RunConfig, sites: list[SiteData], pin_memory: bool = False):
        self.cfg, self.sites = cfg, sites
        self.classes = cfg.model.classes
        self.pin_memory = pin_memory                 # batches bound for a GPU

    def dataset(self, splits: list[str], labeled: bool | None, augment: bool,
                modality_dropout: float = 0.0, augment_cfg: AugmentConfig | None = None) -> SiteDataset | Pooled:
        """`augment`: the pretraining augmentations (or `augment_cfg`'s); `modality_dropout`: then
        hide a present PET this often."""
        augment_cfg = augment_cfg or self.cfg.augment
        transform = PretrainAugment(augment_cfg) if augment and augment_cfg is not None else None
        if modality_dropout > 0:
            dropout = ModalityDropout(modality_dropout)
            transform = dropout if transform is None else _then(transform, dropout)
        parts = []
        for site in self.sites:
            records = [r for s in splits for r in site.subset(s, labeled, self.classes)]
            parts.append(SiteDataset(site, records, self.classes, transform))
        return parts[0] if len(parts) == 1 else Pooled(parts)

    def pretraining(self) -> SiteDataset | Pooled:
        """Every non-test subject, labelled or not, augmented."""
        return self.dataset(["train", "val"], None, augment=True)

    def finetuning(self) -> SiteDataset | Pooled:
        """The labelled training subjects, with the run's modality dropout (and its fine-tuning
        augmentation, when it has one)."""
        return self.dataset(["train"], True, augment=self.cfg.finetune_augment is not None,
                            modality_dropout=self.cfg.modality_dropout, augment_cfg=self.cfg.finetune_augment)

    def loader(self, dataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False):
        return make_loader(dataset, batch_size, shuffle, seed=seed, max_report_bytes=self.cfg.model.report.max_bytes,
                           drop_last=drop_last, reports=self.cfg.use_reports, pin_memory=self.pin_memory)

    def labels(self, dataset) -> list[int]:
        return [label_index(r.entry.label, self.classes) for r in dataset.records]
