"""Site data: manifest, NIfTI/DICOM/report readers, preprocessing, cache, datasets.

Everything between a hospital's folder of scans (manifest.csv or BIDS) and a batch of tensors. Data
problems are `DataError`s naming the file, the subject and what is wrong.
"""
from .augment import PretrainAugment
from .errors import DataError
from .bids import is_bids, read_bids
from .folder import read_site_folder
from .manifest import Manifest, ManifestEntry, read_manifest
from .preprocess import Volume, build_pipeline
from .reports import read_report, tokenize_reports
from .site import (SiteData, SiteDataset, SiteSummary, assign_splits, collate, label_index, make_loader,
                   run_load_key)
from .volumes import load_volume
from ..names import LABELS, SPLITS

__all__ = ["PretrainAugment", "DataError", "LABELS", "SPLITS", "Manifest", "ManifestEntry",
           "read_manifest", "read_site_folder", "read_bids", "is_bids", "Volume", "build_pipeline", "read_report",
           "tokenize_reports", "SiteData",
           "SiteDataset", "SiteSummary", "assign_splits", "collate", "label_index", "make_loader", "load_volume",
           "run_load_key"]
