"""Realistic synthetic multi-site AD cohorts, written as real site folders.

Real cohorts (ADNI and the like) cannot be shipped or downloaded here, so
simulations, tests and benchmarks use the next best thing: subjects built on
the MNI152 templates (`cmvim.simulations.anatomy`) with

  * inter-subject variability: smooth random deformations, head size by sex,
    age, and age-related atrophy as a confounder;
  * CN / MCI / AD effects from the literature (docs/cohort.md): hippocampal and
    entorhinal volume loss, ventricular enlargement, temporoparietal cortical
    thinning; FDG hypometabolism in posterior cingulate / precuneus and
    temporoparietal cortex; individual severity so the classes overlap;
  * T1 from tissue classes with scanner-like contrast; PET as uptake
    (GM > WM > CSF) x disease pattern, blurred to PET resolution with
    count-like noise; PET missing for some subjects;
  * radiology-style reports (`cmvim.simulations.reports`);
  * sites that differ (why federated learning is hard): intensity scale, bias
    field, noise, slice thickness, PET resolution, class prevalence, size,
    unlabeled fraction; some sites export DICOM series instead of NIfTI.

Everything is deterministic from the seed. Output: DIR/<site>/manifest.csv and
files (the site data contract), or with format "bids" DIR/<site>/ as a BIDS
dataset (`write_site_bids`, docs/bids.md: the same subjects and images, NIfTI
only); DIR/cohort.json and a printed summary with the effect sizes measured on
the written files.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import queue
import re
import shutil
import string
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from cmvim import __version__
from cmvim.data.cache import cache_root
from cmvim.progress import progress_bar
from cmvim.run_config import RunConfig
from cmvim.tables import format_table

from .anatomy import FOV_MM, Anatomy, load_anatomy
from .dicom_export import write_dicom_series
from .measure import image_features
from .reports import write_report
from .scanner import ScannerProfile, scanner_profile, scanner_scans

CLASSES = ("CN", "MCI", "AD")
POSES_FILE = "poses.json"        # per site, per T1 path: template -> scan transforms (the known answers)

# Effect sizes at severity 1 (a typical AD subject); MCI subjects sit around 0.45.
# Sources in docs/cohort.md.
EFFECTS = {
    "hippocampus": 0.24,        # fractional GM loss; AD vs CN hippocampal volume -20..-25 %
    "entorhinal": 0.26,
    "temporoparietal": 0.10,    # cortical thinning
    "pcc_precuneus": 0.07,
    "ventricles": 1.0,          # growth of the template ventricle map (measured ROI change is smaller: docs)
    "pet_pcc_precuneus": 0.20,  # FDG hypometabolism, AD vs CN -15..-20 %
    "pet_temporoparietal": 0.17,
    "pet_hippocampus": 0.10,
}
# AD subtypes (issue #32's regime where no fixed region separates the classes): how hard each region
# is hit, relative to EFFECTS, per subtype. Atrophy subtypes of Murray et al. 2011 (Lancet Neurol,
# neuropathology) and Ferreira et al. 2020 (Neurology, meta-analysis: typical 55 %, limbic-predominant
# 21 %, hippocampal-sparing 17 %, minimal atrophy 15 %); FDG hypometabolism follows the atrophy
# (Whitwell et al. 2015, Levin et al. 2021). Minimal-atrophy is left out; the shares renormalised.
SUBTYPES = {
    "typical": {},
    "limbic": {"hippocampus": 1.5, "entorhinal": 1.5, "temporoparietal": 0.3, "pcc_precuneus": 0.3,
               "pet_hippocampus": 1.5, "pet_pcc_precuneus": 0.4, "pet_temporoparietal": 0.4},
    "hippocampal_sparing": {"hippocampus": 0.2, "entorhinal": 0.3, "temporoparietal": 1.6, "pcc_precuneus": 1.6,
                            "pet_hippocampus": 0.3, "pet_pcc_precuneus": 1.5, "pet_temporoparietal": 1.5},
}
SUBTYPE_SHARES = {"typical": 0.59, "limbic": 0.23, "hippocampal_sparing": 0.18}
# disease progression between visits, in severity per year beyond ageing: hippocampal atrophy of
# ~4.7 %/year in AD, ~3.0 % in MCI, ~1.4 % in controls (Barnes et al. 2009, Neurobiol Aging,
# meta-analysis); the excess over controls at EFFECTS["hippocampus"] = 0.24 per unit severity
PROGRESSION_PER_YEAR = {"CN": 0.0, "MCI": 0.07, "AD": 0.14}
PET_COUNTS = 200.0               # counts per unit uptake: the PET's Poisson (count-like) noise
AGE_GM_LOSS_PER_YEAR = 0.0025    # ~0.25 %/year cortical GM loss in ageing
AGE_VENTRICLE_PER_YEAR = 0.03    # ~3 %/year ventricular growth in ageing


@dataclass
class SiteProfile:
    """How one site's scanners and population differ."""
    name: str
    prevalence: tuple[float, float, float]     # CN, MCI, AD
    unlabeled: float
    pet_missing: float
    intensity_scale: float
    bias_strength: float
    noise: float
    slice_blur_mm: float                       # extra blur along the slice axis (thick slices)
    pet_fwhm_mm: float
    pet_scale: float
    dicom: bool
    scanner: ScannerProfile | None = None      # its scanners' grids, in a scanner-space cohort


