"""Real anatomy for synthetic cohorts: the MNI ICBM152 2009a templates that ship inside nilearn.

Source: ICBM 2009a nonlinear symmetric T1 template and GM/WM probability maps
(Fonov et al., NeuroImage 2011; Fonov et al., NeuroImage 2009), as packaged in
nilearn's `datasets/data` folder (nilearn: BSD-3; the ICBM 2009 templates are
freely redistributable with their copyright notice, Copyright (C) 1993-2009
Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,
McGill University). Only the files are read; nilearn's code is not imported,
and nothing is downloaded.

Regions for disease effects are ellipsoids at published MNI coordinates,
intersected with the template's tissue maps (see docs/cohort.md for sources).
Everything is resampled once to the requested cubic grid in MNI space.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from cmvim.data.preprocess import Volume, resample

TEMPLATE_FILES_1MM = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# Field of view of the generated volumes: a cube in MNI space holding the whole head.
FOV_MM = 200.0
FOV_CENTER = np.array([0.0, -17.0, 10.0])

# (centre mm, radii mm) in MNI space; bilateral regions list both hemispheres.
# Centres follow published MNI coordinates of the structures (docs/cohort.md).
REGIONS: dict[str, list[tuple[tuple[float, float, float], tuple[float, float, float]]]] = {
    "hippocampus": [((-27, -22, -14), (6, 16, 7)), ((27, -22, -14), (6, 16, 7))],
    "entorhinal": [((-24, -8, -30), (7, 9, 6)), ((24, -8, -30), (7, 9, 6))],
    "pcc_precuneus": [((0, -55, 32), (10, 18, 16))],
    "temporoparietal": [((-48, -58, 30), (12, 16, 14)), ((48, -58, 30), (12, 16, 14)),
                        ((-56, -30, -8), (8, 20, 10)), ((56, -30, -8), (8, 20, 10))],
    "cerebellum": [((-25, -65, -38), (14, 14, 10)), ((25, -65, -38), (14, 14, 10))],
    "ventricle_box": [((-12, -14, 12), (14, 32, 16)), ((12, -14, 12), (14, 32, 16))],
}


def template_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nilearn is not installed: it carries the MNI152 templates the cohorts are built from")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


@dataclass
class Anatomy:
    """Template maps on the output grid (shape^3 in MNI space, `affine`)."""
    shape: int
    affine: np.ndarray
    t1: np.ndarray            # template T1, scaled so white matter ~ 1
    gm: np.ndarray            # tissue probabilities
    wm: np.ndarray
    csf: np.ndarray           # inside the head mask, what is neither GM nor WM
    brain: np.ndarray         # brain mask (0/1, float)
    regions: dict[str, np.ndarray]   # soft region weights in [0, 1] (smooth edges)
    ventricles: np.ndarray    # lateral ventricle CSF probability

    @property
    def voxel_mm(self) -> float:
        return float(self.affine[0, 0])

    def region_mask(self, name: str, threshold: float = 0.5) -> np.ndarray:
        return self.regions[name] > threshold


def grid_affine(shape: int) -> np.ndarray:
    voxel = FOV_MM / shape
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = FOV_CENTER - voxel * (shape - 1) / 2
    return affine


def _ellipsoids(affine: np.ndarray, shape: tuple[int, int, int], items, edge_mm: float = 3.0) -> np.ndarray:
    """Soft union of ellipsoids: 1 inside, 0 outside, a smooth edge about `edge_mm` wide."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float32)
    xyz = ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    weight = np.zeros(shape, dtype=np.float32)
    for centre, radii in items:
        radius = np.sqrt((((xyz - np.array(centre)) / np.array(radii)) ** 2).sum(-1))
        inside = 1 / (1 + np.exp((radius - 1) * min(radii) / (edge_mm / 4)))
        weight = np.maximum(weight, inside)
    return weight


