"""First pass (decode + preprocess + write cache) vs cached reads of a site, in volumes/s.

Writes a temporary site of N subjects with scanner-sized volumes (T1 at 1 mm,
176x208x176, gzipped NIfTI; PET at 2 mm, 88x104x88), then times:
  first pass   SiteData.load on a cold cache (every scan decoded and preprocessed)
  cached       SiteData.load again + reading every item of the dataset (what each
               later epoch / federated round does)
and prints the ratio.

    python benchmarks/data.py [--subjects 12] [--shape 64] [--voxel-size 3]
"""
from __future__ import annotations

import sys
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # benchmarks/ssl.py must not shadow the ssl module
import argparse
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from cmvim.data import SiteData
from cmvim.run_config import PreprocessConfig


def write_site(root: Path, subjects: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    rows = ["subject_id,mri,pet,label"]
    t1_shape, pet_shape = (176, 208, 176), (88, 104, 88)
    for i in range(subjects):
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in t1_shape], indexing="ij"))
        brain = (grid ** 2).sum(0) < 0.7
        t1 = (brain * (300 + 60 * rng.standard_normal(t1_shape))).astype(np.float32)
        t1_affine = np.diag([1.0, 1.0, 1.0, 1.0])
        t1_affine[:3, 3] = -np.array(t1_shape) / 2
        pet = t1[::2, ::2, ::2] * 0.01 + rng.random(pet_shape).astype(np.float32)
        pet_affine = np.diag([2.0, 2.0, 2.0, 1.0])
        pet_affine[:3, 3] = -np.array(t1_shape) / 2
        nib.save(nib.Nifti1Image(t1, t1_affine), str(root / f"s{i}_t1.nii.gz"))
        nib.save(nib.Nifti1Image(pet, pet_affine), str(root / f"s{i}_pet.nii.gz"))
        rows.append(f"S{i},s{i}_t1.nii.gz,s{i}_pet.nii.gz,{'CN' if i % 2 else 'AD'}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=12)
    parser.add_argument("--shape", type=int, default=64)
    parser.add_argument("--voxel-size", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PreprocessConfig(shape=args.shape, voxel_size=args.voxel_size)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        write_site(site, args.subjects)
        volumes = 2 * args.subjects

        start = time.perf_counter()
        first = SiteData.load(site, cfg)
        items = [first.dataset()[i] for i in range(len(first.records))]
        cold = time.perf_counter() - start

        warm_times = []
        for _ in range(3):
            start = time.perf_counter()
            again = SiteData.load(site, cfg)
            dataset = again.dataset()
            items = [dataset[i] for i in range(len(dataset))]
            warm_times.append(time.perf_counter() - start)
        warm = min(warm_times)
        assert again.summary.cache_hits == args.subjects and len(items) == args.subjects

    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads; "
          f"{args.subjects} subjects (T1 176x208x176 @1 mm + PET 88x104x88 @2 mm, .nii.gz) -> "
          f"{args.shape}^3 @ {args.voxel_size} mm\n")
    print("| pass | seconds | volumes/s | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| first (decode + preprocess + cache) | {cold:.2f} | {volumes / cold:.1f} | 1.0x |")
    print(f"| cached | {warm:.3f} | {volumes / warm:.1f} | {cold / warm:.0f}x |")


if __name__ == "__main__":
    main()
