"""A site folder, whichever form it has: manifest.csv (cmvim.data.manifest) or a BIDS dataset
(cmvim.data.bids), read as the same manifest entries. Above both readers, so that each of them
imports only downwards (bids builds on manifest's entries); the rest of cmvim reads a site
through `read_site_folder`."""
from __future__ import annotations

from pathlib import Path

from ..run_config import BidsConfig
from .bids import DESCRIPTION, is_bids, read_bids
from .errors import DataError
from .manifest import Manifest, read_manifest
from .pet import PetPolicy


def read_site_folder(site_dir: str | Path, bids: BidsConfig | None = None, check_files: bool = True,
                     pet: PetPolicy | None = None) -> Manifest:
    """A site folder's subject-visits, whichever form it has: manifest.csv, or a BIDS dataset
    (dataset_description.json; `bids` says where its labels are). When both are there the
    manifest.csv wins, with a warning: a hospital that wrote one meant it to be read. `pet`: a BIDS
    dataset's accepted tracers and PET window (cmvim.data.pet.PetPolicy)."""
    site_dir = Path(site_dir)
    if not (site_dir / "manifest.csv").exists():
        if is_bids(site_dir):
            return read_bids(site_dir, bids, check_files, pet)
        if site_dir.is_dir():
            raise DataError(f"no manifest.csv in the site folder, and no {DESCRIPTION} (a BIDS dataset)",
                            file=site_dir, kind="missing manifest")
    manifest = read_manifest(site_dir, check_files)
    if is_bids(site_dir):
        manifest.warnings.append(f"the folder is also a BIDS dataset ({DESCRIPTION}); manifest.csv is what is "
                                 "read: remove it (or move it away) to read the BIDS dataset instead")
    return manifest
