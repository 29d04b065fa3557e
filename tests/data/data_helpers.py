"""Write small synthetic DICOM files with pydicom (test helper, no test functions here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


def synthetic_breast(shape: tuple[int, int] = (120, 80), side: str = "L", value: int = 3000) -> np.ndarray:
    """A half-ellipse 'breast' touching the chest wall (column 0 for L, last column for R)."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    centre = shape[0] / 2
    inside = ((rows - centre) / (shape[0] * 0.42)) ** 2 + (cols / (shape[1] * 0.75)) ** 2 <= 1.0
    image = np.where(inside, value - (cols * 7) % 500, 0).astype(np.uint16)
    return image if side == "L" else image[:, ::-1].copy()


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    laterality: str | None = "L",
    view: str | None = "CC",
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    transfer_syntax: Any = None,
    **tags: Any,
) -> Path:
    """Write ``pixels`` (uint16) as a mammography DICOM; extra keyword tags are set verbatim."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = tags.pop("SOPClassUID", MG_FOR_PRESENTATION)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = tags.pop("StudyInstanceUID", generate_uid())
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = tags.pop("PatientID", "P1")
    ds.Modality = tags.pop("Modality", "MG")
    if laterality is not None:
        ds.ImageLaterality = laterality
    if view is not None:
        ds.ViewPosition = view
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    if transfer_syntax is not None:
        ds.compress(transfer_syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
