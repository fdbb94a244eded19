"""Scans as scanners write them, brought into template space at the site (`preprocess.spatial: template`).

Per visit, the steps of Clinica's `t1-linear` / `pet-linear` (the field's reference for AD
classification) without ANTs or FSL installed, on SimpleITK (ITK's registration framework:
Mattes mutual information, multi-resolution, N4):

  1. T1: N4 bias-field correction (fitted on a shrunk copy, applied at full resolution); rigid,
     then affine (12 dof) registration to the MNI152 2009a T1 at 2 mm (cmvim/data/templates/),
     by mutual information inside the template's dilated brain mask, from two starts (the
     centres of mass; the brain centre below the top of the head) and, when the result does
     not look like the template, tilted ones (`register_t1`).
  2. PET: rigid (6 dof) registration to the same visit's corrected T1 by mutual information,
     multi-resolution, from a start that puts the PET's centre of uptake on the T1's brain
     centre (step 1 tells where that is): a PET from another session, scanner or world origin
     starts where it should.
  3. One interpolation per native scan: the model grid in template space (`model_grid`) is
     mapped through the composed transform (template -> T1, or template -> T1 -> PET) into the
     native voxels, low-pass filtered first where the model grid is coarser than the scan.
  4. Brain extraction: the template's brain mask, dilated by `brain_margin_mm`, on the model
     grid (after registration it is the subject's brain; measured in docs/preprocessing.md).
  5. Quality control (`quality`): the registered T1's correlation with the template T1 inside
     the brain, the registered PET's with the template's grey matter (FDG follows grey matter),
     the head size the affine implies. A visit outside the configured bounds is a DataError
     naming the scan, the measure and its bound: never a silently used scan.

Transforms are 4x4 matrices in RAS millimetres that send a template point to where it lies in
the scan's world ("template -> scan"), the same convention as the synthetic cohort's known
answers (cmvim.simulations.scanner). ITK works in LPS; the conversion happens here only.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..run_config import PreprocessConfig, RegistrationConfig
from .errors import DataError
from .grid import Volume, resample

Sample = dict

# Where the model grid sits in template space: the centre of the MNI152 brain's bounding box
# (x 0, y -17, z 5) raised 5 mm, so a 192 mm grid holds cerebellum to vertex. The synthetic
# template-space cohort is centred there too, so `spatial: none` on it gives the same grid.
TEMPLATE_CENTRE = np.array([0.0, -17.0, 10.0])
TEMPLATE_FILES = {"t1": "mni152_2009a_t1_2mm.nii.gz", "brain": "mni152_2009a_brain_2mm.nii.gz",
                  "gm": "mni152_2009a_gm_2mm.nii.gz"}
# bump when what the registration computes changes: part of every transform's cache key
REGISTRATION_VERSION = "1"
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])          # RAS <-> LPS (ITK's physical space)


@dataclass(frozen=True)
class Template:
    """The MNI152 2009a T1, brain mask and grey-matter map on their 2 mm grid (uint8 files)."""
    t1: np.ndarray
    brain: np.ndarray
    gm: np.ndarray
    affine: np.ndarray


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    folder = resources.files("cmvim.data") / "templates"
    arrays = {}
    affine = None
    for name, file in TEMPLATE_FILES.items():
        with resources.as_file(folder / file) as path:
            image = nib.load(str(path))
            arrays[name] = np.asarray(image.dataobj, dtype=np.float32)
            affine = np.asarray(image.affine, dtype=np.float64)
    return Template(t1=arrays["t1"] / 255.0, brain=(arrays["brain"] > 0).astype(np.float32),
                    gm=arrays["gm"] / 255.0, affine=affine)


def model_grid(cfg: PreprocessConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The model's input grid in template space: shape^3 voxels of voxel_size mm (2 mm, the
    template's, when voxel_size is None), centred on TEMPLATE_CENTRE."""
    voxel = cfg.voxel_size if cfg.voxel_size is not None else 2.0
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = TEMPLATE_CENTRE - voxel * (cfg.shape - 1) / 2
    return affine, (cfg.shape,) * 3