@dataclass
class CohortConfig:
    sites: int = 3
    subjects: int = 40                  # per site
    shape: int = 64
    seed: int = 0
    pet_missing: float = 0.15           # mean fraction of subjects without PET
    unlabeled: float = 0.2              # mean fraction without a label (pretraining only)
    report_informativeness: float = 0.6
    name_diagnosis: bool = False        # reports never name the diagnosis unless asked
    effect_scale: float = 1.0           # >1: an easier cohort (tests), <1: harder
    subtypes: bool = False              # AD and MCI subjects get an AD subtype (SUBTYPES); False: all typical
    visits: int = 1                     # visits per subject, a year apart, the disease progressing between them
    dicom_sites: tuple[str, ...] | None = None   # None: every third site from the second (B, E, ...)
    format: Literal["manifest", "bids"] = "manifest"   # bids: BIDS datasets, NIfTI only (no DICOM sites)
    # template: scans in MNI space, brain only (research-ready); scanner: the same subjects as scanners
    # write them (skull, posed heads, PET apart from its T1, scanner grids: cmvim.simulations.scanner)
    space: Literal["template", "scanner"] = "template"

    def __post_init__(self):
        if self.space not in ("template", "scanner"):
            raise ValueError(f"space must be 'template' or 'scanner', got {self.space!r}")
        if self.format not in ("manifest", "bids"):
            raise ValueError(f"format must be 'manifest' or 'bids', got {self.format!r}")
        if self.sites < 1 or self.sites > 26:
            raise ValueError("sites must be between 1 and 26")
        if self.subjects < 2:
            raise ValueError("subjects per site must be at least 2")
        if self.shape < 16 or self.shape > 256:
            raise ValueError("shape must be between 16 and 256")
        if self.visits < 1 or self.visits > 10:
            raise ValueError("visits must be between 1 and 10")
        if self.visits > 1 and self.format == "bids":
            raise ValueError("several visits are written as manifest.csv with a visit column; BIDS sessions are "
                             "not written yet: use format 'manifest'")


def site_profiles(cfg: CohortConfig, rng: np.random.Generator) -> list[SiteProfile]:
    names = list(string.ascii_uppercase[:cfg.sites])
    dicom = set(cfg.dicom_sites) if cfg.dicom_sites is not None else set(names[1::3])
    profiles = []
    for i, name in enumerate(names):
        # non-IID labels: a memory clinic (AD-rich), a population study (CN-rich), ...
        base = [(0.5, 0.25, 0.25), (0.3, 0.3, 0.4), (0.6, 0.25, 0.15), (0.35, 0.4, 0.25)][i % 4]
        prevalence = tuple(rng.dirichlet(np.array(base) * 40))
        profiles.append(SiteProfile(
            name=name, prevalence=prevalence,
            unlabeled=float(np.clip(rng.normal(cfg.unlabeled, 0.08), 0, 0.6)),
            pet_missing=float(np.clip(rng.normal(cfg.pet_missing, 0.08), 0, 0.8)),
            intensity_scale=float(rng.uniform(400, 1500)),
            bias_strength=float(rng.uniform(0.03, 0.15)),
            noise=float(rng.uniform(0.01, 0.05)),
            slice_blur_mm=float(rng.choice([0.0, 0.0, 2.0, 4.0])),
            pet_fwhm_mm=float(rng.uniform(6.0, 8.0)),
            pet_scale=float(rng.uniform(0.7, 1.4)),
            dicom=name in dicom and cfg.format == "manifest",
            # from a generator of its own: a scanner-space cohort draws the same sites as a template one
            scanner=scanner_profile(cfg.seed, name, FOV_MM / cfg.shape) if cfg.space == "scanner" else None))
    return profiles


@dataclass
class Subject:
    subject_id: str
    label: str
    age: float
    sex: str
    severity: float
    has_pet: bool
    labeled: bool
    subtype: str = "typical"             # SUBTYPES; CN subjects stay "typical" (no disease effects to shape)


# -- image synthesis ---------------------------------------------------------------------------

def _torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def smooth_field(rng: np.random.Generator, shape: int | tuple[int, int, int], coarse: int, channels: int
                 ) -> torch.Tensor:
    """A smooth random field (channels, *shape) ~ N(0, 1) at low spatial frequency (an int shape: a cube)."""
    size = (shape,) * 3 if isinstance(shape, int) else tuple(shape)
    noise = torch.from_numpy(rng.standard_normal((1, channels, coarse, coarse, coarse)).astype(np.float32))
    return F.interpolate(noise, size=size, mode="trilinear", align_corners=True)[0]


