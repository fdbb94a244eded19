"""Scanner space: the cohort's subjects as scanners write them, not as a template holds them.

A hospital's T1 comes with skull, scalp, face and neck, the head wherever the patient lay in a
240-256 mm field of view and tilted, an origin that has nothing to do with the brain, voxel
axes in the scanner's order (DICOM-derived NIfTI is LPS; sagittal acquisitions put left-right
last) and anisotropic voxels; the FDG-PET comes from another session, posed apart from the T1,
on its own grid. `scanner_scans` writes one subject that way from the very images
`cohort.synthesize` made in template space (same brain, same disease, same labels), so a
template-space and a scanner-space cohort of one seed hold the same subjects and a model's
score on both measures what the site's preprocessing (registration, brain extraction) costs.

The head model: nilearn's MNI152 2009a is brain only and no template with a skull installs
from a package registry (checked), so the head is built around each subject's brain: by the
distance from the brain, extra-axial CSF, the skull's inner table, diploe (marrow, bright in
T1), outer table, galea, subcutaneous fat (bright) and skin, each layer's thickness drawn per
subject and varying smoothly over the head; a face (with the eyes) and a neck (muscle, fat,
vertebrae and spinal cord) from ellipsoids and cylinders at MNI coordinates. In FDG, scalp,
face and neck muscle take up a little (a tenth of grey matter), the extra-ocular muscles more.

Every random draw here comes from generators of its own (per site, per subject), never from the
template cohort's stream: the same seed gives the same subjects in both spaces.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cmvim.data.augment import rotation_matrix
from cmvim.data.preprocess import Volume, resample

from .anatomy import Anatomy

HEAD_PAD_MM = 48.0          # the head grid: the anatomy grid (brain) plus this much on every side
BRAIN_CENTRE = np.array([0.0, -17.0, 10.0])   # MNI mm, what poses rotate about
MAX_ROTATION_DEG = 15.0     # the T1's head pose, about each axis
MAX_SHIFT_MM = 30.0         # the head off the field of view's centre, per axis
MAX_ORIGIN_MM = 100.0       # the brain's distance from the world origin
PET_ROTATION_DEG = 10.0     # the PET's pose relative to its T1's
PET_SHIFT_MM = 20.0
MRI_AXES = ("LPS", "RAS", "LAS", "PSR", "ASL")   # voxel axis codes a site's T1s may have (the slice axis last)
PET_AXES = ("LPS", "LAS", "RAS")

_DIRECTIONS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}


@dataclass
class ScannerProfile:
    """One site's scanners: voxel sizes and fields of view (mm, along the voxel axes, the slice
    axis last) and voxel axis codes ("LPS": the axes point to the patient's left, posterior,
    superior) of its T1s and its PETs."""
    mri_voxel: tuple[float, float, float]
    mri_fov: tuple[float, float, float]
    mri_axes: str
    pet_voxel: tuple[float, float, float]
    pet_fov: tuple[float, float, float]
    pet_axes: str


def scanner_profile(seed: int, site_name: str, template_voxel_mm: float) -> ScannerProfile:
    """A site's scanners, drawn from (seed, site). Voxel sizes follow the cohort's grid (`shape`):
    at a 1 mm template grid, T1 voxels of 0.85-1 mm in plane and 1.1-1.3 mm between slices, as a
    3D T1 has, and PET voxels of 1.2-1.6 mm; coarser grids scale them alike."""
    rng = np.random.default_rng([seed, ord(site_name), 0x5CA])
    in_plane = template_voxel_mm * rng.uniform(0.85, 1.0)
    mri_fov = rng.uniform(240, 256)
    pet_voxel = template_voxel_mm * rng.uniform(1.2, 1.6)
    return ScannerProfile(
        mri_voxel=(in_plane, in_plane, template_voxel_mm * rng.uniform(1.1, 1.3)),
        mri_fov=(mri_fov, mri_fov, rng.uniform(240, 256)),
        mri_axes=str(rng.choice(MRI_AXES)),
        pet_voxel=(pet_voxel, pet_voxel, pet_voxel * rng.uniform(0.9, 1.1)),
        pet_fov=(rng.uniform(256, 300),) * 2 + (rng.uniform(200, 230),),
        pet_axes=str(rng.choice(PET_AXES)))


def rotation(angles_rad: np.ndarray) -> np.ndarray:
    """Rz @ Ry @ Rx for angles (x, y, z) in radians (the pretraining augmentation's rotation)."""
    return rotation_matrix(torch.as_tensor(np.asarray(angles_rad, dtype=np.float64))).numpy()


def rigid(rot: np.ndarray, centre: np.ndarray, to: np.ndarray) -> np.ndarray:
    """4x4: rotate by `rot` about `centre`, then move `centre` to `to`."""
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = to - rot @ centre
    return out


def grid_affine(voxel: tuple[float, float, float], fov: tuple[float, float, float], axes: str,
                centre: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A scanner grid: voxel axes along `axes`, `fov` mm wide, centred on world point `centre`."""
    shape = tuple(int(round(f / v)) for f, v in zip(fov, voxel))
    affine = np.eye(4)
    affine[:3, :3] = np.array([_DIRECTIONS[c] for c in axes], float).T * np.array(voxel)
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine, shape


# -- the head around the brain -----------------------------------------------------------------

# T1 contrast of the layers outside the brain (white matter 1.0), by distance from the brain (mm,
# at thickness factor 1): extra-axial CSF, inner table, diploe, outer table, galea, fat, skin
LAYERS = ((2.0, 0.2), (3.5, 0.08), (6.5, 0.75), (8.0, 0.08), (9.5, 0.45), (14.0, 1.05), (15.5, 0.55))
LAYER_UPTAKE = (0.05, 0.02, 0.03, 0.02, 0.1, 0.02, 0.1)   # FDG, relative to grey matter
MUSCLE, FAT, MARROW, CORD, VITREOUS = 0.45, 1.05, 0.7, 0.6, 0.15


def _ellipsoid(xyz: np.ndarray, centre, radii) -> np.ndarray:
    return ((((xyz - np.array(centre)) / np.array(radii)) ** 2).sum(-1))


def head_maps(brain: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(T1 contrast, FDG uptake) of everything in the head that is not brain, on the grid of
    `brain` (a 0-1 brain mask with its affine, isotropic voxels, template mm)."""
    voxel = float(np.sqrt((affine[:3, :3] ** 2).sum(0))[0])
    inside = brain > 0.5
    distance = ndimage.distance_transform_edt(~inside, sampling=voxel)
    # layer thicknesses: drawn per subject, varying smoothly (+-20 %) over the head
    coarse = rng.standard_normal((4, 4, 4))
    vary = ndimage.zoom(coarse, np.array(brain.shape) / 4, order=1)[:brain.shape[0], :brain.shape[1], :brain.shape[2]]
    thickness = rng.uniform(0.8, 1.25) * (1 + 0.2 * np.tanh(vary))
    depth = distance / thickness
    t1 = np.zeros(brain.shape, np.float32)
    uptake = np.zeros(brain.shape, np.float32)
    previous = 0.0
    for (outer, value), fdg in zip(LAYERS, LAYER_UPTAKE):
        layer = (depth > previous) & (depth <= outer)
        t1[layer], uptake[layer] = value, fdg
        previous = outer
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in brain.shape], indexing="ij"), axis=-1).astype(np.float32)
    xyz = ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    scalp = depth <= LAYERS[-1][0]
    # face below the frontal lobes, eyes in it; neck below the skull base, spine in it
    face = (_ellipsoid(xyz, (0, 58, -38), (56, 46, 42)) <= 1) & ~inside & ~scalp
    neck = ((((xyz[..., 0]) / 52) ** 2 + ((xyz[..., 1] + 22) / 56) ** 2 <= 1) & (xyz[..., 2] < -38)
            & ~inside & ~scalp)
    soft = face | neck
    t1[soft], uptake[soft] = MUSCLE, 0.1
    rim = soft & ~ndimage.binary_erosion(soft, iterations=max(1, int(round(6 / voxel))))
    t1[rim], uptake[rim] = FAT, 0.02
    for side in (-1, 1):
        eye = _ellipsoid(xyz, (32 * side, 54, -34), (12, 12, 12))
        t1[eye <= 1], uptake[eye <= 1] = VITREOUS, 0.02
        muscle = (eye > 1) & (eye <= 1.5) & ~inside
        t1[muscle], uptake[muscle] = MUSCLE, 0.4
    spine = ((xyz[..., 0] / 11) ** 2 + ((xyz[..., 1] + 38) / 11) ** 2 <= 1) & (xyz[..., 2] < -45)
    t1[spine], uptake[spine] = MARROW, 0.05
    cord = (xyz[..., 0] ** 2 + (xyz[..., 1] + 38) ** 2 <= 25) & (xyz[..., 2] < -45)
    t1[cord], uptake[cord] = CORD, 0.15
    outside_brain = 1 - np.clip(brain, 0, 1)
    return t1 * outside_brain, uptake * outside_brain