def transform_fingerprint(cfg: RegistrationConfig) -> str:
    """What a cached transform depends on besides the scans: the registration code, the template
    and the settings that change the transforms (not the QC bounds, not the model grid)."""
    text = f"{REGISTRATION_VERSION}:{sorted(TEMPLATE_FILES.items())}:bias={cfg.bias_correction}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- ITK <-> nibabel ---------------------------------------------------------------------------

def _sitk():
    import SimpleITK as sitk
    return sitk


def to_itk(data: np.ndarray, affine: np.ndarray):
    """A float32 ITK image of `data` (i, j, k) with its RAS voxel-to-world `affine`."""
    sitk = _sitk()
    lps = _FLIP @ affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, np.float32).transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    return image


def _itk_affine(matrix_ras: np.ndarray):
    """An ITK AffineTransform doing `matrix_ras` (4x4, RAS mm)."""
    sitk = _sitk()
    lps = _FLIP @ matrix_ras @ _FLIP
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(lps[:3, :3].flatten().tolist())
    transform.SetTranslation(lps[:3, 3].tolist())
    return transform


def _matrix(transform) -> np.ndarray:
    """The 4x4 RAS matrix of an ITK affine-like transform (probed at four points: works for any
    composite of linear transforms)."""
    probes = np.array([[0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100]], float)
    moved = np.array([transform.TransformPoint(p.tolist()) for p in probes])
    lps = np.eye(4)
    lps[:3, 3] = moved[0]
    lps[:3, :3] = (moved[1:] - moved[0]).T / 100
    return _FLIP @ lps @ _FLIP


# -- the steps ---------------------------------------------------------------------------------

def bias_corrected(t1: Volume, shrink_mm: float = 8.0) -> Volume:
    """N4 bias-field correction: the field fitted on a copy shrunk to ~`shrink_mm` voxels inside
    an Otsu head mask, then divided out of the full-resolution T1."""
    sitk = _sitk()
    image = to_itk(np.clip(t1.data, 0, None), t1.affine)
    shrink = [max(1, int(round(shrink_mm / s))) for s in image.GetSpacing()]
    small = sitk.Shrink(image, shrink)
    mask = sitk.OtsuThreshold(small, 0, 1, 200)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([20, 10])
    n4.Execute(small, mask)
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image)).transpose(2, 1, 0)
    return Volume((np.clip(t1.data, 0, None) / np.exp(log_field)).astype(np.float32), t1.affine)


def _registration(fixed_mask, shrink: list[int], smooth_mm: list[float], sampling: float, step: float,
                  iterations: int, seed: int = 1):
    sitk = _sitk()
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, seed)       # a fixed seed: the same scan, the same transform
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(step, 1e-2, iterations, relaxationFactor=0.5)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(smooth_mm)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


@functools.lru_cache(maxsize=1)
def _template_images():
    """The template T1 and its brain mask dilated by 6 mm (where the T1 metric looks) as ITK images."""
    sitk = _sitk()
    template = load_template()
    fixed = to_itk(template.t1, template.affine)
    mask = sitk.Cast(to_itk(template.brain, template.affine) > 0.5, sitk.sitkUInt8)
    return fixed, sitk.BinaryDilate(mask, [3, 3, 3])


def head_top_start(t1: Volume) -> np.ndarray:
    """Where the brain's centre probably lies in a head scan (world RAS mm): 86 mm below the top
    of the head (the template's brain centre lies 72 mm below its brain's top, and scalp and
    skull add ~14), at the centre of the head's top 80 mm. A whole-head centre of mass is pulled
    15-27 mm down and forward by neck and face (measured: docs/preprocessing.md); this is not."""
    head = t1.data > 0.2 * np.percentile(t1.data, 99)
    if not head.any():                       # nothing bright: the grid's centre (the check will say the rest)
        head = np.ones(t1.data.shape, bool)
    world = nib.affines.apply_affine(t1.affine, np.argwhere(head))
    top = np.percentile(world[:, 2], 99.5)
    crown = world[world[:, 2] > top - 80]
    return np.array([crown[:, 0].mean(), crown[:, 1].mean(), top - 86.0])


