from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from mammogmic.data.synth import SynthConfig, generate_dataset
from mammogmic.errors import ConfigError, MammogmicError

SIZE = (192, 128)


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _outside_boxes(mask: np.ndarray, boxes: list[list[int]]) -> np.ndarray:
    """Mask pixels covered by none of the ``[x0, y0, x1, y1]`` boxes (all boxes cleared from one copy)."""
    outside = mask.astype(bool)
    for x0, y0, x1, y1 in boxes:
        outside[y0:y1, x0:x1] = False
    return outside


def test_outside_boxes_checks_every_box() -> None:
    """The generator draws at most one finding per class and breast, so the dataset test alone never has two
    boxes of a class: a hand-made case where the first lesion leaks out of its box (the last one does not)."""
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[1:3, 1:3] = 255
    mask[6:8, 6:8] = 255
    boxes = [[1, 1, 2, 3], [6, 6, 8, 8]]  # the first box misses column 2 of the first lesion
    assert _outside_boxes(mask, boxes).sum() == 2
    assert not _outside_boxes(mask, [[1, 1, 3, 3], [6, 6, 8, 8]]).any()


def test_labels_match_masks(small_dataset: Path) -> None:
    rows = _rows(small_dataset)
    root = small_dataset.parent
    assert len(rows) == 32 and len({r["image_id"] for r in rows}) == 32
    breast: dict[str, dict[str, int]] = {}
    for r in rows:
        image = cv2.imread(str(root / r["image_path"]), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint16 and image.shape == (256, 160) and image.max() <= 4095
        boxes = json.loads(r["boxes"])
        for cls in ("benign", "malignant"):
            mask = cv2.imread(str(root / r[f"{cls}_mask_path"]), cv2.IMREAD_UNCHANGED)
            assert mask.shape == image.shape
            assert Path(r[f"{cls}_mask_path"]).name == f"{r['image_id']}_{cls}.png"
            assert int(r[f"{cls}_label"]) == int(mask.any())
            b = breast.setdefault(r["breast_id"], {"benign": 0, "malignant": 0})
            b[cls] |= int(mask.any())
            cls_boxes = [x["box"] for x in boxes if x["label"] == cls]
            assert bool(cls_boxes) == bool(mask.any())
            for x0, y0, x1, y1 in cls_boxes:
                assert mask[y0:y1, x0:x1].any()
            assert not _outside_boxes(mask, cls_boxes).any(), (
                f"{r['image_id']}: {cls} pixels outside every box"
            )
    for r in rows:
        for cls in ("benign", "malignant"):
            assert int(r[f"breast_{cls}_label"]) == breast[r["breast_id"]][cls]
    # the demo preset gives all three kinds of image
    mal = sum(int(r["malignant_label"]) for r in rows)
    ben = sum(int(r["benign_label"]) for r in rows)
    assert mal > 0 and ben > 0 and mal + ben < 2 * len(rows)


def test_manifest_loads_with_project_loader(small_dataset: Path) -> None:
    from mammogmic.data.manifest import load_manifest

    m = load_manifest(small_dataset, check_files=True)
    assert len(m.rows) == 32
    # the header is the manifest's own columns in the manifest's order (one list), plus the density extra
    from mammogmic.data.manifest import COLUMNS

    with small_dataset.open(newline="") as f:
        header = next(csv.reader(f))
    known = [c for c in header if c != "density"]
    assert known == [c for c in COLUMNS if c in known] and set(known) <= set(COLUMNS)
    assert {"image_id", "image_path", "malignant_mask_path", "split", "dataset"} <= set(known)
    assert all(r.extra.get("density") for r in m.rows)
    assert {r.view for r in m.rows} == {"CC", "MLO"} and {r.laterality for r in m.rows} == {"L", "R"}


def test_split_is_exam_level_and_complete(small_dataset: Path) -> None:
    rows = _rows(small_dataset)
    by_exam: dict[str, set[str]] = {}
    for r in rows:
        by_exam.setdefault(r["exam_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_exam.values())
    assert {s for v in by_exam.values() for s in v} <= {"train", "val", "test"}
    counts = [sum(v == {s} for v in by_exam.values()) for s in ("train", "val", "test")]
    assert counts[0] >= 4 and sum(counts) == 8


def test_dicom_tags(small_dataset: Path) -> None:
    import pydicom

    root = small_dataset.parent
    rows = _rows(root / "manifest_dicom.csv")
    png_rows = {r["image_id"]: r for r in _rows(small_dataset)}
    codes = {"CC": "399162004", "MLO": "399368009"}
    for r in rows[:8]:
        assert r["image_path"].endswith(".dcm")
        ds = pydicom.dcmread(root / r["image_path"])
        assert ds.Modality == "MG"
        assert ds.ImageLaterality == r["laterality"]
        assert ds.ViewPosition == r["view"]
        assert ds.ViewCodeSequence[0].CodeValue == codes[r["view"]]
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert ds.BitsStored == 12 and ds.PatientID == r["patient_id"]
        png = cv2.imread(str(root / png_rows[r["image_id"]]["image_path"]), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(ds.pixel_array, png)


def test_project_reader_reads_the_dicoms(small_dataset: Path) -> None:
    from mammogmic.data import read_image

    root = small_dataset.parent
    for r in _rows(root / "manifest_dicom.csv")[:4]:
        pixels, meta = read_image(root / r["image_path"])
        assert (meta.laterality, meta.view) == (r["laterality"], r["view"])
        png = cv2.imread(str(root / r["image_path"].replace("dicom/", "images/").replace(".dcm", ".png")), -1)
        assert np.array_equal(pixels, png)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "synth.json"
    }


def test_identical_bytes_whatever_the_worker_count(tmp_path: Path) -> None:
    cfg = SynthConfig.demo()
    a = generate_dataset(tmp_path / "a", 3, SIZE, seed=4, config=cfg, workers=1, dicom=True).parent
    b = generate_dataset(tmp_path / "b", 3, SIZE, seed=4, config=cfg, workers=2, dicom=True).parent
    c = generate_dataset(tmp_path / "c", 3, SIZE, seed=5, config=cfg, workers=1).parent
    ta, tb = _tree(a), _tree(b)
    assert len(ta) == 3 * 4 * 4 + 3  # png + 2 masks + dcm per image, 3 CSVs
    assert ta == tb
    assert ta["images/synth000000_L-CC.png"] != _tree(c)["images/synth000000_L-CC.png"]


def test_refuses_to_overwrite_and_validates_arguments(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "x", 1, SIZE, seed=0)
    with pytest.raises(MammogmicError, match="already exists"):
        generate_dataset(tmp_path / "x", 1, SIZE, seed=0)
    generate_dataset(tmp_path / "x", 1, SIZE, seed=0, overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(MammogmicError, match="other files.*notes.txt"):
        generate_dataset(tmp_path / "mine", 1, SIZE, seed=0)
    assert not (tmp_path / "mine" / "images").exists()
    with pytest.raises(ConfigError, match="^n_exams:"):
        generate_dataset(tmp_path / "y", 0, SIZE)
    with pytest.raises(ConfigError, match="^workers:"):
        generate_dataset(tmp_path / "y", 1, SIZE, workers=0)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mammogmic.cli.main import main

    out = tmp_path / "cli"
    rc = main(
        [
            "synth",
            "--out",
            str(out),
            "--exams",
            "2",
            "--image-size",
            "192",
            "128",
            "--preset",
            "demo",
            "--seed",
            "3",
        ]
    )
    assert rc == 0
    assert (out / "manifest.csv").exists() and (out / "preview.png").exists()
    summary = json.loads((out / "synth.json").read_text())
    assert summary["n_images"] == 8 and summary["size"] == [192, 128]
    assert "manifest:" in capsys.readouterr().out
    assert main(["synth", "--out", str(tmp_path / "bad"), "--exams", "1", "--malignant-rate", "3"]) == 2
    assert "malignant_rate" in capsys.readouterr().err