def gaussian_blur(volume: torch.Tensor, sigmas_vox: tuple[float, float, float]) -> torch.Tensor:
    """Separable Gaussian blur of a (S, S, S) volume, sigma per axis in voxels."""
    out = volume[None, None]
    for axis, sigma in enumerate(sigmas_vox):
        if sigma < 0.3:
            continue
        radius = int(math.ceil(3 * sigma))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
        kernel = (kernel / kernel.sum()).reshape([1, 1] + [len(x) if a == axis else 1 for a in range(3)])
        pad = [0, 0] * 3
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel)
    return out[0, 0]


def warp(maps: torch.Tensor, rng: np.random.Generator, scale: float, deform_mm: float, anatomy: Anatomy
         ) -> tuple[torch.Tensor, np.ndarray]:
    """Apply one smooth random deformation + head-size scaling + small pose change to (C, S, S, S) maps.

    Returns the warped maps and the affine part of the warp as a 4x4 matrix in template world mm:
    where a template point lands in the subject (the smooth deformation, a mean-zero ~1.5 mm
    displacement, is not in it). Scanner-space cohorts compose their poses with it (`scanner`)."""
    shape = anatomy.shape
    angles = np.deg2rad(rng.uniform(-2, 2, 3))          # residual registration error: volumes are in MNI space
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot = (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
           @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))
    theta = torch.zeros(1, 3, 4)
    theta[0, :, :3] = torch.from_numpy(rot / scale).float()
    theta[0, :, 3] = torch.from_numpy(rng.uniform(-2, 2, 3) / (anatomy.voxel_mm * shape / 2)).float()
    grid = F.affine_grid(theta, [1, maps.shape[0], shape, shape, shape], align_corners=True)
    displacement = smooth_field(rng, shape, 5, 3).permute(1, 2, 3, 0) * (deform_mm / (anatomy.voxel_mm * shape / 2))
    grid = grid + displacement[None]
    warped = F.grid_sample(maps[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    # theta acts on normalised (k, j, i) coordinates (grid_sample's x is the last axis): in world
    # (x, y, z) mm about the grid centre c, a subject point x shows the template at
    # c + M (x - c) + d; so a template point y lands at c + M^-1 (y - c - d)
    flip = np.eye(3)[::-1]
    half = anatomy.voxel_mm * (shape - 1) / 2
    m = flip @ theta[0, :, :3].double().numpy() @ flip
    d = half * flip @ theta[0, :, 3].double().numpy()
    centre = anatomy.affine[:3, :3] @ np.full(3, (shape - 1) / 2) + anatomy.affine[:3, 3]
    template_to_subject = np.eye(4)
    template_to_subject[:3, :3] = np.linalg.inv(m)
    template_to_subject[:3, 3] = centre - np.linalg.inv(m) @ (centre + d)
    return warped, template_to_subject


def scale_about_centroid(volume: torch.Tensor, factor: float, anatomy: Anatomy) -> torch.Tensor:
    """Grow each hemisphere's part of a structure (the lateral ventricles) by `factor` in volume,
    about that part's own centroid."""
    shape = anatomy.shape
    coords = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, shape)] * 3, indexing="ij"), dim=-1)
    out = torch.zeros_like(volume)
    for side in (coords[..., 0] < 0, coords[..., 0] >= 0):          # axis 0 is left-right (RAS)
        part = volume * side
        if float(part.sum()) == 0:
            continue
        centroid = (coords * part[..., None]).sum((0, 1, 2)) / part.sum()
        grid = (centroid + (coords - centroid) / factor ** (1 / 3)).flip(-1)   # (x, y, z) for grid_sample
        out = torch.maximum(out, F.grid_sample(part[None, None], grid[None], mode="bilinear",
                                               align_corners=True)[0, 0])
    return out


@dataclass
class SubjectImages:
    """One subject's scans on the anatomy grid (template space, scanner-like units), and the
    ingredients a scanner-space writer poses (`cmvim.simulations.scanner`)."""
    t1: np.ndarray
    pet: np.ndarray | None
    t1_tissue: torch.Tensor              # T1 contrast alone: before slice blur, bias field and noise
    pet_uptake: torch.Tensor | None      # uptake blurred to the site's PET resolution, before counts and scale
    pet_gain: float                      # counts -> the written PET's units
    pet_counts: float                    # counts per unit of uptake (the Poisson noise's level)
    brain: torch.Tensor                  # the subject's brain (the warped template head mask)
    template_to_subject: np.ndarray      # 4x4, template mm -> this subject's anatomy (affine part of its warp)