@functools.lru_cache(maxsize=4)
def load_anatomy(shape: int) -> Anatomy:
    folder = template_dir()
    images = {k: nib.load(str(folder / f)) for k, f in TEMPLATE_FILES_1MM.items()}
    src_affine = images["t1"].affine
    target = grid_affine(shape)
    voxel = FOV_MM / shape
    sigma = voxel / 2.355 / 1.0               # anti-alias: about one output voxel FWHM (source is 1 mm)

    def to_grid(image) -> np.ndarray:
        data = np.asarray(image.dataobj, dtype=np.float32)
        if sigma > 0.5:
            data = ndimage.gaussian_filter(data, sigma)
        return resample(Volume(data, src_affine), target, (shape,) * 3).data

    t1, gm, wm = to_grid(images["t1"]), to_grid(images["gm"]), to_grid(images["wm"])
    gm, wm = np.clip(gm / 255.0, 0, 1), np.clip(wm / 255.0, 0, 1)
    t1 = t1 / np.median(t1[wm > 0.9])
    head = ndimage.binary_fill_holes(ndimage.binary_closing(gm + wm > 0.3, iterations=2)).astype(np.float32)
    csf = np.clip(1 - gm - wm, 0, 1) * head
    regions = {name: _ellipsoids(target, (shape,) * 3, items) for name, items in REGIONS.items()}
    ventricles = csf * regions["ventricle_box"] * (csf > 0.5)
    # where ventricle size is measured: the template ventricles and 2 voxels around them
    regions["ventricle_roi"] = (ndimage.binary_dilation(ventricles > 0.05, iterations=2)
                                & (regions["ventricle_box"] > 0.5)).astype(np.float32)
    return Anatomy(shape=shape, affine=target, t1=t1, gm=gm, wm=wm, csf=csf, brain=head, regions=regions,
                   ventricles=ventricles.astype(np.float32))


def write_site_templates(folder: Path) -> dict[str, Path]:
    """The files `cmvim.data.registration` registers scans to (cmvim/data/templates/): the ICBM152
    2009a T1, brain mask and grey-matter map on a 2 mm grid (enough for a 4 mm model grid), as
    uint8. A site installs them with cmvim; nilearn (where they come from) is only the simulator's.

        python -c "from pathlib import Path; from cmvim.simulations.anatomy import write_site_templates as w; w(Path('cmvim/data/templates'))"

    The brain mask is the anatomy's: grey + white matter above 0.3, closed, holes filled (so the
    ventricles are in), the same rule as `load_anatomy`'s head mask."""
    from cmvim.data.registration import TEMPLATE_FILES
    source = template_dir()
    images = {k: nib.load(str(source / f)) for k, f in TEMPLATE_FILES_1MM.items()}
    affine_1mm = images["t1"].affine
    t1, gm, wm = (np.asarray(images[k].dataobj, dtype=np.float32) for k in ("t1", "gm", "wm"))
    brain = ndimage.binary_fill_holes(ndimage.binary_closing((gm + wm) / 255.0 > 0.3, iterations=2))
    shape = tuple(int(n) // 2 + 1 for n in t1.shape)          # 197 x 233 x 189 at 1 mm -> 99 x 117 x 95 at 2 mm
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = affine_1mm[:3, 3]

    def downsampled(data: np.ndarray) -> np.ndarray:            # 2 mm FWHM low-pass, then every other voxel
        return ndimage.affine_transform(ndimage.gaussian_filter(data, 2.0 / 2.355), np.diag([2.0] * 3),
                                        output_shape=shape, order=1)

    arrays = {"t1": downsampled(t1), "gm": downsampled(gm),
              "brain": (downsampled(brain.astype(np.float32)) > 0.5).astype(np.float32)}
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, file in TEMPLATE_FILES.items():
        image = nib.Nifti1Image(np.clip(np.round(arrays[name]), 0, 255).astype(np.uint8), affine)
        image.header.set_xyzt_units("mm")
        written[name] = folder / file
        nib.save(image, str(written[name]))
    return written
