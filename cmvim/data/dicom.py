"""Read one DICOM series (a folder of slices, or one enhanced multi-frame file) into a volume.

`read_dicom_series(folder)` returns `(volume, affine)`:

* `volume` is float32, indexed `(i, j, k)` = (column, row, slice), the nibabel convention:
  `i` runs along the DICOM row direction (the columns of the pixel array), `j` along the
  column direction (its rows), `k` over the slices sorted ascending along the slice normal
  `row cosine x column cosine`. RescaleSlope / RescaleIntercept are applied per slice.
* `affine` maps voxel indices to RAS+ millimetres (DICOM's LPS with the first two world
  axes flipped), built from ImageOrientationPatient, PixelSpacing and the slice positions:
  the step between slices is `(last - first) / (n - 1)` of ImagePositionPatient (so a gantry
  tilt gives a sheared affine), never SliceThickness.

Every problem is a `DataError` with a short fixed `kind` (see `KINDS`). Messages name files
and geometry (positions in mm, sizes, transfer syntax UIDs), never header text such as
names, ids, descriptions or dates; nothing from the headers is kept beyond geometry and
rescale values.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmvim.data.errors import DataError

__all__ = ["read_dicom_series", "read_dicom_geometry", "KINDS", "MAX_VOXELS"]

# The most voxels a scan's header may claim (a DICOM series here, a NIfTI in cmvim.data.volumes,
# which reads DICOM through this module): 2**28 is 1 GiB as float32, twice a 0.5 mm isotropic
# whole head (512^3 = 2**27), so a real scan fits and a broken header (30000^3) fails its row
# before anything is allocated for it.
MAX_VOXELS = 2 ** 28

# the `kind` strings this module raises
KINDS = (
    "missing folder", "no DICOM files", "not DICOM", "unreadable file", "several series",
    "unsupported compression", "not grayscale", "no geometry", "bad orientation", "not 3D",
    "mixed orientation", "mixed sizes", "mixed pixel spacing", "duplicate slice", "missing slice",
    "inconsistent spacing", "no pixel data", "bad rescale", "too large",
)

ORIENTATION_TOL = 1e-4        # max difference between direction cosines of two slices
UNIT_TOL = 1e-3               # direction cosines must be unit length / orthogonal to this
PIXEL_SPACING_REL_TOL = 1e-4  # relative difference allowed between slices' PixelSpacing
GAP_REL_TOL = 0.01            # slice gaps may differ from the median by 1% of it ...
GAP_ABS_TOL = 0.01            # ... or 0.01 mm, whichever is larger
IN_PLANE_REL_TOL = 0.05       # slice origins may leave their line by 5% of a pixel ...
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage (a DICOMDIR)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class _Slice:
    """Geometry and rescale of one 2D image (a file, or one frame of a multi-frame file)."""
    file: Path
    frame: int | None          # frame index inside a multi-frame file, None for a single frame
    orientation: np.ndarray    # (6,) row cosine, column cosine (LPS)
    position: np.ndarray       # (3,) ImagePositionPatient (LPS, mm)
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    rows: int
    columns: int
    slope: float
    intercept: float

    @property
    def label(self) -> str:
        return self.file.name if self.frame is None else f"{self.file.name} frame {self.frame + 1}"


@dataclass
class _FileInfo:
    """What the header pass keeps of one file: grouping keys and geometry, nothing else."""
    file: Path
    forced: bool               # read with force=True (a DICOM file without preamble / meta)
    series_uid: str
    series_number: int | None
    slices: list[_Slice]
    problem: DataError | None  # raised only once the folder is known to hold one series


def read_dicom_series(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the single DICOM series in `folder` (non-recursive) into `(volume, affine)`.

    Hidden files and a file named DICOMDIR (or any DICOMDIR by its SOP class) are skipped;
    any other file that is not DICOM is an error, as is a folder with several series.
    """
    slices, step, forced = _read_geometry(Path(folder))
    volume = _read_pixels(slices, forced)
    return volume, _affine(slices[0], step)


