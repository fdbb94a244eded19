"""Pretraining augmentations, applied consistently to the MRI and PET of one subject.

One random flip and one small affine move both volumes together (they are
voxel-aligned after preprocessing and must stay so); intensity jitter and
noise are drawn per modality. A missing modality stays missing (zeros).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..run_config import AugmentConfig


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Rz @ Ry @ Rx for angles (x, y, z) in radians."""
    cx, cy, cz = torch.cos(angles)
    sx, sy, sz = torch.sin(angles)
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


class PretrainAugment:
    def __init__(self, cfg: AugmentConfig | None = None):
        self.cfg = cfg or AugmentConfig()

    def __call__(self, item: dict, generator: torch.Generator) -> dict:
        cfg = self.cfg

        def uniform(n: int, bound: float) -> torch.Tensor:
            return (torch.rand(n, generator=generator) * 2 - 1) * bound

        present = {"mri": bool(item["mri_present"]), "pet": bool(item["pet_present"])}
        volumes = torch.cat([item["mri"], item["pet"]], dim=0)[None]          # (1, 2, S, S, S)
        if torch.rand(1, generator=generator).item() < cfg.flip:
            volumes = volumes.flip(2)                                          # axis 0 is left-right (RAS)
        theta = torch.zeros(1, 3, 4)
        theta[0, :, :3] = rotation_matrix(uniform(3, math.radians(cfg.rotate_deg))) * (1 + uniform(1, cfg.scale))
        theta[0, :, 3] = uniform(3, 2 * cfg.translate)
        grid = F.affine_grid(theta, list(volumes.shape), align_corners=False)
        volumes = F.grid_sample(volumes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        out = dict(item)
        for channel, modality in enumerate(("mri", "pet")):
            vol = volumes[channel:channel + 1]
            if not present[modality]:
                out[modality] = torch.zeros_like(vol)
                continue
            std = vol.std().clamp(min=1e-6)
            vol = vol * (1 + uniform(1, cfg.intensity)) + uniform(1, cfg.intensity) * std
            out[modality] = vol + torch.randn(vol.shape, generator=generator) * cfg.noise * std
        return out


class ModalityDropout:
    """Hide a subject's PET (or MRI) now and then while fine-tuning, so that a modality being
    missing carries no information about the class: in a small cohort, who lacks a PET can
    correlate with the label by chance, and a model would learn that instead of the anatomy."""

    def __init__(self, p: float = 0.3, modalities: tuple[str, ...] = ("pet",)):
        self.p, self.modalities = p, modalities

    def __call__(self, item: dict, generator: torch.Generator) -> dict:
        out = dict(item)
        for modality in self.modalities:
            if out[f"{modality}_present"] and torch.rand(1, generator=generator).item() < self.p:
                out[modality] = torch.zeros_like(out[modality])
                out[f"{modality}_present"] = False
        return out
