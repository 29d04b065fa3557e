"""Dataset adapters on miniature copies of each layout (real column names, pydicom-written DICOMs)."""

from __future__ import annotations

import csv
import json
import os
import pickle
import plistlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_helpers import synthetic_breast, write_dicom
from PIL import Image
from pydicom.dataset import Dataset

from mammogmic.cli.main import main
from mammogmic.data.adapters import load_exam_list, prepare
from mammogmic.data.manifest import load_manifest
from mammogmic.errors import ManifestError

SHAPE = (64, 48)


def _csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _rows(out: Path) -> dict[str, dict[str, str]]:
    """The rows of ``prepare --out OUT``'s ``OUT/manifest.csv`` by image id."""
    with open(out / "manifest.csv", newline="", encoding="utf-8") as handle:
        return {r["image_id"]: r for r in csv.DictReader(handle)}


# ------------------------------------------------------------------------------------------- CBIS-DDSM
CBIS_MASS = [
    "patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
    "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
    "image file path", "cropped image file path", "ROI mask file path",
]  # fmt: skip
CBIS_CALC = [
    "patient_id", "breast density", "left or right breast", "image view", "abnormality id",
    "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
    "image file path", "cropped image file path", "ROI mask file path",
]  # fmt: skip


def _cbis_image(root: Path, folder: str, name: str, pixels: np.ndarray) -> str:
    rel = f"{folder}/1.3.6.1.4.1.9590.100.1.2.11/1.3.6.1.4.1.9590.100.1.2.12/{name}"
    write_dicom(root / "CBIS-DDSM" / rel, pixels)
    return rel


@pytest.fixture()
def cbis(tmp_path: Path) -> Path:
    src = tmp_path / "cbis"
    full1 = _cbis_image(src, "Mass-Training_P_00001_LEFT_CC", "000000.dcm", synthetic_breast(SHAPE))
    mask = np.zeros(SHAPE, np.uint16)
    mask[10:20, 5:15] = 255
    mask1 = _cbis_image(src, "Mass-Training_P_00001_LEFT_CC_1", "000000.dcm", mask)
    crop1 = _cbis_image(src, "Mass-Training_P_00001_LEFT_CC_1", "000001.dcm", np.ones((20, 20), np.uint16))
    # Crop and mask columns swapped, trailing newlines in the paths (both known quirks).
    _csv(
        src / "mass_case_description_train_set.csv",
        CBIS_MASS,
        [["P_00001", "3", "LEFT", "CC", "1", "mass", "OVAL", "CIRCUMSCRIBED", "4", "MALIGNANT", "4",
          full1 + "\n", mask1 + "\n", crop1 + "\n"]],
    )  # fmt: skip
    # P_00002 is stored as the NBIA downloader names files (dates/series names, 1-1.dcm), unlike the CSV.
    nbia = src / "manifest-1234" / "CBIS-DDSM"
    write_dicom(nbia / "Calc-Test_P_00002_RIGHT_MLO" / "08-29-2017-DDSM-1" / "1.000000-full-24515" / "1-1.dcm",
                synthetic_breast(SHAPE, "R"))  # fmt: skip
    full2 = "Calc-Test_P_00002_RIGHT_MLO/1.3.6.1.4.1.9590.100.1.2.21/1.3.6.1.4.1.9590.100.1.2.22/000000.dcm"
    masks = []
    for index, (top, left) in enumerate([(5, 5), (40, 30)], start=1):
        m = np.zeros(SHAPE, np.uint16)
        m[top : top + 4, left : left + 6] = 255
        roi_dir = nbia / f"Calc-Test_P_00002_RIGHT_MLO_{index}" / "08-29-2017-DDSM-2" / "1.000000-ROI-3"
        write_dicom(roi_dir / "1-1.dcm", np.ones((12, 12), np.uint16))  # the cropped ROI image
        write_dicom(roi_dir / "1-2.dcm", m)  # the full-size mask
        masks.append(f"Calc-Test_P_00002_RIGHT_MLO_{index}/1.3.6.1.4.1.9590.100.1.2.31/000000.dcm")
    _csv(
        src / "calc_case_description_test_set.csv",
        CBIS_CALC,
        [["P_00002", "2", "RIGHT", "MLO", str(i + 1), "calcification", "PLEOMORPHIC", "CLUSTERED", "3",
          pathology, "3", full2, "", masks[i]] for i, pathology in enumerate(["BENIGN_WITHOUT_CALLBACK", "BENIGN"])],
    )  # fmt: skip
    return src


