"""Folder scans, image ids and DICOM identity of predict's inputs (``mammogmic.evaluation.inputs``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from mammogmic.data.synth.dicom import write_dicom
from mammogmic.errors import MammogmicError
from mammogmic.evaluation.inference import items_from_folder, items_from_paths
from mammogmic.evaluation.inputs import (
    clean_id,
    id_from_relative_path,
    scan_folder,
    strip_image_suffix,
    unique_ids,
)


def _dicom(path: Path, side: str = "L", view: str = "CC", patient: str = "A", exam: str = "s1") -> Path:
    image = np.zeros((64, 48), np.uint16)
    image[8:56, :30] = np.arange(48 * 30).reshape(48, 30) % 4000
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dicom(
        path,
        image,
        laterality=side,
        view=view,
        patient_id=patient,
        exam_id=exam,
        image_id=path.name,
        pixel_mm=0.1,
        instance_number=1,
    )
    return path


def test_clean_id_keeps_unicode() -> None:
    assert clean_id("bon image été") == "bon image été"
    assert clean_id("e\u0301te\u0301") == "été"  # NFD (macOS file names) becomes NFC
    assert clean_id("a/b\\c\td\ne") == "a_b_c_d_e"
    assert clean_id("  ") == "image"


def test_unique_ids_never_clash() -> None:
    assert unique_ids(["a", "b", "a", "a"]) == ["a", "b", "a_1", "a_2"]
    assert unique_ids(["a", "a", "a_1"]) == ["a", "a_2", "a_1"]  # "a_1" belongs to the third input


def test_suffixes_and_relative_ids() -> None:
    assert strip_image_suffix("1.2.840.10008.5") == "1.2.840.10008.5"  # a UID, not a ".5" extension
    assert strip_image_suffix("scan.DCM") == "scan"
    assert id_from_relative_path(Path("sub dir/1_R-MLO.png")) == "sub dir_1_R-MLO"


def test_scan_folder_lists_what_reading_must_report(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "folder.png").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "folder.png" / "inner.png")
    (tmp_path / "gone.dcm").symlink_to(tmp_path / "nothing")
    os.mkfifo(tmp_path / "pipe.dcm")
    (tmp_path / "notes.txt").write_text("x")
    uid = _dicom(tmp_path / "export" / "1.2.826.0.1.3680043.8.498.1")  # PACS naming: no extension
    bare = _dicom(tmp_path / "export" / "IM000001")
    (tmp_path / "export" / "DICOMDIR").write_bytes(uid.read_bytes())  # the export's index: not an image
    (tmp_path / "export" / "README").write_text("exported")
    (tmp_path / "linked").symlink_to(tmp_path / "export")  # folder links are not followed
    scan = scan_folder(tmp_path)
    names = [str(p.relative_to(tmp_path)) for p in scan.paths]
    assert names == [
        "a.png",
        "export/1.2.826.0.1.3680043.8.498.1",
        "export/IM000001",
        "folder.png",
        "folder.png/inner.png",
        "gone.dcm",
        "pipe.dcm",
    ]
    assert {p.name for p in scan.ignored} == {"notes.txt", "DICOMDIR", "README", "linked"}
    assert bare.exists()
    with pytest.raises(MammogmicError, match="cannot list the folder"):
        scan_folder(tmp_path / "a.png")


def test_items_get_patient_and_exam_from_dicom_tags(tmp_path: Path) -> None:
    _dicom(tmp_path / "1.2.3.4", "L", "CC", "A", "s1")
    _dicom(tmp_path / "1.2.3.5.dcm", "R", "MLO", "B", "s2")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "0_L-CC.png")
    items = {i.image_id: i for i in items_from_folder(tmp_path)}
    assert set(items) == {"1.2.3.4", "1.2.3.5", "0_L-CC"}  # UID names keep their dots
    assert (items["1.2.3.4"].patient_id, items["1.2.3.5"].patient_id) == ("A", "B")
    assert items["1.2.3.4"].exam_id != items["1.2.3.5"].exam_id
    assert items["1.2.3.4"].exam_id == pydicom.dcmread(tmp_path / "1.2.3.4").StudyInstanceUID
    assert items["0_L-CC"].exam_id is None  # PNG: the file name decides later
    single = items_from_paths([tmp_path / "1.2.3.4", tmp_path / "missing.dcm"])
    assert single[0].exam_id == items["1.2.3.4"].exam_id and single[1].exam_id is None