def synthesize(subject: Subject, site: SiteProfile, anatomy: Anatomy, rng: np.random.Generator,
               effect_scale: float) -> SubjectImages:
    """The subject's T1 and PET (None without one) on the anatomy grid, in scanner-like units."""
    s = subject.severity * effect_scale
    age = subject.age - 70.0
    regions = {k: _torch(v) for k, v in anatomy.regions.items()}
    gm, wm = _torch(anatomy.gm), _torch(anatomy.wm)
    head = _torch(anatomy.brain)

    # atrophy: lost grey matter becomes CSF
    loss = AGE_GM_LOSS_PER_YEAR * max(age, -10) + 0.02 * rng.standard_normal()
    loss = torch.full_like(gm, loss) + 0.03 * smooth_field(rng, anatomy.shape, 4, 1)[0]
    weight = SUBTYPES[subject.subtype]
    for region in ("hippocampus", "entorhinal", "temporoparietal", "pcc_precuneus"):
        individual = 1 + 0.25 * rng.standard_normal()           # regions vary within a subject
        loss = loss + regions[region] * EFFECTS[region] * weight.get(region, 1.0) * s * individual
    natural_hippocampus = 0.08 * rng.standard_normal()           # ~8 % inter-subject SD, unrelated to disease
    loss = loss + regions["hippocampus"] * natural_hippocampus
    gm = gm * (1 - loss.clamp(-0.2, 0.8))
    # ventricles grow with age and disease
    factor = max(0.5, 1 + EFFECTS["ventricles"] * s + AGE_VENTRICLE_PER_YEAR * age + 0.15 * rng.standard_normal())
    template_ventricles = _torch(anatomy.ventricles)
    grown = scale_about_centroid(template_ventricles, factor, anatomy).clamp(0, 1)
    # the CSF gained (or lost, when they shrink) where the grown ventricles differ from the template's,
    # taken from the surrounding tissue in proportion
    tissue = (gm + wm).clamp(min=1e-6)
    gained = torch.minimum((grown - template_ventricles), tissue)
    gm, wm = gm - gained * gm / tissue, wm - gained * wm / tissue
    gm, wm = gm.clamp(0, 1) * head, wm.clamp(0, 1) * head
    csf = (head - gm - wm).clamp(0, 1)

    # one deformation for every map of this subject
    # after affine registration to MNI, head size differences are mostly normalised away
    head_scale = (1.02 if subject.sex == "M" else 0.99) * (1 + 0.02 * rng.standard_normal())
    outside = _torch(anatomy.t1) * (1 - head)
    pet_regions = ("pcc_precuneus", "temporoparietal", "hippocampus")
    maps, template_to_subject = warp(torch.stack([gm, wm, csf, outside, head] + [regions[r] for r in pet_regions]),
                                     rng, head_scale, 1.5, anatomy)
    gm, wm, csf, outside, head = maps[:5]
    warped_regions = dict(zip(pet_regions, maps[5:]))

    # T1: tissue contrast (WM bright, GM grey, CSF dark) and a subject's own contrast
    contrast = np.array([1.0, 0.62, 0.2]) * (1 + 0.03 * rng.standard_normal(3))
    tissue = contrast[0] * wm + contrast[1] * gm + contrast[2] * csf + 0.8 * outside
    sigma_vox = site.slice_blur_mm / 2.355 / anatomy.voxel_mm
    t1 = gaussian_blur(tissue, (0.0, 0.0, sigma_vox))
    bias = torch.exp(site.bias_strength * smooth_field(rng, anatomy.shape, 3, 1)[0])
    t1 = t1 * bias * site.intensity_scale
    noise = site.noise * site.intensity_scale
    t1 = torch.sqrt((t1 + noise * torch.from_numpy(rng.standard_normal(t1.shape).astype(np.float32))) ** 2
                    + (noise * torch.from_numpy(rng.standard_normal(t1.shape).astype(np.float32))) ** 2)  # Rician

    images = SubjectImages(t1=t1.numpy(), pet=None, t1_tissue=tissue, pet_uptake=None, pet_gain=0.0,
                           pet_counts=PET_COUNTS, brain=head, template_to_subject=template_to_subject)
    if not subject.has_pet:
        return images
    # FDG PET: uptake GM > WM > CSF, times the hypometabolism pattern
    uptake = 1.0 * gm + 0.3 * wm + 0.05 * csf
    hypo = torch.zeros_like(uptake) + 0.003 * max(age, 0)
    for region, effect in (("pcc_precuneus", "pet_pcc_precuneus"), ("temporoparietal", "pet_temporoparietal"),
                           ("hippocampus", "pet_hippocampus")):
        hypo = hypo + warped_regions[region] * EFFECTS[effect] * weight.get(effect, 1.0) * s * (
            1 + 0.2 * rng.standard_normal())
    uptake = uptake * (1 - hypo.clamp(0, 0.6))
    blurred = gaussian_blur(uptake, (site.pet_fwhm_mm / 2.355 / anatomy.voxel_mm,) * 3)
    pet = torch.poisson(blurred.clamp(min=0) * PET_COUNTS,
                        generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
    jitter = 1 + 0.1 * rng.standard_normal()
    images.pet = (pet / PET_COUNTS * site.pet_scale * jitter * 5000).numpy()      # this order: cohorts stay bit-equal
    images.pet_uptake, images.pet_gain = blurred, site.pet_scale * jitter * 5000 / PET_COUNTS
    return images


# -- subjects, sites, writing ------------------------------------------------------------------

def draw_subjects(site: SiteProfile, n: int, rng: np.random.Generator) -> list[Subject]:
    labels = rng.choice(CLASSES, size=n, p=np.array(site.prevalence) / sum(site.prevalence))
    subjects = []
    for i, label in enumerate(labels):
        mean_age = {"CN": 71.0, "MCI": 73.0, "AD": 75.0}[label]
        severity = {"CN": abs(rng.normal(0, 0.12)), "MCI": rng.normal(0.45, 0.2), "AD": rng.normal(1.0, 0.3)}[label]
        subjects.append(Subject(
            subject_id=f"{site.name}{rng.integers(100000, 999999)}-{i:03d}", label=str(label),
            age=float(np.clip(rng.normal(mean_age, 6.5), 55, 92)), sex=str(rng.choice(["F", "M"])),
            severity=float(max(severity, 0.0)), has_pet=bool(rng.random() >= site.pet_missing),
            labeled=bool(rng.random() >= site.unlabeled)))
    return subjects


def assign_subtypes(subjects: list[Subject], rng: np.random.Generator) -> list[Subject]:
    """AD and MCI subjects drawn a subtype by SUBTYPE_SHARES (from a generator of its own, so a
    cohort with subtypes holds the same subjects as one without)."""
    names = list(SUBTYPE_SHARES)
    shares = np.array([SUBTYPE_SHARES[n] for n in names])
    drawn = rng.choice(names, size=len(subjects), p=shares / shares.sum())
    return [replace(s, subtype=str(d)) if s.label != "CN" else s for s, d in zip(subjects, drawn)]


def at_visit(subject: Subject, years: float) -> Subject:
    """The subject `years` after the first visit: older, the disease progressed (PROGRESSION_PER_YEAR)."""
    return replace(subject, age=subject.age + years,
                   severity=subject.severity + PROGRESSION_PER_YEAR[subject.label] * years)


def _write_scan(folder: Path, stem: str, volume: np.ndarray, affine: np.ndarray, modality: str, dicom: bool,
                subject_id: str) -> str:
    """One scan as a DICOM series folder (a PACS export) or a NIfTI file in `folder`; returns its name there."""
    if dicom:
        name = "t1_dicom" if modality == "MR" else "pet_dicom"
        write_dicom_series(folder / name, volume, affine, modality, subject_id)
    else:
        name = f"{stem}.nii.gz"
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), str(folder / name))
    return name