def test_cbis_ddsm(cbis: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["prepare", "cbis-ddsm", str(cbis), "--out", str(out)]) == 0
    rows = _rows(out)
    assert set(rows) == {"Mass-Training_P_00001_LEFT_CC", "Calc-Test_P_00002_RIGHT_MLO"}
    a = rows["Mass-Training_P_00001_LEFT_CC"]
    assert (a["patient_id"], a["laterality"], a["view"], a["split"]) == ("P_00001", "L", "CC", "train")
    assert (a["benign_label"], a["malignant_label"], a["breast_malignant_label"]) == ("0", "1", "1")
    assert a["density"] == "3" and a["image_path"].endswith(
        "Mass-Training_P_00001_LEFT_CC/1.3.6.1.4.1.9590.100.1.2.11/1.3.6.1.4.1.9590.100.1.2.12/000000.dcm"
    )
    assert a["malignant_mask_path"].endswith(
        "_LEFT_CC_1/1.3.6.1.4.1.9590.100.1.2.11/1.3.6.1.4.1.9590.100.1.2.12/000000.dcm"
    )
    assert json.loads(a["boxes"]) == [{"label": "malignant", "box": [5, 10, 15, 20]}]
    b = rows["Calc-Test_P_00002_RIGHT_MLO"]
    assert b["image_path"].endswith("1.000000-full-24515/1-1.dcm")
    assert (b["benign_label"], b["malignant_label"], b["split"], b["density"]) == ("1", "0", "test", "2")
    merged = np.asarray(Image.open(b["benign_mask_path"]))
    assert merged.shape == SHAPE and int((merged > 0).sum()) == 48  # two 4x6 masks merged
    assert Path(b["benign_mask_path"]).is_relative_to(tmp_path / "out")  # written beside the manifest
    assert len(json.loads(b["boxes"])) == 2
    load_manifest(out / "manifest.csv", check_files=True)


# ------------------------------------------------------------------------------------------- VinDr
VINDR_BREAST = ["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
                "breast_birads", "breast_density", "split"]  # fmt: skip
VINDR_FINDING = [
    *VINDR_BREAST[:9],
    "finding_categories",
    "finding_birads",
    "xmin",
    "ymin",
    "xmax",
    "ymax",
    "split",
]


def test_vindr(tmp_path: Path) -> None:
    src = tmp_path / "vindr"
    rows = []
    for image, side, view, birads in [("i1", "L", "CC", "BI-RADS 1"), ("i2", "R", "MLO", "BI-RADS 4"),
                                      ("i3", "R", "CC", "BI-RADS 3"), ("i4", "L", "MLO", "BI-RADS 2")]:  # fmt: skip
        write_dicom(
            src / "images" / "s1" / f"{image}.dicom",
            synthetic_breast(SHAPE, side),
            laterality=side,
            view=view,
        )
        rows.append(["s1", "se1", image, side, view, "64", "48", birads, "DENSITY C", "training"])
    rows.append(["s1", "se1", "gone", "L", "CC", "64", "48", "BI-RADS 1", "DENSITY C", "test"])
    _csv(src / "breast-level_annotations.csv", VINDR_BREAST, rows)
    _csv(
        src / "finding_annotations.csv",
        VINDR_FINDING,
        [["s1", "se1", "i2", "R", "MLO", "64", "48", "BI-RADS 4", "DENSITY C", "['Mass']", "BI-RADS 4",
          "-1.5", "3", "20.25", "30", "training"],
         ["s1", "se1", "i1", "L", "CC", "64", "48", "BI-RADS 1", "DENSITY C", "['No Finding']", "", "", "", "", "",
          "training"]],
    )  # fmt: skip
    out = tmp_path / "vindr_out"
    assert main(["prepare", "vindr", str(src), "--out", str(out)]) == 0
    got = _rows(out)
    assert set(got) == {"i1", "i2", "i3", "i4"}
    labels = {
        k: (v["benign_label"], v["malignant_label"], v["breast_malignant_label"]) for k, v in got.items()
    }
    assert labels == {"i1": ("0", "0", "0"), "i2": ("", "1", "1"), "i3": ("1", "", ""), "i4": ("1", "0", "0")}
    assert json.loads(got["i2"]["boxes"]) == [
        {"label": "malignant", "box": [0.0, 3.0, 20.25, 30.0], "categories": ["Mass"]}
    ]
    assert got["i1"]["boxes"] == "" and got["i1"]["split"] == "train" and got["i1"]["density"] == "C"
    assert got["i2"]["patient_id"] == "s1" and got["i2"]["laterality"] == "R" and got["i2"]["view"] == "MLO"
    skipped = (out / "skipped.csv").read_text()
    assert "image not found" in skipped
    out3 = tmp_path / "vindr3_out"
    assert main(["prepare", "vindr", str(src), "--out", str(out3), "--birads3", "benign"]) == 0
    assert _rows(out3)["i3"]["malignant_label"] == "0"


