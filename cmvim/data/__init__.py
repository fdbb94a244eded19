"""Site data: manifest, NIfTI/DICOM/report readers, preprocessing, cache, datasets.

Everything between a hospital's folder of scans and a batch of tensors. Data
problems are `DataError`s naming the file, the subject and what is wrong.
"""
from .augment import AugmentConfig, PretrainAugment
from .errors import DataError
from .manifest import LABELS, SPLITS, Manifest, ManifestEntry, read_manifest
from .preprocess import PreprocessConfig, Volume, build_pipeline
from .reports import read_report
from .site import SiteData, SiteDataset, SiteSummary, assign_splits, collate, label_index, make_loader
from .volumes import load_volume

__all__ = ["AugmentConfig", "PretrainAugment", "DataError", "LABELS", "SPLITS", "Manifest", "ManifestEntry",
           "read_manifest", "PreprocessConfig", "Volume", "build_pipeline", "read_report", "SiteData",
           "SiteDataset", "SiteSummary", "assign_splits", "collate", "label_index", "make_loader", "load_volume"]
