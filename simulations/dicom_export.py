"""Write a volume as a DICOM series of axial slices, as a hospital PACS export would.

Pixels are int16 with RescaleSlope/Intercept; geometry from the volume's RAS
affine (converted to DICOM's LPS). Synthetic subjects only: the patient fields
carry the synthetic subject id, as a real export would carry a real one (which
is why the reader keeps nothing from them).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, PositronEmissionTomographyImageStorage, generate_uid
from pydicom.valuerep import DS

_LPS = np.diag([-1.0, -1.0, 1.0])
SOP_CLASSES = {"MR": MRImageStorage, "PT": PositronEmissionTomographyImageStorage}


def slice_dataset(sop_class: str) -> Dataset:
    """An empty single-slice DICOM dataset of `sop_class` with its file meta (explicit VR LE)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    return ds


def _ds(values) -> list:
    return [DS(float(v), auto_format=True) for v in values]


def write_dicom_series(folder: Path, volume: np.ndarray, affine: np.ndarray, modality: str, patient_id: str,
                       seed: int = 0) -> None:
    """volume (i, j, k) with a RAS affine -> one file per k slice in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    lo, hi = float(volume.min()), float(volume.max())
    slope = (hi - lo) / 32000 if hi > lo else 1.0
    intercept = lo
    stored = np.round((volume - intercept) / slope).astype(np.int16)
    row_cos = _LPS @ affine[:3, 0] / np.linalg.norm(affine[:3, 0])     # i: along a row (columns)
    col_cos = _LPS @ affine[:3, 1] / np.linalg.norm(affine[:3, 1])     # j: down a column (rows)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    study_uid, series_uid = generate_uid(), generate_uid()
    sop_class = SOP_CLASSES[modality]
    for k in range(volume.shape[2]):
        ds = slice_dataset(sop_class)
        ds.PatientID, ds.PatientName = patient_id, f"SYNTHETIC^{patient_id}"
        ds.Modality = modality
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study_uid, series_uid, 3 if modality == "MR" else 5
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = _ds(np.r_[row_cos, col_cos])
        ds.ImagePositionPatient = _ds(_LPS @ (affine[:3, :3] @ [0, 0, k] + affine[:3, 3]))
        ds.PixelSpacing = _ds([spacing[1], spacing[0]])                 # [between rows (j), between columns (i)]
        ds.SliceThickness = DS(float(spacing[2]), auto_format=True)
        ds.RescaleSlope, ds.RescaleIntercept = DS(slope, auto_format=True), DS(intercept, auto_format=True)
        ds.set_pixel_data(np.ascontiguousarray(stored[:, :, k].T), "MONOCHROME2", 16, generate_instance_uid=False)
        ds.save_as(folder / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