# ------------------------------------------------------------------------------------------- RSNA
RSNA = ["site_id", "patient_id", "image_id", "laterality", "view", "age", "cancer", "biopsy", "invasive", "BIRADS",
        "implant", "density", "machine_id", "difficult_negative_case"]  # fmt: skip


def test_rsna(tmp_path: Path) -> None:
    src = tmp_path / "rsna"
    rows = []
    for image, side, view, cancer in [("10", "L", "CC", "0"), ("11", "L", "MLO", "0"), ("12", "R", "CC", "1"),
                                      ("13", "R", "AT", "1")]:  # fmt: skip
        write_dicom(src / "train_images" / "500" / f"{image}.dcm", synthetic_breast(SHAPE, side))
        rows.append(
            ["1", "500", image, side, view, "61", cancer, cancer, cancer, "", "0", "B", "49", "False"]
        )
    _csv(src / "train.csv", RSNA, rows)
    out = tmp_path / "rsna_out"
    assert main(["prepare", "rsna", str(src), "--out", str(out)]) == 0
    got = _rows(out)
    assert set(got) == {"10", "11", "12"}  # the AT view is skipped
    assert (got["10"]["malignant_label"], got["10"]["breast_malignant_label"]) == ("0", "0")
    assert (got["12"]["malignant_label"], got["12"]["breast_malignant_label"]) == ("", "1")
    assert got["12"]["benign_label"] == "" and got["12"]["breast_id"] == "500_R"
    assert "'AT' is not CC or MLO" in (out / "skipped.csv").read_text()


# ------------------------------------------------------------------------------------------- CMMD
def _view_code(code: str) -> list[Dataset]:
    item = Dataset()
    item.CodeValue = code
    item.CodingSchemeDesignator = "SCT"
    return [item]


@pytest.mark.parametrize("table_format", ["csv", "xlsx"])
def test_cmmd(tmp_path: Path, table_format: str) -> None:
    src = tmp_path / "cmmd"
    for patient, side, code, number in [("D1-0001", "L", "399162004", 1), ("D1-0001", "L", "399368009", 2),
                                        ("D1-0002", "R", "399162004", 1), ("D1-0002", "L", "399162004", 2)]:  # fmt: skip
        write_dicom(
            src / "CMMD" / patient / "1.3.6.1.4.1.9590.100.1.2.1" / "1.3.6.1.4.1.9590.100.1.2.2" / f"1-{number}.dcm",
            synthetic_breast(SHAPE, side), laterality=side, view=None, PatientID=patient,
            ViewCodeSequence=_view_code(code), StudyInstanceUID=f"1.2.{patient[-1]}",
        )  # fmt: skip
    header = ["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"]
    rows = [
        ["D1-0001", "L", "44", "2", "calcification", "Benign", ""],
        ["D1-0002", "R", "50", "1", "mass", "Malignant", "Luminal A"],
    ]
    if table_format == "csv":
        _csv(src / "CMMD_clinicaldata_revision.csv", header, rows)
    else:  # the sheet as TCIA distributes it
        import pandas as pd

        pd.DataFrame(rows, columns=header).to_excel(src / "CMMD_clinicaldata_revision.xlsx", index=False)
    out = tmp_path / "cmmd_out"
    assert main(["prepare", "cmmd", str(src), "--out", str(out)]) == 0
    got = list(_rows(out).values())
    assert len(got) == 4
    by = {(r["patient_id"], r["laterality"], r["view"]): r for r in got}
    benign_cc = by[("D1-0001", "L", "CC")]
    assert (
        benign_cc["breast_benign_label"],
        benign_cc["breast_malignant_label"],
        benign_cc["malignant_label"],
    ) == ("1", "0", "0")
    assert by[("D1-0001", "L", "MLO")]["exam_id"] == "1.2.1"
    malignant = by[("D1-0002", "R", "CC")]
    assert (
        malignant["breast_benign_label"],
        malignant["breast_malignant_label"],
        malignant["malignant_label"],
    ) == ("", "1", "")
    unlisted = by[("D1-0002", "L", "CC")]
    assert unlisted["breast_malignant_label"] == "" and unlisted["malignant_label"] == ""


