"""Preprocessing: small composable steps on a subject's volumes, driven by config.

A *subject sample* is a dict ``{"mri": Volume, "pet": Volume | None, "warnings": [...],
"files": {modality: path}}`` ("files" optional: errors name the file when it is there).
Each step takes one and returns one, checks what it needs, and touches only
what it is about (MONAI's dictionary transforms are the model). `build_pipeline(cfg)`
by `cfg.spatial`:

    template (the default: scans as scanners write them)
        ToTemplate -> Normalize
    ToTemplate (cmvim.data.registration) registers the T1 to the MNI152 template and the PET
    to its T1, resamples each scan once onto the model grid in template space, checks the
    registration and extracts the brain.

    none (scans already in template space)
        Reorient -> CheckOverlap -> Resample -> CropPad -> Normalize
    MRI and PET are taken to be in the same world space; `CheckOverlap` warns when they are not.
    Resampling puts every modality on the reference modality's grid, so after CropPad the MRI
    and PET voxels of a subject line up.
"""
from __future__ import annotations

from typing import Callable, Sequence

import nibabel as nib
import numpy as np

from ..model_config import MODALITIES
from ..names import NORMALIZER_NAMES
from ..run_config import PreprocessConfig
from .errors import DataError
from .grid import Volume, resample, world_bounds
from .registration import ToTemplate

# The most voxels a resampling grid may have. Resampling holds ~100 bytes a voxel at its peak
# (float64 coordinates for every target voxel), so 2**25 voxels is ~3.4 GB; a 1 mm grid over
# a 320 mm cube fits. A grid past it comes from a voxel size no scanner writes (a header in
# cm, or 100 mm voxels): refused before allocating, naming the file and the voxel size.
RESAMPLE_MAX_VOXELS = 2 ** 25


Sample = dict
Step = Callable[[Sample], Sample]


def _volumes(sample: Sample):
    return [(m, sample[m]) for m in MODALITIES if sample.get(m) is not None]


def _file(sample: Sample, modality: str):
    return sample.get("files", {}).get(modality)


class Reorient:
    """To the closest canonical orientation, RAS+ (a permutation/flip of axes, no interpolation)."""

    def __call__(self, sample: Sample) -> Sample:
        for modality, vol in _volumes(sample):
            image = nib.as_closest_canonical(nib.Nifti1Image(vol.data, vol.affine))
            sample[modality] = Volume(np.ascontiguousarray(np.asanyarray(image.dataobj), dtype=np.float32),
                                      image.affine)
        return sample


class CheckOverlap:
    """Warn (in sample["warnings"]) when PET and MRI world boxes overlap too little."""

    def __init__(self, min_overlap: float = 0.5):
        self.min_overlap = min_overlap

    def __call__(self, sample: Sample) -> Sample:
        if sample.get("mri") is None or sample.get("pet") is None:
            return sample
        (lo_a, hi_a), (lo_b, hi_b) = world_bounds(sample["mri"]), world_bounds(sample["pet"])
        inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None).prod()
        smaller = min(np.prod(hi_a - lo_a), np.prod(hi_b - lo_b))
        overlap = inter / smaller if smaller > 0 else 0.0
        if overlap < self.min_overlap:
            sample.setdefault("warnings", []).append(
                f"MRI and PET overlap {overlap:.0%} in world space: are they in the same space (co-registered)?")
        return sample


class Resample:
    """Every modality onto one axis-aligned RAS grid covering the reference modality.

    voxel_size None keeps the reference's own grid (the others are still resampled onto it).
    """

    def __init__(self, voxel_size: float | None, reference: str = "mri"):
        self.voxel_size = voxel_size
        self.reference = reference

    def target_grid(self, ref: Volume) -> tuple[np.ndarray, tuple[int, int, int]]:
        if self.voxel_size is None:
            return ref.affine, ref.data.shape
        lo, hi = world_bounds(ref)
        shape = tuple(int(np.floor((high - low) / self.voxel_size)) + 1 for low, high in zip(lo, hi))
        affine = np.diag([self.voxel_size] * 3 + [1.0])
        affine[:3, 3] = (lo + hi) / 2 - self.voxel_size * (np.array(shape) - 1) / 2   # centred on the box
        return affine, shape

    def check_grid(self, ref: Volume, shape: Sequence[int], file=None, column: str | None = None) -> None:
        """A grid the reference's voxel size cannot sensibly give is that scan's problem: refused
        before anything is allocated for it."""
        voxels = int(np.prod(shape, dtype=np.int64))
        size = "x".join(f"{v:.3g}" for v in ref.voxel_size)
        onto = f"the {self.voxel_size:g} mm grid" if self.voxel_size is not None else "its own grid"
        grid = "x".join(map(str, shape))
        if voxels > RESAMPLE_MAX_VOXELS:
            raise DataError(f"voxel size {size} mm: resampling onto {onto} needs a {grid} grid ({voxels:,} voxels), "
                            f"more than the {RESAMPLE_MAX_VOXELS:,} allowed; is the voxel size in the header "
                            "right?", file=file, column=column, kind="bad voxel size")
        if min(shape) < 2:
            lo, hi = world_bounds(ref)
            extent = "x".join(f"{v:.3g}" for v in hi - lo)
            raise DataError(f"voxel size {size} mm: the scan spans {extent} mm, less than two voxels of {onto}; "
                            "is the voxel size in the header right?", file=file, column=column,
                            kind="bad voxel size")

    def __call__(self, sample: Sample) -> Sample:
        name = self.reference if sample.get(self.reference) is not None else "mri"
        ref = sample.get(name)
        if ref is None:
            raise DataError(f"no {self.reference} volume to define the resampling grid", kind="missing modality")
        affine, shape = self.target_grid(ref)
        targets = [(m, vol) for m, vol in _volumes(sample) if not (vol is ref and self.voxel_size is None)]
        if targets:
            self.check_grid(ref, shape, _file(sample, name), name)
        for modality, vol in targets:
            sample[modality] = resample(vol, affine, shape)
        return sample


