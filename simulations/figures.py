"""Figures of a synthetic cohort: mid-slices of MRI and PET, CN vs AD, per site."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cmvim.data import load_volume  # noqa: E402


def _first(site_dir: Path, label: str) -> dict | None:
    with open(site_dir / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["label"] == label and row["pet"]:
                return row
    return None


def cohort_slices(cohort_dir: Path, out_png: Path, sites: tuple[str, ...] = ("A", "B")) -> Path:
    """A grid: rows = site x class (CN, AD); columns = MRI axial, MRI coronal, PET axial, PET coronal."""
    rows = [(s, c) for s in sites for c in ("CN", "AD")]
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)))
    for r, (site, label) in enumerate(rows):
        record = _first(cohort_dir / site, label)
        if record is None:
            continue
        for c, modality in enumerate(("mri", "pet")):
            volume, _ = load_volume(cohort_dir / site / record[modality], modality)
            vmax = np.percentile(volume, 99.5 if modality == "mri" else 99.95)
            z, y = int(volume.shape[2] * 0.45), int(volume.shape[1] * 0.42)   # through hippocampi / PCC
            for k, (section, name) in enumerate(((volume[:, :, z].T, "axial"), (volume[:, y, :].T, "coronal"))):
                ax = axes[r, 2 * c + k]
                ax.imshow(section, origin="lower", cmap="gray" if modality == "mri" else "hot", vmin=0, vmax=vmax)
                ax.set_xticks([]), ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{'T1 MRI' if modality == 'mri' else 'FDG PET'} {name}")
        axes[r, 0].set_ylabel(f"site {site}: {label}", fontsize=11)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