# ------------------------------------------------------------------------------------------- INbreast
def test_inbreast(tmp_path: Path) -> None:
    src = tmp_path / "INbreast Release 1.0"
    files = {"22678622": ("61b13c59bcba149e", "R", "CC", "4b"), "22678646": ("61b13c59bcba149e", "R", "ML", "2"),
             "20586908": ("6bd34b8c2e8c4e4b", "L", "CC", "1")}  # fmt: skip
    for file_id, (case, side, view, _) in files.items():
        write_dicom(
            src / "AllDICOMs" / f"{file_id}_{case}_MG_{side}_{view}_ANON.dcm", synthetic_breast(SHAPE, side)
        )
    rows = [
        ["removed", "", side, view, "201001", file_id, "2", birads]
        for file_id, (_, side, view, birads) in files.items()
    ]
    rows += [["", "", "", "", "", "", "", ""], ["*Total", "", "", "", "", "", "", ""]]  # footer rows
    _csv(src / "INbreast.csv", ["Patient ID", "Patient age", "Laterality", "View", "Acquisition date", "File Name",
                                "ACR", "Bi-Rads"], rows, delimiter=";")  # fmt: skip
    (src / "AllXML").mkdir()
    roi = {"Name": "Mass", "Point_px": ["(10.5, 20)", "(30, 25.25)", "(12, 40)"]}
    with open(src / "AllXML" / "22678622.xml", "wb") as handle:
        plistlib.dump({"Images": [{"ROIs": [roi]}]}, handle)
    out = tmp_path / "inbreast_out"
    assert main(["prepare", "inbreast", str(src), "--out", str(out)]) == 0
    got = _rows(out)
    assert set(got) == set(files)
    assert (got["22678622"]["benign_label"], got["22678622"]["malignant_label"]) == ("", "1")
    assert (got["22678646"]["view"], got["22678646"]["benign_label"], got["22678646"]["malignant_label"]) == (
        "MLO",
        "1",
        "0",
    )
    assert (got["20586908"]["laterality"], got["20586908"]["malignant_label"]) == ("L", "0")
    assert got["22678622"]["patient_id"] == "61b13c59bcba149e" and got["22678622"]["birads"] == "4b"
    assert json.loads(got["22678622"]["boxes"]) == [{"label": "Mass", "box": [10.5, 20.0, 30.0, 40.0]}]
    mask = np.asarray(Image.open(got["22678622"]["malignant_mask_path"]))
    assert mask.shape == SHAPE and mask[28, 20] == 255 and mask[5, 5] == 0  # filled triangle
    assert Path(got["22678622"]["malignant_mask_path"]).is_relative_to(tmp_path)
    assert not Path(got["22678622"]["malignant_mask_path"]).is_relative_to(src)


def test_cbis_ddsm_no_masks(cbis: Path, tmp_path: Path) -> None:
    """--no-masks: the same rows and labels, no mask paths, nothing written under masks/."""
    with_masks, without = tmp_path / "a", tmp_path / "b"
    assert main(["prepare", "cbis-ddsm", str(cbis), "--out", str(with_masks)]) == 0
    assert main(["prepare", "cbis-ddsm", str(cbis), "--out", str(without), "--no-masks"]) == 0
    full, bare = _rows(with_masks), _rows(without)
    assert set(full) == set(bare)
    assert any(r["malignant_mask_path"] or r["benign_mask_path"] for r in full.values())
    assert (tmp_path / "a" / "masks").is_dir() and not (tmp_path / "b" / "masks").exists()
    for image_id, row in bare.items():
        assert row["benign_mask_path"] == row["malignant_mask_path"] == ""
        for key in ("benign_label", "malignant_label", "breast_malignant_label", "split", "image_path"):
            assert row[key] == full[image_id][key], key
    load_manifest(without / "manifest.csv", check_files=True)


