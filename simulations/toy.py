"""Small synthetic tensor batches: structured enough to learn from, cheap enough for tests.

Each subject is a few smooth Gaussian blobs; its PET is a blurred, rescaled
function of the same blobs (so MRI and PET of one subject agree), and its
report names the blob count and size in words (so image and report agree).
These are tensors, not a cohort: the realistic multi-site cohorts written as
site folders live in `cmvim.simulations.cohort`.
"""
from __future__ import annotations

import torch

from cmvim.data import tokenize_reports
from cmvim.model import ModelConfig

_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def synthetic_batch(cfg: ModelConfig, batch_size: int, seed: int = 0, pet_missing: float = 0.0,
                    with_reports: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = cfg.img_size
    axis = torch.linspace(-1, 1, size)
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    mri, pet, reports = [], [], []
    for _ in range(batch_size):
        count = int(torch.randint(1, 5, (1,), generator=g))
        width = float(torch.rand(1, generator=g)) * 0.25 + 0.15
        volume = torch.zeros(size, size, size)
        uptake = torch.zeros(size, size, size)
        for _ in range(count):
            center = torch.rand(3, generator=g) * 1.2 - 0.6
            blob = torch.exp(-((zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2)
                             / (2 * width ** 2))
            volume += blob
            uptake += blob * (0.5 + float(torch.rand(1, generator=g)))
        mri.append(volume + 0.05 * torch.randn(volume.shape, generator=g))
        pet.append(uptake.sqrt() + 0.05 * torch.randn(volume.shape, generator=g))
        size_word = "large" if width > 0.27 else "small"
        reports.append(f"Study shows {_WORDS[count]} {size_word} focal regions. Findings stable.")
    batch = {"mri": torch.stack(mri)[:, None], "pet": torch.stack(pet)[:, None],
             "mri_present": torch.ones(batch_size, dtype=torch.bool),
             "pet_present": torch.rand(batch_size, generator=g) >= pet_missing}
    batch["pet"] = batch["pet"] * batch["pet_present"][:, None, None, None, None]
    if with_reports and cfg.report.enabled:
        batch["report_ids"], batch["report_present"] = tokenize_reports(reports, cfg.report.max_bytes)
    return batch