@dataclass
class Scans:
    """A subject's scans as written: arrays, their affines, and where each puts the template
    (4x4, template mm -> the scan's world mm: the known answer a registration is scored on)."""
    t1: np.ndarray
    t1_affine: np.ndarray
    pet: np.ndarray | None
    pet_affine: np.ndarray | None
    template_to_mri: np.ndarray
    template_to_pet: np.ndarray | None
    features: dict | None                # scanner space: disease measures of the template-space images

    def truth(self) -> dict:
        return {"template_to_mri": self.template_to_mri.tolist(),
                "template_to_pet": None if self.template_to_pet is None else self.template_to_pet.tolist()}


def subject_scans(subject: Subject, index: int, site: SiteProfile, anatomy: Anatomy, rng: np.random.Generator,
                  cfg: CohortConfig) -> Scans:
    """Synthesise one subject and place it in the cohort's space. Scanner space draws from a
    generator of its own (seed, site, subject): both spaces hold the same subjects."""
    images = synthesize(subject, site, anatomy, rng, cfg.effect_scale)
    if cfg.space == "template":
        subject_to_world = images.template_to_subject
        return Scans(images.t1, anatomy.affine, images.pet, None if images.pet is None else anatomy.affine,
                     subject_to_world, None if images.pet is None else subject_to_world, None)
    # the written scans are not in template space: the disease measures come from the images they are posed from
    features = image_features(images.t1, images.pet, anatomy)
    scans = scanner_scans(images, anatomy, site.scanner, site,
                          np.random.default_rng([cfg.seed, ord(site.name), index, 0x5CA]))
    return Scans(scans.t1, scans.t1_affine, scans.pet, scans.pet_affine, scans.template_to_mri,
                 scans.template_to_pet, features)