def test_prepare_refuses_options_of_another_layout(
    cbis: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for flags, message in (
        (["--images", str(tmp_path)], "--images applies to nyu, not cbis-ddsm"),
        (["--birads3", "benign"], "--birads3 applies to vindr, not cbis-ddsm"),
    ):
        out = tmp_path / "x"
        assert main(["prepare", "cbis-ddsm", str(cbis), "--out", str(out), *flags]) == 2
        assert message in capsys.readouterr().err and not out.exists()
    assert main(["prepare", "vindr", str(cbis), "--out", str(tmp_path / "y"), "--no-masks"]) == 2
    assert "--no-masks applies to cbis-ddsm and inbreast, not vindr" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- NYU
def test_nyu_images_folder(tmp_path: Path) -> None:
    """--images: the PNGs come from that folder, not from beside the exam list (which holds decoys here)."""
    lists, pngs = tmp_path / "lists", tmp_path / "pngs"
    exams = [
        {"L-CC": ["0_L-CC"], "R-CC": ["0_R-CC"], "L-MLO": [], "R-MLO": ["0_R-MLO"], "horizontal_flip": "NO",
         "cancer_label": {"left_benign": 0, "left_malignant": 1, "right_benign": 1, "right_malignant": 0}},
    ]  # fmt: skip
    lists.mkdir()
    (lists / "exam_list.pkl").write_bytes(pickle.dumps(exams))
    for stem, side in (("0_L-CC", "L"), ("0_R-CC", "R")):  # 0_R-MLO is missing from --images
        pngs.mkdir(exist_ok=True)
        Image.fromarray(synthetic_breast(SHAPE, side)).save(pngs / f"{stem}.png")
        Image.fromarray(synthetic_breast(SHAPE, side)).save(lists / f"{stem}.png")  # decoy
    Image.fromarray(synthetic_breast(SHAPE, "R")).save(lists / "0_R-MLO.png")  # decoy only
    out = tmp_path / "out"
    assert (
        main(["prepare", "nyu", str(lists / "exam_list.pkl"), "--images", str(pngs), "--out", str(out)]) == 0
    )
    got = _rows(out)
    assert set(got) == {"0_L-CC", "0_R-CC"}
    for stem, row in got.items():
        assert Path(row["image_path"]) == (pngs / f"{stem}.png").resolve()
    assert (got["0_L-CC"]["malignant_label"], got["0_R-CC"]["benign_label"]) == ("1", "1")
    with open(out / "skipped.csv", newline="") as handle:
        assert list(csv.reader(handle))[1:] == [["exam 0 R-MLO", "image 0_R-MLO.png not found"]]
    # Without --images the PNGs beside the exam list are used.
    beside = tmp_path / "out2"
    assert main(["prepare", "nyu", str(lists / "exam_list.pkl"), "--out", str(beside)]) == 0
    assert {Path(r["image_path"]).parent for r in _rows(beside).values()} == {lists.resolve()}
    assert len(_rows(beside)) == 3


@pytest.mark.fixtures
def test_nyu_exam_list_from_official_fixture(fixtures_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "nyu"
    shutil.copytree(fixtures_dir / "images" / "original", src / "images")
    shutil.copy(fixtures_dir / "exam_lists" / "exam_list_before_cropping.pkl", src / "exam_list.pkl")
    out = tmp_path / "nyu_out"
    assert main(["prepare", "nyu", str(src / "exam_list.pkl"), "--out", str(out)]) == 0
    got = _rows(out)
    assert set(got) == {"0_L-CC", "0_R-CC", "0_L-MLO", "0_R-MLO", "1_R_CC", "2_L_CC"}
    assert (got["0_R-CC"]["benign_label"], got["0_R-CC"]["malignant_label"]) == ("1", "0")
    assert (got["0_L-MLO"]["benign_label"], got["0_L-MLO"]["breast_benign_label"]) == ("0", "0")
    assert got["1_R_CC"]["benign_label"] == "" and got["1_R_CC"]["laterality"] == "R"
    assert got["2_L_CC"]["exam_id"] == "exam2" and got["0_R-CC"]["horizontal_flip"] == "NO"
    # The stage outputs hold numpy scalars: refused, with a clear message.
    with pytest.raises(
        ManifestError, match=r"refusing to load numpy\.core\.multiarray\.scalar|refusing to load numpy"
    ):
        load_exam_list(fixtures_dir / "exam_lists" / "cropped_exam_list.pkl")


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo hacked",))


def test_exam_list_unpickler_refuses_code(tmp_path: Path) -> None:
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps([{"L-CC": ["x"], "payload": _Evil()}]))
    with pytest.raises(
        ManifestError, match=r"evil\.pkl: unsafe or invalid exam-list pickle: refusing to load posix\.system"
    ):
        load_exam_list(bad)
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(
        pickle.dumps([{"L-CC": ["a"], "cancer_label": {"left_malignant": 1}, "tags": {1, 2}}], protocol=2)
    )
    assert load_exam_list(ok)[0]["tags"] == {1, 2}
    notlist = tmp_path / "dict.pkl"
    notlist.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ManifestError, match="expected a list of exam dicts, got dict"):
        load_exam_list(notlist)


def test_unknown_dataset_and_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="unknown dataset 'ddsm'"):
        prepare("ddsm", tmp_path, tmp_path)
    with pytest.raises(ManifestError, match="source not found"):
        prepare("vindr", tmp_path / "none", tmp_path)
    with pytest.raises(ManifestError, match="no CBIS-DDSM case-description CSV"):
        prepare("cbis-ddsm", tmp_path, tmp_path)
