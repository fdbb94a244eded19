"""A volume on a grid in world space, and trilinear resampling from one grid onto another: what
both spatial pipelines (`preprocess`, `registration`) stand on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Volume:
    data: np.ndarray          # float32, 3D
    affine: np.ndarray        # 4x4 voxel -> world (RAS+ mm)

    @property
    def voxel_size(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


def world_bounds(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box (min corner, max corner) of a volume's voxel centres."""
    shape = np.array(vol.data.shape) - 1
    corners = np.array([[i, j, k] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])], float)
    world = nib.affines.apply_affine(vol.affine, corners)
    return world.min(axis=0), world.max(axis=0)


def resample(vol: Volume, target_affine: np.ndarray, target_shape: Sequence[int]) -> Volume:
    """Trilinear resampling of `vol` onto a target grid (zeros outside the source)."""
    to_source = np.linalg.inv(vol.affine) @ target_affine               # target voxel -> source voxel
    axes = [torch.arange(n, dtype=torch.float64) for n in target_shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)    # (X, Y, Z, 3) target indices
    src = grid @ torch.from_numpy(to_source[:3, :3]).T + torch.from_numpy(to_source[:3, 3])
    size = torch.tensor(vol.data.shape, dtype=torch.float64)
    normalised = (2 * src / (size - 1).clamp(min=1) - 1).flip(-1)       # grid_sample wants (z, y, x) order
    data = torch.from_numpy(np.ascontiguousarray(vol.data, dtype=np.float32))[None, None]
    out = F.grid_sample(data, normalised[None].float(), mode="bilinear", padding_mode="zeros", align_corners=True)
    return Volume(out[0, 0].numpy(), np.asarray(target_affine, dtype=np.float64))
