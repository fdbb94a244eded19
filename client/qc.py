"""Registration quality at a site (`preprocess.spatial: template`), for the hospital's own eyes.

`cmvim-client check` prints, per measure, the site's spread and its bound, and names the visits
that stand out from the rest of the site (a robust z-score: below -3.5 for a similarity, beyond
+-3.5 for a head scale); `check --qc DIR` also writes, per site,

    DIR/qc_<site>.png   registered slices of N visits (T1 in sagittal, coronal and axial planes
                        through the template's brain centre, and the PET's axial plane) with the
                        template brain's outline over them: failed and outlying visits first, in
                        red, then visits spread over the site's rows
    DIR/qc_<site>.tsv   every visit's measures and status (ok, outlier, failed: why)

The pictures are drawn from each scan as read and the transforms the preprocessing cached, one
interpolation onto the template's 2 mm grid, before brain extraction (so a skull that lands in
the brain shows). Subject ids are in both files: they stay at the site, as check's output does.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmvim.data import DataError, SiteData, Volume, load_volume, read_site_folder
from cmvim.data.cache import transform_key
from cmvim.data.registration import TEMPLATE_CENTRE, load_template, onto_grid, transform_fingerprint
from cmvim.tables import format_table

MEASURES = ("t1_similarity", "pet_similarity", "head_scale_min", "head_scale_max")
OUTLIER_Z = 3.5
MAD_FLOOR = 0.01            # a site whose visits all agree closely flags nothing for a hair's difference


@dataclass
class VisitQC:
    row: int
    subject: str
    mri: str
    pet: str | None
    measures: dict[str, float]
    status: str                 # "ok", "outlier: ..." or "failed: ..."

    @property
    def flagged(self) -> bool:
        return self.status != "ok"


def robust_z(values: np.ndarray) -> np.ndarray:
    median = np.median(values)
    mad = max(1.4826 * np.median(np.abs(values - median)), MAD_FLOOR)
    return (values - median) / mad


def outliers(visits: list[VisitQC]) -> dict[int, str]:
    """{index into visits: why} for visits that stand out from their site."""
    flagged: dict[int, list[str]] = {}
    for measure in MEASURES:
        have = [(i, v.measures[measure]) for i, v in enumerate(visits) if measure in v.measures]
        if len(have) < 5:                         # too few visits to say what is usual here
            continue
        z = robust_z(np.array([value for _, value in have]))
        for (i, value), score in zip(have, z):
            low = score < -OUTLIER_Z
            if low or (measure.startswith("head_scale") and score > OUTLIER_Z):
                flagged.setdefault(i, []).append(f"{measure} {value:.2f} (site median "
                                                 f"{np.median([x for _, x in have]):.2f}, z {score:+.1f})")
    return {i: "; ".join(why) for i, why in flagged.items()}


def site_qc(site: SiteData) -> list[VisitQC]:
    """Every visit's QC: the usable ones with their measures (outliers marked), then the ones whose
    registration failed its check (from the problems of the load)."""
    visits = [VisitQC(r.entry.row, r.entry.subject_id, r.entry.mri, r.entry.pet, dict(r.qc), "ok")
              for r in site.records]
    for i, why in outliers(visits).items():
        visits[i].status = f"outlier: {why}"
    entries = {e.row: e for e in read_site_folder(site.site_dir).entries} if site.summary.skipped else {}
    for problem in site.summary.skipped:
        if problem.kind != "registration failed" or problem.row not in entries:
            continue
        entry = entries[problem.row]
        visits.append(VisitQC(entry.row, entry.subject_id, entry.mri, entry.pet, {}, f"failed: {problem.problem}"))
    return visits


def summary_table(visits: list[VisitQC], site: SiteData) -> str:
    """Per measure: the site's median and range over usable visits, the bound, and how many stand out."""
    bounds = site.cfg.registration
    limit = {"t1_similarity": f">= {bounds.min_t1_similarity:g}", "pet_similarity": f">= {bounds.min_pet_similarity:g}",
             "head_scale_min": f">= {bounds.head_scale_range[0]:g}", "head_scale_max": f"<= {bounds.head_scale_range[1]:g}"}
    rows = []
    for measure in MEASURES:
        values = np.array([v.measures[measure] for v in visits if measure in v.measures])
        if not len(values):
            continue
        flagged = sum(1 for v in visits if v.status.startswith("outlier") and measure in v.status)
        rows.append([measure, len(values), f"{np.median(values):.3f}", f"{values.min():.3f}", f"{values.max():.3f}",
                     limit[measure], flagged])
    failed = sum(1 for v in visits if v.status.startswith("failed"))
    table = format_table(["measure", "visits", "median", "min", "max", "bound (fails the visit)", "outliers"], rows)
    return table + f"\nvisits whose registration failed its check: {failed} (in the problems below)"


