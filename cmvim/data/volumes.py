"""Reading one scan: `load_volume(path) -> (volume, affine)`.

`path` is a .nii / .nii.gz file or a folder holding one DICOM series. The
volume is a float32 3D array, the affine the 4x4 voxel-to-world matrix in RAS+
millimetres (nibabel's convention). Every problem is a `DataError` naming the
file and saying what is wrong; nothing is repaired silently.
"""
from __future__ import annotations

import gzip
import logging
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from .dicom import MAX_VOXELS, read_dicom_geometry, read_dicom_series
from .errors import DataError

log = logging.getLogger("cmvim.data")

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def load_volume(path: str | Path, modality: str | None = None, frame_weights: tuple[float, ...] | None = None,
                warnings: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one scan. `modality` ("mri"/"pet") decides whether 4D frames may be averaged:
    by `frame_weights` (one per frame, a BIDS sidecar's window: cmvim.data.pet), else with equal
    weights, said in `warnings` (nothing tells the early, flow-dominated frames apart)."""
    path = Path(path)
    if path.is_dir():
        volume, affine = read_dicom_series(path)
    elif is_nifti(path):
        volume, affine = _read_nifti(path, modality, frame_weights, warnings)
    elif not path.exists():
        raise DataError("file not found", file=path, kind="missing file")
    else:
        raise DataError("not a NIfTI file (.nii/.nii.gz) or a folder with a DICOM series",
                        file=path, kind="unsupported format")
    check_volume(volume, path)
    return volume, affine


def _read_nifti(path: Path, modality: str | None, frame_weights: tuple[float, ...] | None = None,
                warnings: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = nib.load(str(path))                 # the header only: no voxel is read yet
        _check_header(image, path)
        data = np.asanyarray(image.dataobj)
    except FileNotFoundError:
        raise DataError("file not found", file=path, kind="missing file") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"truncated or corrupt compressed file ({type(exc).__name__}: {exc})",
                        file=path, kind="corrupt file") from None
    except nib.filebasedimages.ImageFileError as exc:
        raise DataError(f"not a readable NIfTI image ({exc})", file=path, kind="not an image") from None
    except (OSError, ValueError) as exc:
        # nibabel reports short reads of .nii data as ValueError/OSError
        raise DataError(f"cannot read the image data ({type(exc).__name__}: {exc})",
                        file=path, kind="unreadable file") from None
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    elif data.ndim == 4:
        if modality == "mri":
            raise DataError(f"4D image with {data.shape[3]} volumes where one T1 volume is expected",
                            file=path, kind="not 3D")
        if frame_weights is None and warnings is not None:
            warnings.append(f"{path.name}: {data.shape[3]} frames averaged with equal weights (no frame timing)")
        data = average_frames(data, frame_weights, path)
    if data.ndim != 3:
        raise DataError(f"expected a 3D volume, got shape {data.shape}", file=path, kind="not 3D")
    if min(data.shape) < 2:
        raise DataError(f"volume of shape {data.shape} has a flat axis: not a 3D scan", file=path, kind="not 3D")
    affine = image.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError("no usable voxel-to-world affine in the header", file=path, kind="no geometry")
    return data, np.asarray(affine, dtype=np.float64)


def average_frames(frames: np.ndarray, weights: tuple[float, ...] | None, path: Path) -> np.ndarray:
    """A 4D series [X, Y, Z, T] as one volume: the weighted mean over T (weights summing to 1), or
    the plain mean without weights."""
    if weights is None:
        return frames.mean(axis=3)
    if len(weights) != frames.shape[3]:
        raise DataError(f"{frames.shape[3]} frames in the image, {len(weights)} frame weights from its sidecar",
                        file=path, kind="frame timing mismatch")
    used = [t for t, w in enumerate(weights) if w > 0]
    return np.tensordot(frames[..., used], np.asarray([weights[t] for t in used], dtype=np.float64),
                        axes=([3], [0])).astype(np.float32)


def _check_header(image, path: Path) -> None:
    """Refuse a header whose data cannot be there, before allocating for it: a broken header must
    cost its row, not the site's memory."""
    header = image.header
    shape = tuple(int(n) for n in header.get_data_shape())
    voxels = math.prod(shape)
    if voxels > MAX_VOXELS:
        raise DataError(f"header claims shape {shape} ({voxels:,} voxels), more than the {MAX_VOXELS:,} a scan "
                        "may have: a broken header?", file=path, kind="bad header")
    if path.name.lower().endswith(".nii"):         # uncompressed: the data must fit in the file
        offset = int(header.get_data_offset())
        needed = offset + voxels * header.get_data_dtype().itemsize
        size = path.stat().st_size
        if needed > size:
            raise DataError(f"truncated or header claims {voxels:,} voxels (shape {shape}, "
                            f"{header.get_data_dtype()}): needs {needed:,} bytes, the file has {size:,}",
                            file=path, kind="truncated file")


def scan_geometry(path: str | Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of a scan from its header(s) alone, without its voxels (for `check`'s table)."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_geometry(path)
    image = nib.load(str(path))
    return tuple(int(n) for n in image.shape[:3]), np.asarray(image.affine, dtype=np.float64)


def check_volume(volume: np.ndarray, path: Path) -> None:
    """Values a model cannot learn from are errors, not something to paper over."""
    finite = np.isfinite(volume)
    if not finite.all():
        bad = int((~finite).sum())
        raise DataError(f"{bad} NaN/inf voxels of {volume.size}", file=path, kind="non-finite voxels")
    if not np.any(volume):
        raise DataError("all voxels are zero", file=path, kind="empty volume")
    if float(volume.max()) == float(volume.min()):
        raise DataError(f"constant volume (every voxel {float(volume.max())})", file=path, kind="empty volume")


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