# below this correlation with the template after the two usual starts, tilted starts are tried: a
# head turned 25-30 degrees ends 6-19 mm off from the usual starts and within 0.6 mm from a tilted
# one (the template posed by hand, tests/test_registration.py); heads within 15 degrees rarely need it
RETRY_BELOW = 0.75
TILTED_STARTS_DEG = 15.0


def register_t1(t1: Volume) -> np.ndarray:
    """template -> T1 world (4x4 RAS): rigid at 8 and 4 mm from two starts (centres of mass, and
    the brain centre below the top of the head: `head_top_start`), the better by the metric, then
    affine at 4 mm. When the result's correlation with the template is below RETRY_BELOW, the same
    from tilted starts (+-15 degrees about each axis, one at a time), keeping the best by that
    correlation, until one passes. A 2 mm level added time and no accuracy at the model's 4 mm
    grid; one rigid level, or sampling 5 % of the voxels, left 1-7 of 90 heads 10-25 mm off
    (measured: docs/preprocessing.md)."""
    sitk = _sitk()
    moving = to_itk(t1.data, t1.affine)
    moments = sitk.CenteredTransformInitializer(_template_images()[0], moving, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    crown = head_top_start(t1)
    found = _rigid_then_affine(moving, [moments, _euler_start(crown)])
    similarity = t1_similarity(t1, found)
    if similarity >= RETRY_BELOW:
        return found
    # each tilted start on its own, judged by the correlation (the metric itself preferred wrong
    # poses that put skull on the template's cortex), until one passes
    for axis in range(3):
        for sign in (-1, 1):
            retried = _rigid_then_affine(moving, [_euler_start(crown, axis, sign * np.deg2rad(TILTED_STARTS_DEG))])
            retried_similarity = t1_similarity(t1, retried)
            if retried_similarity > similarity:
                found, similarity = retried, retried_similarity
            if similarity >= RETRY_BELOW:
                return found
    return found


def _euler_start(brain_centre: np.ndarray, axis: int | None = None, angle: float = 0.0):
    """A rigid start that puts the template's brain centre on `brain_centre` (RAS mm), optionally
    turned by `angle` radians about one axis through it."""
    sitk = _sitk()
    start = sitk.Euler3DTransform()
    start.SetCenter((_FLIP[:3, :3] @ TEMPLATE_CENTRE).tolist())
    start.SetTranslation((_FLIP[:3, :3] @ (brain_centre - TEMPLATE_CENTRE)).tolist())
    if axis is not None:
        angles = [0.0, 0.0, 0.0]
        angles[axis] = angle
        start.SetRotation(*angles)
    return start


def _rigid_then_affine(moving, starts: list) -> np.ndarray:
    """Rigid (8, 4 mm) from each start, the best by the metric, then affine (4 mm)."""
    fixed, mask = _template_images()
    best = None
    for start in starts:
        rigid = _registration(mask, [4, 2], [4.0, 2.0], 0.1, 2.0, 200)
        rigid.SetInitialTransform(start, inPlace=False)
        found = rigid.Execute(fixed, moving)
        if best is None or rigid.GetMetricValue() < best[0]:
            best = (rigid.GetMetricValue(), found)
    affine = _registration(mask, [2], [2.0], 0.1, 1.0, 200)
    affine.SetInitialTransform(_itk_affine(_matrix(best[1])), inPlace=False)
    return _matrix(affine.Execute(fixed, moving))


def t1_similarity(t1: Volume, template_to_t1: np.ndarray, cfg: PreprocessConfig | None = None) -> float:
    """The registered T1's correlation with the template T1 inside the template's brain, on the
    model grid (`cfg`; by default 48^3 at 4 mm): the T1 check's measure."""
    cfg = cfg or PreprocessConfig(shape=48, voxel_size=4.0)
    registered = onto_grid(t1, template_to_t1, *model_grid(cfg)).data
    return _correlation(registered, template_on_grid("t1", cfg), template_on_grid("brain", cfg) > 0.5)


def register_pet(pet: Volume, t1: Volume, template_to_t1: np.ndarray) -> np.ndarray:
    """T1 world -> PET world (4x4 RAS), rigid, by mutual information over the whole T1 (the head's
    outline and scalp uptake help; the brain alone let 1 in 78 PETs rotated 14 degrees away stop
    15 mm off), at 8, 4 and 2 mm, from the PET's centre of uptake put on the T1's brain centre:
    a PET from another scanner or world origin starts where it should."""
    sitk = _sitk()
    fixed = to_itk(t1.data, t1.affine)
    hot = pet.data > 0.2 * np.percentile(pet.data, 99)
    uptake_centre = nib.affines.apply_affine(pet.affine, np.argwhere(hot).mean(axis=0))
    brain_centre = nib.affines.apply_affine(template_to_t1, TEMPLATE_CENTRE)
    start = sitk.Euler3DTransform()
    start.SetCenter((_FLIP[:3, :3] @ brain_centre).tolist())
    start.SetTranslation((_FLIP[:3, :3] @ (uptake_centre - brain_centre)).tolist())
    method = _registration(None, [4, 2, 1], [8.0, 4.0, 2.0], 0.2, 2.0, 200)
    method.SetInitialTransform(start, inPlace=False)
    return _matrix(method.Execute(fixed, to_itk(pet.data, pet.affine)))


def onto_grid(volume: Volume, template_to_scan: np.ndarray, grid_affine: np.ndarray, shape) -> Volume:
    """`volume` (native) on the template-space grid through `template_to_scan`: one trilinear
    interpolation, after a Gaussian low-pass where the grid's voxels are coarser than the scan's
    (so a 1 mm T1 is averaged into 4 mm voxels, not point-sampled)."""
    target = float(np.sqrt((grid_affine[:3, :3] ** 2).sum(axis=0)).max())
    native = volume.voxel_size
    sigmas = np.sqrt(np.clip(target ** 2 - native ** 2, 0, None)) / 2.355 / native
    data = ndimage.gaussian_filter(volume.data, sigmas) if np.any(sigmas > 0.3) else volume.data
    scan_in_template = np.linalg.inv(template_to_scan) @ volume.affine      # native voxel -> template mm
    return resample(Volume(np.asarray(data, np.float32), scan_in_template), grid_affine, shape)


def brain_mask(cfg: PreprocessConfig) -> np.ndarray:
    """The template's brain mask, dilated by brain_margin_mm, on the model grid (soft edges, 0-1)."""
    return _brain_mask(cfg.shape, cfg.voxel_size, cfg.registration.brain_margin_mm)


@functools.lru_cache(maxsize=4)
def _brain_mask(shape: int, voxel_size: float | None, margin_mm: float) -> np.ndarray:
    template = load_template()
    inside = template.brain > 0.5
    if margin_mm > 0:
        voxel = float(np.sqrt((template.affine[:3, :3] ** 2).sum(axis=0))[0])
        inside = ndimage.distance_transform_edt(~inside, sampling=voxel) <= margin_mm
    affine, grid = model_grid(PreprocessConfig(shape=shape, voxel_size=voxel_size))
    mask = resample(Volume(inside.astype(np.float32), template.affine), affine, grid).data
    mask.setflags(write=False)
    return mask


def template_on_grid(name: str, cfg: PreprocessConfig) -> np.ndarray:
    """The template's T1 ("t1"), brain ("brain") or grey matter ("gm") on the model grid."""
    return _template_on_grid(name, cfg.shape, cfg.voxel_size)


@functools.lru_cache(maxsize=8)
def _template_on_grid(name: str, shape: int, voxel_size: float | None) -> np.ndarray:
    template = load_template()
    affine, grid = model_grid(PreprocessConfig(shape=shape, voxel_size=voxel_size))
    data = onto_grid(Volume(getattr(template, name), template.affine), np.eye(4), affine, grid).data
    data.setflags(write=False)
    return data


def _correlation(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    x, y = a[where].astype(np.float64), b[where].astype(np.float64)
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def head_scales(template_to_scan: np.ndarray) -> np.ndarray:
    """The affine's scale factors (singular values of its linear part): the head's size against
    the template's (1: template size)."""
    return np.linalg.svd(template_to_scan[:3, :3], compute_uv=False)


def quality(sample: Sample, cfg: PreprocessConfig) -> dict[str, float]:
    """QC measures of a registered sample (on the model grid, before brain extraction):
    t1_similarity, pet_similarity (when a PET is there), head_scale_min / _max."""
    inside = template_on_grid("brain", cfg) > 0.5
    qc = {"t1_similarity": _correlation(sample["mri"].data, template_on_grid("t1", cfg), inside)}
    if sample.get("pet") is not None:
        qc["pet_similarity"] = _correlation(sample["pet"].data, template_on_grid("gm", cfg), inside)
    scales = head_scales(sample["transforms"]["mri"])
    qc["head_scale_min"], qc["head_scale_max"] = float(scales.min()), float(scales.max())
    return qc


def quality_problem(qc: dict[str, float], cfg: RegistrationConfig) -> tuple[str, str] | None:
    """(modality, why) when a QC measure is out of its bounds, else None."""
    low, high = cfg.head_scale_range
    if not (low <= qc["head_scale_min"] and qc["head_scale_max"] <= high):
        return "mri", (f"T1 registration implies a head {qc['head_scale_min']:.2f}-{qc['head_scale_max']:.2f} times "
                       f"the template's (plausible: {low:g}-{high:g}): the registration diverged, or the header's "
                       "voxel sizes are wrong")
    if qc["t1_similarity"] < cfg.min_t1_similarity:
        return "mri", (f"T1 registration failed its check: correlation with the template T1 inside the brain "
                       f"{qc['t1_similarity']:.2f} (needs {cfg.min_t1_similarity:g}): not a T1-weighted head scan "
                       "(another contrast such as T2, another body part), or the registration did not converge")
    if "pet_similarity" in qc and qc["pet_similarity"] < cfg.min_pet_similarity:
        return "pet", (f"PET registration failed its check: correlation with the template's grey matter inside "
                       f"the brain {qc['pet_similarity']:.2f} (needs {cfg.min_pet_similarity:g}): not an FDG "
                       "brain PET, a header whose orientation is wrong, or a co-registration that did not converge")
    return None


class ToTemplate:
    """The `spatial: template` step: register (or take the transforms already in
    sample["transforms"], from the cache), resample every modality once onto the model grid,
    check the registration, extract the brain. Adds sample["qc"]."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg

    def __call__(self, sample: Sample) -> Sample:
        files = sample.get("files", {})
        modality = "mri"
        try:
            if self.cfg.registration.bias_correction:
                sample["mri"] = bias_corrected(sample["mri"])
            if sample.get("transforms") is None:
                found = {"mri": register_t1(sample["mri"])}
                if sample.get("pet") is not None:
                    modality = "pet"
                    found["pet"] = register_pet(sample["pet"], sample["mri"], found["mri"]) @ found["mri"]
                sample["transforms"] = found
        except RuntimeError as exc:              # ITK's own failures (e.g. too few voxels for its metric)
            last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
            raise DataError(f"registration failed inside ITK: {last}", file=files.get(modality), column=modality,
                            kind="registration failed") from None
        grid_affine, shape = model_grid(self.cfg)
        for modality in ("mri", "pet"):
            if sample.get(modality) is not None:
                sample[modality] = onto_grid(sample[modality], sample["transforms"][modality], grid_affine, shape)
        sample["qc"] = quality(sample, self.cfg)
        problem = quality_problem(sample["qc"], self.cfg.registration)
        if problem is not None:
            modality, why = problem
            raise DataError(why, file=files.get(modality), column=modality, kind="registration failed")
        if self.cfg.registration.brain_margin_mm is None:          # no brain extraction: the head as scanned
            return sample
        mask = brain_mask(self.cfg)
        for modality in ("mri", "pet"):
            if sample.get(modality) is not None:
                sample[modality] = Volume(sample[modality].data * mask, grid_affine)
        return sample

