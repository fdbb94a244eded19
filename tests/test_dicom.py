"""DICOM series reader: pydicom's own test series and synthetic series written here.

What pydicom 3.0's `dicomdirtests` folders really hold (checked by listing their headers):
  98892001/CT5N  5 axial CT slices 16x16, one series, z = 8.7625 ... -1.2375 every 2.5 mm, HU -888..85
  98892001/CT2N  2 CT scout slices, one series, two orientations
  98892003/MR700 7 MR slices, one series, each with a different row cosine (a radial localizer)
  98892003/MR2   7 MR files from 3 different SeriesInstanceUIDs (all SeriesNumber 2); files 4950,
                 4981, 5011 form one series whose slices have different orientations
  77654033/CT2   4 axial slices, one series: z = -99.48, 103.02, 104.27, 105.52 (1.25 mm apart, with
                 161 slices missing between the first two: InstanceNumbers 18, 180, 181, 182)
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from nibabel.affines import apply_affine
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedMRImageStorage, JPEGLSLossless, MRImageStorage, generate_uid
from pydicom.valuerep import DS

from cmvim.data.dicom import read_dicom_series
from cmvim.data.errors import DataError
from cmvim.simulations.dicom_export import slice_dataset

with warnings.catch_warnings():  # "The DICOM readers are highly experimental" (only dicomwrappers is used)
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import dicomwrappers

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
DIRTESTS = TEST_FILES / "dicomdirtests"
CT5N = DIRTESTS / "98892001" / "CT5N"
SECRETS = ("Doe^Jane", "SECRET-ID-123", "private free text", "20240131")


def _copy(src: Path, dst: Path, names=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if names is None or p.name in names:
            shutil.copy(p, dst / p.name)
    return dst


def _edit(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def _read_error(folder) -> DataError:
    with pytest.raises(DataError) as info:
        read_dicom_series(folder)
    return info.value


def _lps(affine_ras: np.ndarray) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras


def _assert_matches_nibabel_wrappers(files, volume, affine):
    """Each file, wrapped by nibabel's own DICOM code, gives the same slice, in-plane axes and origin.

    nibabel's single-slice Wrapper indexes data as (row, column) and its affine is in LPS, so its
    first two affine columns are ours swapped, and its data are our slice transposed.
    """
    lps = _lps(affine)
    found = set()
    for f in files:
        w = dicomwrappers.wrapper_from_data(pydicom.dcmread(f))
        origin = np.asarray(w.affine[:3, 3])
        k = int(np.argmin([np.linalg.norm(lps[:3, 3] + kk * lps[:3, 2] - origin)
                           for kk in range(volume.shape[2])]))
        np.testing.assert_allclose(lps[:3, 3] + k * lps[:3, 2], origin, atol=1e-4)
        np.testing.assert_allclose(lps[:3, [1, 0]], w.affine[:3, :2], atol=1e-6)
        np.testing.assert_allclose(volume[:, :, k], np.asarray(w.get_data()).T, rtol=1e-6, atol=1e-4)
        found.add(k)
    assert found == set(range(volume.shape[2]))


# ----------------------------------------------------------------------------- real series

def test_ct5n_clean_read():
    volume, affine = read_dicom_series(CT5N)
    assert volume.shape == (16, 16, 5) and volume.dtype == np.float32
    assert (volume.min(), volume.max()) == (-888.0, 85.0)  # HU after RescaleIntercept -1024
    # axial, IOP [1,0,0,0,1,0], PixelSpacing 0.488281; slices ascending z: -1.2375 ... 8.7625
    np.testing.assert_allclose(affine[:3, :3], np.diag([-0.488281, -0.488281, 2.5]), atol=1e-6)
    np.testing.assert_allclose(affine[:3, 3], [72.199997, 143.0, -1.2375], atol=1e-6)
    z = [apply_affine(affine, (0, 0, k))[2] for k in range(5)]
    assert np.all(np.diff(z) > 0)
    np.testing.assert_allclose(z, [-1.2375, 1.2625, 3.7625, 6.2625, 8.7625], atol=1e-5)
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    _assert_matches_nibabel_wrappers(sorted(CT5N.iterdir()), volume, affine)


def test_ignores_hidden_files_and_dicomdir(tmp_path):
    folder = _copy(CT5N, tmp_path / "s")
    (folder / ".DS_Store").write_bytes(b"\0junk")
    shutil.copy(DIRTESTS / "DICOMDIR", folder / "DICOMDIR")
    shutil.copy(DIRTESTS / "DICOMDIR-implicit", folder / "index")  # a DICOMDIR by its SOP class
    volume, _ = read_dicom_series(folder)
    assert volume.shape == (16, 16, 5)


def test_files_without_preamble_or_meta_are_read(tmp_path):
    folder = tmp_path / "nometa"
    folder.mkdir()
    for f in CT5N.iterdir():
        ds = pydicom.dcmread(f)
        ds.preamble = None
        ds.file_meta = FileMetaDataset()
        ds.save_as(folder / f.name, implicit_vr=True, little_endian=True, enforce_file_format=False)
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(next(folder.iterdir()))
    volume, affine = read_dicom_series(folder)
    ref_volume, ref_affine = read_dicom_series(CT5N)
    np.testing.assert_array_equal(volume, ref_volume)
    np.testing.assert_array_equal(affine, ref_affine)


def test_mr700_localizer_has_mixed_orientation():
    # described as "irregular positions"; really every slice has its own row cosine
    assert _read_error(DIRTESTS / "98892003" / "MR700").kind == "mixed orientation"
    assert _read_error(DIRTESTS / "98892001" / "CT2N").kind == "mixed orientation"


def test_mr2_is_three_series_and_one_of_them_mixes_orientations(tmp_path):
    err = _read_error(DIRTESTS / "98892003" / "MR2")
    assert err.kind == "several series"
    assert "3 series" in err.problem and "SeriesNumber 2" in err.problem
    one_series = _copy(DIRTESTS / "98892003" / "MR2", tmp_path / "mr2", {"4950", "4981", "5011"})
    assert _read_error(one_series).kind == "mixed orientation"


def test_ct2_real_gap_is_missing_slices():
    # described as "irregular": the gap is exactly 162 x 1.25 mm, i.e. 161 slices missing
    err = _read_error(DIRTESTS / "77654033" / "CT2")
    assert err.kind == "missing slice"
    assert "161 slice(s) missing" in err.problem
    assert "-99.480 mm" in err.problem and "103.020 mm" in err.problem


def test_removed_slice_is_named(tmp_path):
    folder = _copy(CT5N, tmp_path / "s", {"2062", "2392", "3023", "3353"})  # drop 2693 at z=3.7625
    err = _read_error(folder)
    assert err.kind == "missing slice"
    assert "1 slice(s) missing" in err.problem
    assert "1 between 1.26" in err.problem and "mm (3023) and 6.263 mm (2392)" in err.problem


def test_shifted_slice_is_inconsistent_spacing(tmp_path):
    folder = _copy(CT5N, tmp_path / "s")
    _edit(folder / "2693", ImagePositionPatient=[-72.199997, -143.0, 4.4625])  # 3.7625 + 0.7 mm
    assert _read_error(folder).kind == "inconsistent spacing"
    folder = _copy(CT5N, tmp_path / "t")
    _edit(folder / "2693", ImagePositionPatient=[-71.199997, -143.0, 3.7625])  # in-plane jump of 1 mm
    err = _read_error(folder)
    assert err.kind == "inconsistent spacing" and "2693" in err.problem


def test_duplicate_slice(tmp_path):
    folder = _copy(CT5N, tmp_path / "s")
    shutil.copy(CT5N / "2392", folder / "2392_copy")
    err = _read_error(folder)
    assert err.kind == "duplicate slice" and "2392" in err.problem


def test_two_series_in_one_folder(tmp_path):
    folder = _copy(CT5N, tmp_path / "s")
    _copy(DIRTESTS / "77654033" / "CT2", folder)
    err = _read_error(folder)
    assert err.kind == "several series"
    assert "series 1: 4 file(s), SeriesNumber 2" in err.problem
    assert "series 2: 5 file(s), SeriesNumber 5" in err.problem
    header = pydicom.dcmread(CT5N / "2062", stop_before_pixels=True)
    for private in (str(header.PatientName), str(header.PatientID), str(header.SeriesDescription)):
        assert private not in str(err)


def test_text_file_among_slices_is_not_dicom(tmp_path):
    folder = _copy(CT5N, tmp_path / "s")
    (folder / "notes.txt").write_text("scanned on tuesday\n" * 10)
    err = _read_error(folder)
    assert err.kind == "not DICOM" and "notes.txt" in err.problem and err.file.endswith("notes.txt")


def test_slice_with_other_size(tmp_path):
    folder = _copy(CT5N, tmp_path / "s")
    ds = pydicom.dcmread(folder / "2693")
    ds.set_pixel_data(ds.pixel_array[:8, :12].copy(), "MONOCHROME2", 16, generate_instance_uid=False)
    ds.save_as(folder / "2693")
    err = _read_error(folder)
    assert err.kind == "mixed sizes" and "8x12" in err.problem


def test_single_slice_and_non_volume_files(tmp_path):
    assert _read_error(_copy(CT5N, tmp_path / "one", {"2062"})).kind == "not 3D"
    assert _read_error(DIRTESTS / "77654033" / "CR1").kind == "no geometry"  # a radiograph
    # RT dose: 15 frames, one top-level position, no per-frame PlanePositionSequence
    dose = _copy(TEST_FILES, tmp_path / "dose", {"rtdose.dcm"})
    err = _read_error(dose)
    assert err.kind == "no geometry" and "per-frame positions" in err.problem
    assert _read_error(tmp_path / "missing").kind == "missing folder"
    (tmp_path / "empty").mkdir()
    assert _read_error(tmp_path / "empty").kind == "no DICOM files"


def test_unsupported_compression_names_transfer_syntax(tmp_path):
    from pydicom.pixels import get_decoder
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    folder = _copy(TEST_FILES, tmp_path / "jls", {"MR_small_jpeg_ls_lossless.dcm"})
    err = _read_error(folder)
    assert err.kind == "unsupported compression" and JPEGLSLossless in err.problem


# ----------------------------------------------------------------------------- synthetic series

def _rotation(deg_z: float, deg_y: float) -> np.ndarray:
    a, b = np.deg2rad(deg_z), np.deg2rad(deg_y)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return rz @ ry


def _ds_values(values):
    return [DS(float(v), auto_format=True) for v in values]


def _base_dataset(sop_class, series_uid) -> Dataset:
    ds = slice_dataset(sop_class)
    ds.PatientName, ds.PatientID = SECRETS[0], SECRETS[1]
    ds.SeriesDescription, ds.StudyDate = SECRETS[2], SECRETS[3]
    ds.Modality = "MR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), series_uid, 7
    return ds


# sagittal (row cosine anterior->posterior, column cosine superior->inferior), then tilted 20 deg
# about z and 10 deg about y: an oblique sagittal stack
ROT = _rotation(20, 10)
ROW_COS, COL_COS = ROT @ [0, 1, 0], ROT @ [0, 0, -1]
NORMAL = np.cross(ROW_COS, COL_COS)
BETWEEN_ROWS, BETWEEN_COLS, GAP = 0.9, 1.1, 2.2
ORIGIN = np.array([-30.5, 12.25, 40.0])
STEP = GAP * NORMAL + 0.3 * COL_COS  # origins move along the column direction too (like a gantry tilt)
N_ROWS, N_COLS, N_SLICES = 5, 4, 6


def _write_sagittal_series(folder: Path, rng, series_uid=None) -> tuple[list[np.ndarray], list[tuple], list[Path]]:
    """Write N_SLICES slices; return raw arrays, (slope, intercept) and files, in spatial order."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    raws, rescales, files = [], [], []
    order = rng.permutation(N_SLICES)  # file names unrelated to spatial order
    for k in range(N_SLICES):
        raw = rng.integers(-500, 2000, size=(N_ROWS, N_COLS)).astype(np.int16)
        slope, intercept = 0.5 + 0.25 * k, -100.0 + 10 * k
        ds = _base_dataset(MRImageStorage, series_uid)
        ds.InstanceNumber = int(order[k]) + 1
        ds.ImageOrientationPatient = _ds_values(np.r_[ROW_COS, COL_COS])
        ds.ImagePositionPatient = _ds_values(ORIGIN + k * STEP)
        ds.PixelSpacing = _ds_values([BETWEEN_ROWS, BETWEEN_COLS])
        ds.SliceThickness = DS("1.0")  # deliberately not the spacing: must not be used
        ds.RescaleSlope, ds.RescaleIntercept = DS(slope), DS(intercept)
        ds.set_pixel_data(raw, "MONOCHROME2", 16, generate_instance_uid=False)
        files.append(folder / f"im{order[k]:02d}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
        raws.append(raw)
        rescales.append((slope, intercept))
    return raws, rescales, files


def test_oblique_sagittal_series_volume_and_affine(tmp_path):
    rng = np.random.default_rng(0)
    raws, rescales, _ = _write_sagittal_series(tmp_path / "sag", rng)
    volume, affine = read_dicom_series(tmp_path / "sag")

    expected = np.stack([(raw * s + b).T for raw, (s, b) in zip(raws, rescales)], axis=-1)
    assert volume.shape == (N_COLS, N_ROWS, N_SLICES) and volume.dtype == np.float32
    np.testing.assert_allclose(volume, expected, rtol=0, atol=1e-4)

    # RAS of voxel (i, j, k) by hand from the DICOM fields: IPP_k + i*col spacing*row cosine + j*row spacing*col cosine
    for ijk in [(0, 0, 0), (3, 0, 0), (0, 4, 0), (0, 0, 5), (3, 4, 5), (1, 2, 3), (2, 1, 4)]:
        i, j, k = ijk
        lps = ORIGIN + k * STEP + i * BETWEEN_COLS * ROW_COS + j * BETWEEN_ROWS * COL_COS
        np.testing.assert_allclose(apply_affine(affine, ijk), lps * [-1, -1, 1], atol=1e-6)

    # orientation labels: i -> posterior, j -> inferior, k -> along +x LPS = patient's right
    assert nib.aff2axcodes(affine) == ("P", "I", "R")
    expected_affine = np.eye(4)
    expected_affine[:3, :] = np.c_[BETWEEN_COLS * ROW_COS, BETWEEN_ROWS * COL_COS, STEP, ORIGIN]
    expected_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ expected_affine
    np.testing.assert_allclose(affine, expected_affine, atol=1e-6)
    nib.save(nib.Nifti1Image(expected.astype(np.float32), expected_affine), tmp_path / "sag.nii.gz")
    written = nib.load(tmp_path / "sag.nii.gz")
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(affine) == ("P", "I", "R")
    np.testing.assert_allclose(written.affine, affine, atol=1e-4)
    np.testing.assert_allclose(written.get_fdata(), volume, atol=1e-4)

    _assert_matches_nibabel_wrappers(sorted((tmp_path / "sag").iterdir()), volume, affine)


def test_synthetic_errors_never_quote_header_text(tmp_path):
    rng = np.random.default_rng(1)
    files = _write_sagittal_series(tmp_path / "a", rng)[2]
    files[2].unlink()
    err = _read_error(tmp_path / "a")
    assert err.kind == "missing slice" and files[1].name in err.problem and files[3].name in err.problem
    _write_sagittal_series(tmp_path / "b", rng)
    _write_sagittal_series(tmp_path / "b2", rng)
    for f in (tmp_path / "b2").iterdir():
        f.rename(tmp_path / "b" / f"x{f.name}")
    err2 = _read_error(tmp_path / "b")
    assert err2.kind == "several series" and "SeriesNumber 7" in err2.problem
    for e in (err, err2):
        for secret in SECRETS:
            assert secret not in str(e) and secret not in e.public_message()


def _write_enhanced(path: Path, frames: np.ndarray, positions, with_positions=True) -> None:
    ds = _base_dataset(EnhancedMRImageStorage, generate_uid())
    row_cos, col_cos = np.array([1.0, 0, 0]), np.array([0, 0, -1.0])  # coronal
    shared = Dataset()
    orient, measures, rescale = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = _ds_values(np.r_[row_cos, col_cos])
    measures.PixelSpacing = _ds_values([0.8, 0.7])
    measures.SliceThickness = DS("3.0")
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = DS(2), DS(-5), "US"
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for f, pos in enumerate(positions):
        item = Dataset()
        if with_positions:
            plane = Dataset()
            plane.ImagePositionPatient = _ds_values(pos)
            item.PlanePositionSequence = Sequence([plane])
        if f == 1:  # a per-frame rescale overrides the shared one
            own = Dataset()
            own.RescaleSlope, own.RescaleIntercept, own.RescaleType = DS(3), DS(1), "US"
            item.PixelValueTransformationSequence = Sequence([own])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.set_pixel_data(frames, "MONOCHROME2", 12, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_multiframe(tmp_path):
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 4000, size=(4, 3, 5)).astype(np.uint16)  # (frame, rows, columns)
    along = [6.0, 0.0, 9.0, 3.0]  # coronal: the normal is +y (LPS); frames stored out of order
    positions = [[-20.0, y, 50.0] for y in along]
    (tmp_path / "mf").mkdir()
    _write_enhanced(tmp_path / "mf" / "enhanced.dcm", frames, positions)
    volume, affine = read_dicom_series(tmp_path / "mf")
    assert volume.shape == (5, 3, 4)
    rescale = [(2, -5), (3, 1), (2, -5), (2, -5)]
    for k, f in enumerate(np.argsort(along)):
        s, b = rescale[f]
        np.testing.assert_allclose(volume[:, :, k], (frames[f].astype(np.float64) * s + b).T)
    lps = np.array([[0.7, 0, 0, -20.0], [0, 0, 3.0, 0.0], [0, -0.8, 0, 50.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(affine, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, atol=1e-9)
    assert nib.aff2axcodes(affine) == ("L", "I", "P")

    (tmp_path / "nopos").mkdir()
    _write_enhanced(tmp_path / "nopos" / "enhanced.dcm", frames, positions, with_positions=False)
    err = _read_error(tmp_path / "nopos")
    assert err.kind == "no geometry" and "PlanePositionSequence" in err.problem