class CropPad:
    """Centre crop / zero pad each volume to shape^3, shifting the affine to match."""

    def __init__(self, shape: int):
        self.shape = shape

    def __call__(self, sample: Sample) -> Sample:
        for modality, vol in _volumes(sample):
            data, offset = vol.data, np.zeros(3)
            out = np.zeros((self.shape,) * 3, dtype=np.float32)
            src, dst = [], []
            for axis, n in enumerate(data.shape):
                start = (n - self.shape) // 2                         # >0: crop, <0: pad
                offset[axis] = start
                s0, d0 = max(start, 0), max(-start, 0)
                length = min(n - s0, self.shape - d0)
                src.append(slice(s0, s0 + length))
                dst.append(slice(d0, d0 + length))
            out[tuple(dst)] = data[tuple(src)]
            affine = vol.affine.copy()
            affine[:3, 3] = vol.affine[:3, :3] @ offset + vol.affine[:3, 3]
            sample[modality] = Volume(out, affine)
        return sample


def normalize_percentile(data: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    lo, hi = np.percentile(data, cfg.percentiles)
    if hi <= lo:
        raise DataError("no intensity range left after percentile clipping", kind="empty volume")
    return ((np.clip(data, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def normalize_zscore(data: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """z-score within a foreground mask; background set to 0 (MONAI's nonzero normalisation)."""
    mask = data > cfg.foreground * np.percentile(data, 99)
    if mask.sum() < 10:
        raise DataError("no foreground to normalise (fewer than 10 voxels above threshold)", kind="empty volume")
    values = data[mask]
    std = values.std()
    out = np.zeros_like(data, dtype=np.float32)
    out[mask] = (values - values.mean()) / (std if std > 0 else 1.0)
    return out


def normalize_suvr(data: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """FDG as SUVR (uptake over the mean of a whole-brain reference region), centred: SUVR - 1
    inside the brain mask, 0 outside.

    Unlike percentile clipping, the hottest cortex keeps its value, and posterior cingulate /
    precuneus hypometabolism, where Alzheimer's shows in FDG, stays a ratio to the rest of the
    brain. Centring matters as much (measured, docs/science.md): with the brain at 0 like the
    background, a region's mean reads its uptake, not how much of it lies inside the head.
    """
    mask = data > cfg.foreground * np.percentile(data, 99)
    if mask.sum() < 10:
        raise DataError("no foreground to normalise (fewer than 10 voxels above threshold)", kind="empty volume")
    reference = float(data[mask].mean())
    if not reference > 0:
        raise DataError("the reference region's mean uptake is not positive", kind="empty volume")
    out = np.zeros_like(data, dtype=np.float32)
    out[mask] = data[mask] / reference - 1.0
    return out


NORMALIZERS = {"percentile": normalize_percentile, "zscore": normalize_zscore, "suvr": normalize_suvr,
               "none": lambda data, cfg: data.astype(np.float32)}
assert tuple(NORMALIZERS) == NORMALIZER_NAMES, "cmvim.names.NORMALIZER_NAMES names what this module implements"


class Normalize:
    """Per-modality intensity normalisation (method per modality from the config)."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg

    def __call__(self, sample: Sample) -> Sample:
        for modality, vol in _volumes(sample):
            method = NORMALIZERS[self.cfg.normalize.get(modality, "none")]
            try:
                sample[modality] = Volume(method(vol.data, self.cfg), vol.affine)
            except DataError as err:
                raise err.with_context(file=_file(sample, modality), column=modality) from None
        return sample


class Compose:
    def __init__(self, steps: Sequence[Step]):
        self.steps = list(steps)

    def __call__(self, sample: Sample) -> Sample:
        for step in self.steps:
            sample = step(sample)
        return sample


def build_pipeline(cfg: PreprocessConfig) -> Compose:
    if cfg.spatial == "template":
        return Compose([ToTemplate(cfg), Normalize(cfg)])
    return Compose([Reorient(), CheckOverlap(cfg.min_overlap), Resample(cfg.voxel_size, cfg.reference),
                    CropPad(cfg.shape), Normalize(cfg)])