def write_tsv(path: Path, visits: list[VisitQC], site_dir: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(["row", "subject", "mri", *MEASURES, "status"])
        for v in sorted(visits, key=lambda v: v.row):
            writer.writerow([v.row, v.subject, _relative(v.mri, site_dir),
                             *[f"{v.measures[m]:.4f}" if m in v.measures else "" for m in MEASURES], v.status])


def _relative(path: str | None, site_dir: Path) -> str:
    try:
        return str(Path(path).relative_to(site_dir)) if path else ""
    except ValueError:
        return str(path)


def chosen(visits: list[VisitQC], n: int) -> list[VisitQC]:
    """Flagged visits first (failed, then outliers), then the rest spread evenly over the rows."""
    flagged = sorted((v for v in visits if v.flagged), key=lambda v: (not v.status.startswith("failed"), v.row))
    rest = sorted((v for v in visits if not v.flagged), key=lambda v: v.row)
    room = max(n - len(flagged), 0)
    picks = sorted({int(i) for i in np.linspace(0, len(rest) - 1, room).round()}) if room and rest else []
    return flagged + [rest[i] for i in picks]


def _registered(path: str, transform: np.ndarray, grid_affine: np.ndarray, shape) -> np.ndarray:
    volume = Volume(*load_volume(path))
    data = onto_grid(volume, transform, grid_affine, shape).data
    top = np.percentile(data, 99.5)
    return np.clip(data / top, 0, 1) if top > 0 else data


def draw(path: Path, visits: list[VisitQC], site: SiteData, title: str) -> Path | None:
    """The QC picture (see the module's docstring); None where matplotlib is missing."""
    from cmvim.results import pyplot
    plt = pyplot(f"QC picture {path.name}", lambda text: print(text))
    if plt is None:
        return None
    template = load_template()
    grid_affine, shape = template.affine, template.t1.shape
    centre = np.round(np.linalg.solve(grid_affine, np.r_[TEMPLATE_CENTRE, 1.0])[:3]).astype(int)
    planes = {"sagittal": lambda a: a[centre[0]].T, "coronal": lambda a: a[:, centre[1]].T,
              "axial": lambda a: a[:, :, centre[2]].T}
    fingerprint = transform_fingerprint(site.cfg.registration)
    columns = ["T1 sagittal", "T1 coronal", "T1 axial", "PET axial"]
    fig, axes = plt.subplots(len(visits), len(columns), figsize=(2.2 * len(columns), 2.3 * len(visits)),
                             squeeze=False)
    for row, visit in enumerate(visits):
        transforms = site.cache.load_transforms(
            transform_key([Path(visit.mri), Path(visit.pet) if visit.pet else None], fingerprint))
        colour = "red" if visit.flagged else "black"
        label = ", ".join(f"{m.split('_')[0]} {visit.measures[m]:.2f}" for m in MEASURES[:2] if m in visit.measures)
        axes[row, 0].set_ylabel(f"row {visit.row}\n{visit.subject}\n{label or visit.status[:40]}", color=colour,
                                fontsize=7)
        images = {}
        if transforms is not None:
            try:
                images["T1"] = _registered(visit.mri, transforms["mri"], grid_affine, shape)
                if visit.pet and "pet" in transforms:
                    images["PET"] = _registered(visit.pet, transforms["pet"], grid_affine, shape)
            except DataError:
                pass
        for col, name in enumerate(columns):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            modality, plane = name.split()
            if modality not in images:
                ax.text(0.5, 0.5, "no PET" if modality == "PET" else "not registered", ha="center", va="center",
                        fontsize=7, transform=ax.transAxes)
                continue
            ax.imshow(planes[plane](images[modality]), origin="lower", cmap="gray" if modality == "T1" else "hot",
                      vmin=0, vmax=1)
            ax.contour(planes[plane](template.brain), levels=[0.5], colors="cyan", linewidths=0.6)
            if row == 0:
                ax.set_title(name, fontsize=8)
        for spine in axes[row, 0].spines.values():
            spine.set_edgecolor(colour)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_qc(out_dir: Path, site: SiteData, visits: list[VisitQC], n: int, name: str) -> list[Path]:
    """qc_<name>.tsv and qc_<name>.png under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tsv = out_dir / f"qc_{name}.tsv"
    write_tsv(tsv, visits, site.site_dir)
    shown = chosen(visits, n)
    flagged = sum(v.flagged for v in visits)
    title = (f"{name}: {len(shown)} of {len(visits)} visits registered to MNI152 2009a (cyan: the template's brain); "
             f"{flagged} flagged, in red")
    picture = draw(out_dir / f"qc_{name}.png", shown, site, title)
    return [tsv] + ([picture] if picture else [])


def outlier_lines(visits: list[VisitQC]) -> list[str]:
    return [f"row {v.row} ({v.subject}): {v.status}" for v in sorted(visits, key=lambda v: v.row)
            if v.status.startswith("outlier")]