def write_site(site_dir: Path, site: SiteProfile, subjects: list[Subject], anatomy: Anatomy,
               rng: np.random.Generator, cfg: CohortConfig, on_subject: Callable[[], None] | None = None
               ) -> list[dict]:
    """The site as manifest.csv + files. With cfg.visits > 1 every subject has that many visits a
    year apart (a `visit` column, files under subjects/<id>/visit-<k>/): the same anatomy, posed and
    scanned alike (one generator per subject, drawn afresh for each visit), older and with the
    disease progressed (`at_visit`); the diagnosis is the first visit's."""
    site_dir.mkdir(parents=True, exist_ok=True)
    several = cfg.visits > 1
    rows = ["subject_id," + ("visit," if several else "") + "mri,pet,report,label,age,sex"]
    truth = []
    for index, subject in enumerate(subjects):
        for visit in range(cfg.visits):
            this = at_visit(subject, float(visit)) if several else subject
            visit_rng = np.random.default_rng([cfg.seed, ord(site.name), index, 0x715]) if several else rng
            scans = subject_scans(this, index, site, anatomy, visit_rng, cfg)
            pet = scans.pet
            relative = f"subjects/{subject.subject_id}" + (f"/visit-{visit + 1}" if several else "")
            folder = site_dir / relative
            folder.mkdir(parents=True, exist_ok=True)
            mri = f"{relative}/{_write_scan(folder, 't1', scans.t1, scans.t1_affine, 'MR', site.dicom, subject.subject_id)}"
            pet_path = "" if pet is None else f"{relative}/" + _write_scan(
                folder, "fdg_pet", pet, scans.pet_affine, "PT", site.dicom, subject.subject_id)
            report_rng = np.random.default_rng([cfg.seed, ord(site.name), index, visit, 0x7E9]) if several else rng
            report = write_report(report_rng, this.severity * cfg.effect_scale, pet is not None, subject.label,
                                  cfg.report_informativeness, cfg.name_diagnosis)
            (folder / "report.txt").write_text(report + "\n", encoding="utf-8")
            label = subject.label if subject.labeled else ""
            rows.append(f"{subject.subject_id}," + (f"{visit + 1}," if several else "")
                        + f"{mri},{pet_path},{relative}/report.txt,{label},{this.age:.0f},{subject.sex}")
            truth.append({**asdict(this), "visit": visit + 1, "mri": mri, "pet": pet_path, **scans.truth(),
                          "features": scans.features})
        if on_subject:
            on_subject()
    (site_dir / "manifest.csv").write_text("\n".join(rows) + "\n")
    return truth


def bids_participant(subject_id: str) -> str:
    """A BIDS participant_id: labels are alphanumeric, so the generator's A123456-007 is sub-A123456007."""
    return "sub-" + re.sub(r"[^A-Za-z0-9]", "", subject_id)