# -- one subject -------------------------------------------------------------------------------

@dataclass
class ScannerScans:
    t1: np.ndarray
    t1_affine: np.ndarray
    pet: np.ndarray | None
    pet_affine: np.ndarray | None
    template_to_mri: np.ndarray          # 4x4: template mm -> the T1's world mm (the known answer)
    template_to_pet: np.ndarray | None


def _pad(volume: torch.Tensor, pad: int) -> np.ndarray:
    return F.pad(volume[None, None], [pad] * 6)[0, 0].numpy()


def _blur(volume: np.ndarray, fwhm_mm: tuple[float, float, float], voxel: tuple[float, float, float]) -> np.ndarray:
    """Gaussian blur of `fwhm_mm` along each voxel axis."""
    return ndimage.gaussian_filter(volume, [f / 2.355 / v for f, v in zip(fwhm_mm, voxel)])


def scanner_scans(images, anatomy: Anatomy, profile: ScannerProfile, site, rng: np.random.Generator
                  ) -> ScannerScans:
    """One subject's `cohort.SubjectImages` as the site's scanners write them (`site`: its
    cohort.SiteProfile: intensity scale, bias, noise, slice blur, PET resolution)."""
    voxel = anatomy.voxel_mm
    pad = int(math.ceil(HEAD_PAD_MM / voxel))
    head_affine = anatomy.affine.copy()
    head_affine[:3, 3] -= pad * voxel
    brain = _pad(images.brain, pad)
    head_t1, head_uptake = head_maps(brain, head_affine, rng)
    t1_head = _pad(images.t1_tissue, pad) + head_t1

    # the T1: posed in the field of view, world origin far from the brain
    rot = rotation(np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3)))
    direction = rng.standard_normal(3)
    brain_world = direction / np.linalg.norm(direction) * rng.uniform(0.3, 1.0) * MAX_ORIGIN_MM
    subject_to_mri = rigid(rot, BRAIN_CENTRE, brain_world)
    fov_centre = brain_world - rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 3)
    mri_affine, mri_shape = grid_affine(profile.mri_voxel, profile.mri_fov, profile.mri_axes, fov_centre)
    t1 = resample(Volume(t1_head, subject_to_mri @ head_affine), mri_affine, mri_shape).data
    t1 = _blur(t1, (0.0, 0.0, site.slice_blur_mm), profile.mri_voxel) if site.slice_blur_mm else t1
    coarse = rng.standard_normal((3, 3, 3))
    bias = np.exp(site.bias_strength * ndimage.zoom(coarse, np.array(mri_shape) / 3, order=1,
                                                    grid_mode=True, mode="nearest"))[:mri_shape[0], :mri_shape[1], :mri_shape[2]]
    t1 = t1 * bias * site.intensity_scale
    noise = site.noise * site.intensity_scale
    t1 = np.sqrt((t1 + noise * rng.standard_normal(t1.shape)) ** 2 + (noise * rng.standard_normal(t1.shape)) ** 2)
    template_to_mri = subject_to_mri @ images.template_to_subject
    scans = ScannerScans(t1.astype(np.float32), mri_affine, None, None, template_to_mri, None)
    if images.pet_uptake is None:
        return scans

    # the PET: another session, posed apart from the T1, on its own grid
    uptake = _pad(images.pet_uptake, pad) + _blur(head_uptake, (site.pet_fwhm_mm,) * 3, (voxel,) * 3)
    relative = rigid(rotation(np.deg2rad(rng.uniform(-PET_ROTATION_DEG, PET_ROTATION_DEG, 3))), brain_world,
                     brain_world + rng.uniform(-PET_SHIFT_MM, PET_SHIFT_MM, 3))
    subject_to_pet = relative @ subject_to_mri
    pet_centre = subject_to_pet[:3, :3] @ BRAIN_CENTRE + subject_to_pet[:3, 3] + rng.uniform(-10, 10, 3)
    pet_affine, pet_shape = grid_affine(profile.pet_voxel, profile.pet_fov, profile.pet_axes, pet_centre)
    pet = resample(Volume(uptake, subject_to_pet @ head_affine), pet_affine, pet_shape).data
    counts = rng.poisson(np.clip(pet, 0, None) * images.pet_counts)
    scans.pet = (counts * images.pet_gain).astype(np.float32)
    scans.pet_affine = pet_affine
    scans.template_to_pet = subject_to_pet @ images.template_to_subject
    return scans


def profile_dict(profile: ScannerProfile) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(profile).items()}