def read_dicom_geometry(folder: str | Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """`(shape, affine)` of the series in `folder` from its headers alone (no pixel data read),
    checked as `read_dicom_series` checks them."""
    slices, step, _ = _read_geometry(Path(folder))
    return (slices[0].columns, slices[0].rows, len(slices)), _affine(slices[0], step)


def _read_geometry(folder: Path) -> tuple[list[_Slice], np.ndarray, dict[Path, bool]]:
    """The header pass: the series' slices in spatial order, the step between them, and which
    files were read with force (pydicom is imported where it is used: the package imports
    without it)."""
    if not folder.is_dir():
        raise DataError("DICOM folder not found (or not a folder)", file=folder, kind="missing folder")
    paths = sorted(p for p in folder.iterdir()
                   if not p.name.startswith(".") and p.name.upper() != "DICOMDIR" and p.is_file())
    infos = [info for info in (_read_header(p) for p in paths) if info is not None]
    if not infos:
        raise DataError("folder holds no DICOM image files", file=folder, kind="no DICOM files")
    _check_one_series(folder, infos)
    for info in infos:
        if info.problem is not None:
            raise info.problem
    slices = [s for info in infos for s in info.slices]
    if len(slices) < 2:
        raise DataError(f"the series has a single 2D image ({slices[0].label}), not a 3D volume",
                        file=folder, kind="not 3D")
    _check_consistent(folder, slices)
    voxels = slices[0].rows * slices[0].columns * len(slices)
    if voxels > MAX_VOXELS:
        raise DataError(f"the headers claim {len(slices)} slices of {slices[0].rows}x{slices[0].columns} "
                        f"({voxels:,} voxels), more than the {MAX_VOXELS:,} a scan may have",
                        file=folder, kind="too large")
    slices, step = _sort_and_check_spacing(folder, slices)
    return slices, step, {info.file: info.forced for info in infos}


# ----------------------------------------------------------------------------- header pass

def _read_header(path: Path) -> _FileInfo | None:
    import pydicom
    from pydicom.errors import InvalidDicomError

    forced = False
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=False)
    except InvalidDicomError:
        # No "DICM" preamble: either not DICOM, or an old-style file with no file meta.
        # Accept the latter only if a forced read finds the identifying UIDs.
        ds = _forced_read(path)
        forced = True
        if ds is None:
            raise DataError(f"{path.name} is not a DICOM file", file=path, kind="not DICOM") from None
    except OSError as exc:
        raise DataError(f"cannot read {path.name}: {exc.strerror or type(exc).__name__}",
                        file=path, kind="unreadable file") from None
    except Exception as exc:  # noqa: BLE001 - truncated or malformed: report the type only (messages may quote header text)
        raise DataError(f"cannot parse {path.name} as DICOM ({type(exc).__name__})",
                        file=path, kind="unreadable file") from None

    meta = getattr(ds, "file_meta", None)
    sop_class = (meta.get("MediaStorageSOPClassUID") if meta is not None else None) or ds.get("SOPClassUID")
    if str(sop_class or "") == _MEDIA_DIRECTORY:
        return None  # a DICOMDIR under another name
    series_number = _as_int(ds.get("SeriesNumber"))
    info = _FileInfo(path, forced, str(ds.get("SeriesInstanceUID") or ""), series_number, [], None)
    try:
        _check_decodable(ds, path)
        info.slices = _slices_of(ds, path)
    except DataError as err:
        info.problem = err
    return info


def _forced_read(path: Path):
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - even a forced read fails: not DICOM, the caller decides (None)
        return None
    if "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
        return None
    return ds


def _check_one_series(folder: Path, infos: list[_FileInfo]) -> None:
    groups: dict[str, list[_FileInfo]] = {}
    for info in infos:
        groups.setdefault(info.series_uid, []).append(info)
    if len(groups) == 1:
        return
    lines = []
    for index, members in enumerate(groups.values(), start=1):
        numbers = sorted({m.series_number for m in members if m.series_number is not None})
        number = f", SeriesNumber {', '.join(map(str, numbers))}" if numbers else ""
        uid = "" if members[0].series_uid else " (no SeriesInstanceUID)"
        lines.append(f"series {index}{uid}: {len(members)} file(s){number}, e.g. {members[0].file.name}")
    raise DataError(f"folder holds {len(groups)} series (give each its own folder): " + "; ".join(lines),
                    file=folder, kind="several series")


