"""Write synthetic views as DICOM digital-mammography (For Presentation) files with pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: SNOMED CT codes of the view (ViewCodeSequence).
VIEW_CODES: dict[str, tuple[str, str]] = {
    "CC": ("399162004", "cranio-caudal"),
    "MLO": ("399368009", "medio-lateral oblique"),
}
#: PatientOrientation (row direction \\ column direction) of each raw view.
PATIENT_ORIENTATION: dict[str, list[str]] = {
    "L-CC": ["A", "R"],
    "R-CC": ["P", "L"],
    "L-MLO": ["A", "FR"],
    "R-MLO": ["P", "FL"],
}


def write_dicom(
    path: Path,
    image: np.ndarray,
    *,
    laterality: str,
    view: str,
    patient_id: str,
    exam_id: str,
    image_id: str,
    pixel_mm: float,
    instance_number: int,
) -> None:
    """Write one 12-bit view as an uncompressed MG DICOM file.

    UIDs are derived from the ids, so the same exam always gives byte-identical files.

    Args:
        path: output file.
        image: uint16 (H, W) array, values 0..4095, MONOCHROME2 (bright = dense).
        laterality: ``"L"`` or ``"R"`` (ImageLaterality).
        view: ``"CC"`` or ``"MLO"`` (ViewPosition and ViewCodeSequence).
        patient_id: PatientID.
        exam_id: study identifier (StudyID, and the source of the Study/Series UIDs).
        image_id: image identifier (source of the SOP Instance UID).
        pixel_mm: detector pixel size in mm (ImagerPixelSpacing).
        instance_number: InstanceNumber within the series.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        DigitalMammographyXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    sop_uid = generate_uid(entropy_srcs=["mammogmic-synth", image_id])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["mammogmic-synth-implementation"])

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["mammogmic-synth", exam_id])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["mammogmic-synth", exam_id, laterality])
    ds.StudyDate = "20000101"
    ds.ContentDate = "20000101"
    ds.StudyID = exam_id[-16:]
    ds.SeriesNumber = 1 if laterality == "L" else 2
    ds.InstanceNumber = instance_number
    ds.PatientID = patient_id
    ds.PatientName = f"SYNTHETIC^{patient_id}"
    ds.PatientSex = "F"
    ds.Modality = "MG"
    ds.Manufacturer = "mammogmic synthetic"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "BREAST"
    ds.Laterality = laterality
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    code, meaning = VIEW_CODES[view]
    item = Dataset()
    item.CodeValue = code
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = meaning
    ds.ViewCodeSequence = [item]
    ds.PatientOrientation = PATIENT_ORIENTATION[f"{laterality}-{view}"]
    ds.ImagerPixelSpacing = [f"{pixel_mm:.6f}", f"{pixel_mm:.6f}"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(image.shape[0]), int(image.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(image, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