def write_site_bids(site_dir: Path, site: SiteProfile, subjects: list[Subject], anatomy: Anatomy,
                    rng: np.random.Generator, cfg: CohortConfig, on_subject: Callable[[], None] | None = None
                    ) -> list[dict]:
    """The site as a BIDS dataset (cmvim.data.bids reads it): the same subjects, images and reports
    `write_site` writes from the same generator. The generator makes one visit per subject, so
    there are no sessions; the split column is n/a throughout (the run's seeded rule splits, as
    for the manifest cohort, whose manifest has no split column). The dataset passes the official
    bids-validator (tests/test_bids_validator.py): each PET has the sidecar the BIDS PET
    specification requires (`pet_sidecar`), every image its spatial and time units."""
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / "dataset_description.json").write_text(json.dumps({
        "Name": f"cmvim synthetic cohort, site {site.name}", "BIDSVersion": "1.10.0", "DatasetType": "raw",
        "Authors": ["cmvim-cohort (synthetic data, no real person)"], "License": "CC0",
        "GeneratedBy": [{"Name": "cmvim-cohort", "Version": __version__}]}, indent=2) + "\n")
    (site_dir / ".bidsignore").write_text("*_report.txt\n")         # reports are cmvim's, not BIDS files
    (site_dir / "README").write_text(
        f"Synthetic cohort, site {site.name}, written by cmvim-cohort {__version__} (simulations/cohort.py).\n"
        "No real person: T1 MRI and FDG PET are drawn from a template anatomy with simulated atrophy and\n"
        "hypometabolism. sub-*/sub-*_report.txt are synthetic radiology reports (not BIDS files: .bidsignore).\n")
    (site_dir / "participants.json").write_text(json.dumps(PARTICIPANTS_COLUMNS, indent=2) + "\n")
    rows = ["participant_id\tage\tsex\tdiagnosis\tsplit"]
    truth = []
    for index, subject in enumerate(subjects):
        scans = subject_scans(subject, index, site, anatomy, rng, cfg)
        pet = scans.pet
        participant = bids_participant(subject.subject_id)
        mri = f"{participant}/anat/{participant}_T1w.nii.gz"
        pet_path = "" if pet is None else f"{participant}/pet/{participant}_trc-FDG_pet.nii.gz"
        for relative, volume, affine in ((mri, scans.t1, scans.t1_affine), (pet_path, pet, scans.pet_affine)):
            if volume is not None:
                (site_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                image = nib.Nifti1Image(volume.astype(np.float32), affine)
                image.header.set_xyzt_units("mm", "sec")
                nib.save(image, str(site_dir / relative))
        if pet is not None:
            (site_dir / pet_path.replace(".nii.gz", ".json")).write_text(json.dumps(pet_sidecar(site), indent=2) + "\n")
        report = write_report(rng, subject.severity * cfg.effect_scale, pet is not None, subject.label,
                              cfg.report_informativeness, cfg.name_diagnosis)
        (site_dir / participant / f"{participant}_report.txt").write_text(report + "\n", encoding="utf-8")
        label = subject.label if subject.labeled else "n/a"
        rows.append(f"{participant}\t{subject.age:.0f}\t{subject.sex}\t{label}\tn/a")
        truth.append({**asdict(subject), "mri": mri, "pet": pet_path, **scans.truth(), "features": scans.features})
        if on_subject:
            on_subject()
    (site_dir / "participants.tsv").write_text("\n".join(rows) + "\n")
    return truth


# participants.tsv's columns described (BIDS: participants.json), so readers need not guess
PARTICIPANTS_COLUMNS = {
    "age": {"Description": "age at the visit", "Units": "year"},
    "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
    "diagnosis": {"Description": "clinical diagnosis (cmvim reads it: bids.label_column)",
                  "Levels": {"CN": "cognitively normal", "MCI": "mild cognitive impairment",
                             "AD": "Alzheimer's disease dementia"}},
    "split": {"Description": "the run's split for this participant; n/a: the run's seeded rule decides",
              "Levels": {"train": "training", "val": "validation", "test": "test"}},
}


def pet_sidecar(site: SiteProfile) -> dict:
    """A static FDG brain PET's _pet.json, with every field the BIDS PET specification requires:
    one 30-60 min frame after a bolus at TimeZero (EANM's static FDG window, as ADNI acquires it),
    decay-corrected to the injection, in Bq/mL; the reconstruction's filter is the site's PET FWHM."""
    return {
        "Manufacturer": "cmvim-cohort", "ManufacturersModelName": f"synthetic PET, site {site.name}",
        "InstitutionName": f"synthetic site {site.name}", "BodyPart": "Brain", "Units": "Bq/mL",
        "TracerName": "FDG", "TracerRadionuclide": "F18", "ModeOfAdministration": "bolus",
        "InjectedRadioactivity": 185.0, "InjectedRadioactivityUnits": "MBq",
        "InjectedMass": "n/a", "InjectedMassUnits": "n/a",
        "SpecificRadioactivity": "n/a", "SpecificRadioactivityUnits": "n/a",
        "TimeZero": "09:00:00", "InjectionStart": 0, "ScanStart": 1800,
        "FrameTimesStart": [1800], "FrameDuration": [1800], "AcquisitionMode": "list mode",
        "ImageDecayCorrected": True, "ImageDecayCorrectionTime": 0,
        "ReconMethodName": "OSEM", "ReconMethodParameterLabels": ["subsets", "iterations"],
        "ReconMethodParameterUnits": ["none", "none"], "ReconMethodParameterValues": [21, 3],
        "ReconFilterType": "Gaussian", "ReconFilterSize": round(float(site.pet_fwhm_mm), 2),
        "AttenuationCorrection": "CT-based",
    }


@dataclass
class CohortSummary:
    out_dir: Path
    config: CohortConfig
    sites: list[SiteProfile]
    counts: dict[str, dict]
    effects: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> str:
        rows = []
        for site in self.sites:
            c = self.counts[site.name]
            form = "BIDS" if self.config.format == "bids" else "DICOM" if site.dicom else "NIfTI"
            rows.append([site.name, c["subjects"], c["CN"], c["MCI"], c["AD"], c["unlabeled"], c["with_pet"],
                         form, f"{site.intensity_scale:.0f}",
                         f"{site.bias_strength:.2f}", f"{site.noise:.3f}", f"{site.slice_blur_mm:.0f}",
                         f"{site.pet_fwhm_mm:.1f}"])
        return format_table(["site", "n", "CN", "MCI", "AD", "unlabeled", "PET", "format", "T1 scale",
                             "bias", "noise", "slice blur mm", "PET FWHM mm"], rows)


# each subject written: set by generate_cohort while its progress bar draws (forked workers inherit it)
_on_subject: Callable[[], None] | None = None


def _build_site(job) -> tuple[str, dict, list[dict], dict]:
    """One site, in a worker process: draw, synthesise and write its subjects, then measure the
    files. Returns (site, counts, measures per subject, poses per T1 path)."""
    cfg, site, out_dir, measure = job
    torch.set_num_threads(1)                     # one site per core
    anatomy = load_anatomy(cfg.shape)
    site_rng = np.random.default_rng([cfg.seed, ord(site.name)])
    subjects = draw_subjects(site, cfg.subjects, site_rng)
    if cfg.subtypes:
        subjects = assign_subtypes(subjects, np.random.default_rng([cfg.seed, ord(site.name), 0x5B7]))
    writer = write_site_bids if cfg.format == "bids" else write_site
    truth = writer(out_dir / site.name, site, subjects, anatomy, site_rng, cfg, _on_subject)
    counts = {"subjects": len(subjects), "with_pet": sum(s.has_pet for s in subjects),
              "unlabeled": sum(not s.labeled for s in subjects),
              **{c: sum(s.label == c and s.labeled for s in subjects) for c in CLASSES}}
    features = []
    if measure:
        from .measure import subject_features
        features = [{"site": site.name, "label": r["label"], "subtype": r["subtype"],
                     **(r["features"] or subject_features(out_dir / site.name, r, anatomy))} for r in truth]
    poses = {r["mri"]: {"template_to_mri": r["template_to_mri"], "pet": r["pet"] or None,
                        "template_to_pet": r["template_to_pet"]} for r in truth}
    return site.name, counts, features, poses


def generate_cohort(out_dir: str | Path, cfg: CohortConfig | None = None, measure: bool = True,
                    workers: int | None = None) -> CohortSummary:
    """Write the cohort under out_dir; sites are built in parallel worker processes."""
    cfg = cfg or CohortConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    load_anatomy(cfg.shape)                      # once, before forking: workers inherit it
    profiles = site_profiles(cfg, np.random.default_rng(cfg.seed))
    jobs = [(cfg, site, out_dir, measure) for site in profiles]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    with progress_bar(cfg.sites * cfg.subjects, "writing the cohort", "subject") as bar:
        results = _build_sites(jobs, workers, bar)
    counts = {name: c for name, c, _, _ in results}
    summary = CohortSummary(out_dir, cfg, profiles, counts)
    if measure:
        from .measure import summarize_effects
        summary.effects = summarize_effects([row for _, _, rows, _ in results for row in rows])
    # the known answers: where each scan puts the template (what benchmarks/registration.py scores)
    (out_dir / POSES_FILE).write_text(json.dumps({name: poses for name, _, _, poses in results}) + "\n")
    summary.seconds = time.perf_counter() - start
    (out_dir / "cohort.json").write_text(json.dumps({
        "config": asdict(cfg), "sites": [asdict(p) for p in profiles], "counts": counts,
        "effects": summary.effects, "seconds": summary.seconds}, indent=2, default=list))
    return summary


def _build_sites(jobs: list, workers: int, bar) -> list:
    """Every site's (name, counts, features), built in `workers` forked processes; each subject
    written moves the bar (workers report through a queue, only while a bar draws)."""
    global _on_subject
    try:
        if workers <= 1:
            _on_subject = None if bar.disable else (lambda: bar.update(1))
            return [_build_site(job) for job in jobs]
        context = multiprocessing.get_context("fork")
        written = None if bar.disable else context.Queue()
        _on_subject = None if written is None else (lambda: written.put(1))
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_build_site, job) for job in jobs]
            while written is not None and not all(f.done() for f in futures):
                try:
                    bar.update(written.get(timeout=0.2))
                except queue.Empty:
                    pass
            results = [f.result() for f in futures]
            if written is not None:
                bar.update(bar.total - bar.n)    # a worker's last put may land after its future is done
            return results
    finally:
        _on_subject = None