def _check_decodable(ds, path: Path) -> None:
    """Raise "unsupported compression" if pydicom has no working decoder for the pixel data."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is None:
        return  # old-style file without meta: uncompressed by construction
    tsyntax = UID(str(tsyntax))
    try:
        available = get_decoder(tsyntax).is_available
    except Exception:  # noqa: BLE001 - no decoder exists for this UID at all
        available = False
    if not available:
        raise DataError(_compression_message(path, tsyntax), file=path, kind="unsupported compression")


def _compression_message(path: Path, tsyntax) -> str:
    name = getattr(tsyntax, "name", "") or ""
    named = f" ({name})" if name and name != str(tsyntax) else ""
    return (f"{path.name}: pixel data use transfer syntax {tsyntax}{named}, which pydicom cannot decode "
            "here; install a decoder plugin (e.g. pylibjpeg with pylibjpeg-libjpeg / -openjpeg / -rle, "
            "pyjpegls, or python-gdcm) or decompress the files first")


def _slices_of(ds, path: Path) -> list[_Slice]:
    """One `_Slice` per frame, with geometry from the functional groups or the top level."""
    samples = _as_int(ds.get("SamplesPerPixel"))
    if samples not in (None, 1):
        raise DataError(f"{path.name} has {samples} samples per pixel (a colour image), not a grayscale slice",
                        file=path, kind="not grayscale")
    rows, columns = _as_int(ds.get("Rows")), _as_int(ds.get("Columns"))
    if not rows or not columns:
        raise DataError(f"{path.name} has no Rows/Columns (not an image)", file=path, kind="no geometry")
    n_frames = _as_int(ds.get("NumberOfFrames")) or 1
    shared = _first_item(ds.get("SharedFunctionalGroupsSequence"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    multi = n_frames > 1 or per_frame is not None
    if per_frame is not None and len(per_frame) != n_frames:
        raise DataError(f"{path.name} has {n_frames} frames but {len(per_frame)} per-frame functional groups",
                        file=path, kind="no geometry")
    out = []
    for f in range(n_frames):
        frame = per_frame[f] if per_frame is not None else None
        where = f"{path.name}" + (f" frame {f + 1}" if n_frames > 1 else "")
        groups = (frame, shared)
        orientation = _from_groups(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
        if orientation is None:
            orientation = ds.get("ImageOrientationPatient")
        position = _from_groups(groups, "PlanePositionSequence", "ImagePositionPatient")
        if position is None and not multi:
            position = ds.get("ImagePositionPatient")
        spacing = _from_groups(groups, "PixelMeasuresSequence", "PixelSpacing")
        if spacing is None:
            spacing = ds.get("PixelSpacing")
        slope = _from_groups(groups, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _from_groups(groups, "PixelValueTransformationSequence", "RescaleIntercept")
        if slope is None and intercept is None:
            slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")

        if position is None and multi:
            raise DataError(f"{where}: multi-frame file without per-frame positions (no ImagePositionPatient "
                            "in the PlanePositionSequence of its functional groups); the slice geometry is "
                            "unknown", file=path, kind="no geometry")
        orientation = _floats(orientation, 6)
        position = _floats(position, 3)
        spacing = _floats(spacing, 2)
        missing = [name for name, value in (("ImageOrientationPatient", orientation),
                                            ("ImagePositionPatient", position),
                                            ("PixelSpacing", spacing)) if value is None]
        if missing:
            raise DataError(f"{where} lacks a valid {', '.join(missing)}", file=path, kind="no geometry")
        if spacing.min() <= 0:
            raise DataError(f"{where} has a non-positive PixelSpacing {spacing.tolist()}",
                            file=path, kind="no geometry")
        row_cos, col_cos = orientation[:3], orientation[3:]
        if (abs(np.linalg.norm(row_cos) - 1) > UNIT_TOL or abs(np.linalg.norm(col_cos) - 1) > UNIT_TOL
                or abs(float(row_cos @ col_cos)) > UNIT_TOL):
            raise DataError(f"{where}: ImageOrientationPatient {orientation.round(5).tolist()} is not two "
                            "orthogonal unit vectors", file=path, kind="bad orientation")
        slope_f = _as_float(slope, 1.0)
        intercept_f = _as_float(intercept, 0.0)
        if slope_f is None or intercept_f is None:
            raise DataError(f"{where} has a non-numeric or non-finite RescaleSlope/RescaleIntercept",
                            file=path, kind="bad rescale")
        out.append(_Slice(path, f if n_frames > 1 else None, orientation, position,
                          (float(spacing[0]), float(spacing[1])), rows, columns, slope_f, intercept_f))
    return out


def _first_item(seq):
    return seq[0] if seq else None


def _from_groups(groups, sequence: str, keyword: str):
    """`keyword` from the first of (per-frame, shared) functional groups that has it."""
    for group in groups:
        if group is None:
            continue
        item = _first_item(group.get(sequence))
        if item is not None:
            value = item.get(keyword)
            if value is not None and value != "":
                return value
    return None


def _floats(value, n: int) -> np.ndarray | None:
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.isfinite(arr).all() else None


def _as_int(value) -> int | None:
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def _as_float(value, default: float) -> float | None:
    if value is None or value == "":
        return default
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


# ----------------------------------------------------------------------------- geometry checks

def _check_consistent(folder: Path, slices: list[_Slice]) -> None:
    first = slices[0]
    for s in slices[1:]:
        if np.abs(s.orientation - first.orientation).max() > ORIENTATION_TOL:
            raise DataError(
                f"slices have different orientations: {first.label} {first.orientation.round(4).tolist()} "
                f"vs {s.label} {s.orientation.round(4).tolist()} (ImageOrientationPatient); the folder may mix "
                "a localizer or several stacks", file=folder, kind="mixed orientation")
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise DataError(f"slices have different sizes: {first.label} is {first.rows}x{first.columns} "
                            f"(rows x columns), {s.label} is {s.rows}x{s.columns}", file=folder, kind="mixed sizes")
    for s in slices[1:]:
        if not np.allclose(s.spacing, first.spacing, rtol=PIXEL_SPACING_REL_TOL, atol=0):
            raise DataError(f"slices have different PixelSpacing: {first.label} {list(first.spacing)} mm vs "
                            f"{s.label} {list(s.spacing)} mm", file=folder, kind="mixed pixel spacing")


def _sort_and_check_spacing(folder: Path, slices: list[_Slice]) -> tuple[list[_Slice], np.ndarray]:
    """Sort along the slice normal, check the gaps, return the slices and the step vector (LPS)."""
    orientation = slices[0].orientation
    normal = np.cross(orientation[:3], orientation[3:])
    dist = np.array([s.position @ normal for s in slices])
    order = np.argsort(dist, kind="stable")
    slices = [slices[i] for i in order]
    dist = dist[order]
    gaps = np.diff(dist)

    dup = np.flatnonzero(gaps <= GAP_ABS_TOL)
    if dup.size:
        a, b = slices[dup[0]], slices[dup[0] + 1]
        raise DataError(f"{dup.size} pair(s) of slices share a position along the slice normal, e.g. {a.label} "
                        f"and {b.label} at {dist[dup[0]]:.3f} mm (a copied file, or several echoes, phases or "
                        "time points in one series)", file=folder, kind="duplicate slice")

    median = float(np.median(gaps))
    tol = max(GAP_REL_TOL * median, GAP_ABS_TOL)
    missing, irregular = [], []
    for idx, gap in enumerate(gaps):
        if abs(gap - median) <= tol:
            continue
        multiple = int(round(gap / median))
        where = (f"between {dist[idx]:.3f} mm ({slices[idx].label}) and {dist[idx + 1]:.3f} mm "
                 f"({slices[idx + 1].label})")
        if multiple >= 2 and abs(gap - multiple * median) <= tol * multiple:
            missing.append((multiple - 1, f"{multiple - 1} {where}"))
        else:
            irregular.append(f"{gap:.3f} mm {where}")
    if irregular:
        shown = "; ".join(irregular[:5]) + (f"; and {len(irregular) - 5} more" if len(irregular) > 5 else "")
        raise DataError(f"irregular slice spacing: the usual gap along the slice normal is {median:.3f} mm, "
                        f"but {len(irregular)} gap(s) differ: {shown}", file=folder, kind="inconsistent spacing")
    if missing:
        total = sum(count for count, _ in missing)
        shown = "; ".join(text for _, text in missing[:5]) + (
            f"; and {len(missing) - 5} more gaps" if len(missing) > 5 else "")
        raise DataError(f"{total} slice(s) missing (slice spacing {median:.3f} mm along the normal): {shown}",
                        file=folder, kind="missing slice")

    first, last = slices[0].position, slices[-1].position
    step = (last - first) / (len(slices) - 1)
    # origins must lie on one line (a gantry tilt is fine; in-plane jumps between slices are not)
    offsets = np.array([s.position for s in slices]) - (first + np.outer(np.arange(len(slices)), step))
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(in_plane, axis=1)
    limit = max(IN_PLANE_REL_TOL * min(slices[0].spacing), GAP_ABS_TOL)
    if drift.max() > limit:
        k = int(drift.argmax())
        raise DataError(f"slice origins do not lie on one line: {slices[k].label} is {drift[k]:.3f} mm off "
                        f"in-plane (allowed {limit:.3f} mm)", file=folder, kind="inconsistent spacing")
    return slices, step


def _affine(first: _Slice, step: np.ndarray) -> np.ndarray:
    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    between_rows, between_columns = first.spacing
    lps = np.eye(4)
    lps[:3, 0] = row_cos * between_columns  # i: along a row, next column
    lps[:3, 1] = col_cos * between_rows     # j: down a column, next row
    lps[:3, 2] = step
    lps[:3, 3] = first.position
    return _LPS_TO_RAS @ lps


# ----------------------------------------------------------------------------- pixel pass

def _read_pixels(slices: list[_Slice], forced: dict[Path, bool]) -> np.ndarray:
    first = slices[0]
    volume = np.empty((first.columns, first.rows, len(slices)), dtype=np.float32)
    by_file: dict[Path, list[tuple[int, _Slice]]] = {}
    for k, s in enumerate(slices):
        by_file.setdefault(s.file, []).append((k, s))
    for path, members in by_file.items():
        pixels = _file_pixels(path, forced[path])
        for k, s in members:
            if s.frame is None:
                frame = pixels if pixels.ndim == 2 else None
            else:
                frame = pixels[s.frame] if pixels.ndim == 3 and s.frame < pixels.shape[0] else None
            if frame is None or frame.shape != (s.rows, s.columns):
                raise DataError(f"{s.label}: decoded pixel data of shape {pixels.shape} do not match "
                                f"Rows x Columns {s.rows}x{s.columns}", file=path, kind="unreadable file")
            volume[:, :, k] = (frame.astype(np.float64) * s.slope + s.intercept).T
        del pixels
    return volume


def _file_pixels(path: Path, forced: bool) -> np.ndarray:
    import pydicom
    from pydicom.uid import UID

    try:
        with warnings.catch_warnings():
            if forced:
                warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=forced)
    except Exception as exc:  # noqa: BLE001 - a damaged file: pydicom raises many types; named as a DataError
        raise DataError(f"cannot read {path.name} ({type(exc).__name__})", file=path,
                        kind="unreadable file") from None
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise DataError(f"{path.name} has no pixel data", file=path, kind="no pixel data")
    if forced and "TransferSyntaxUID" not in ds.file_meta:
        _set_transfer_syntax(ds)
    tsyntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - the decoders raise many types; answered below by what the syntax needs
        if tsyntax.is_compressed:
            raise DataError(_compression_message(path, tsyntax) + f" ({type(exc).__name__})", file=path,
                            kind="unsupported compression") from None
        raise DataError(f"cannot decode the pixel data of {path.name} ({type(exc).__name__}); "
                        "the file may be truncated or corrupt", file=path, kind="unreadable file") from None


def _set_transfer_syntax(ds) -> None:
    """Files without file meta: pydicom 3 needs a TransferSyntaxUID to decode the pixels."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    implicit, little = getattr(ds, "original_encoding", (True, True))
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit
                                      else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