def cohort_cache_root() -> Path:
    """Cohorts are cached beside the sites' preprocessed scans: $CMVIM_CACHE, else ~/.cache/cmvim."""
    return cache_root()


def cached_cohort(cfg: CohortConfig, root: Path | None = None) -> Path:
    """The cohort for `cfg`, generated on first use and reused after (keyed by the config)."""
    spec = asdict(cfg)
    for key, first in (("format", "manifest"), ("space", "template"), ("subtypes", False), ("visits", 1)):
        if spec[key] == first:
            del spec[key]                   # keys of cohorts cached before there was a choice stay valid
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()[:12]
    target = (root or cohort_cache_root()) / "cohorts" / f"cohort-{key}"
    if (target / "cohort.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        generate_cohort(staging, cfg)
        try:
            staging.rename(target)
        except OSError:                     # another process finished first: use theirs
            if not (target / "cohort.json").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def prepare_cohort(cfg: RunConfig) -> RunConfig:
    """A run config without a cohort path is a simulation on the synthetic cohort its `cohort`
    section describes: build it (or reuse the cached one) and point the config at it."""
    if cfg.cohort.path:
        return cfg
    spec = cfg.cohort
    cfg.cohort.path = str(cached_cohort(CohortConfig(sites=spec.sites, subjects=spec.subjects, shape=spec.shape,
                                                     seed=spec.seed, effect_scale=spec.effect_scale,
                                                     space=spec.space, subtypes=spec.subtypes,
                                                     visits=spec.visits)))
    return cfg
