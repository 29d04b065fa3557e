"""``mammogmic predict`` on real-world inputs: a PACS export, a folder of bad files, ids that need care."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from mammogmic.cli.main import main
from mammogmic.data.synth.dicom import write_dicom
from mammogmic.data.synth.exam import generate_exam
from mammogmic.evaluation.outputs import escape_csv_text, unescape_csv_text

SIZE = (320, 240)


def _views(seed: int) -> dict[str, np.ndarray]:
    """The four synthetic views of one exam (12-bit, raw orientation), by ``L-CC``-style name."""
    return {name: image for name, image, _, _ in generate_exam(seed, SIZE)}


def _export_dicom(
    folder: Path, image: np.ndarray, view: str, patient: str, study: str, suffix: str = ".dcm"
) -> Path:
    """A DICOM named by its SOP Instance UID, as a PACS export writes it."""
    tmp = folder / "tmp.dcm"
    side, view_name = view.split("-")
    write_dicom(
        tmp,
        image,
        laterality=side,
        view=view_name,
        patient_id=patient,
        exam_id=study,
        image_id=f"{study}/{view}",
        pixel_mm=0.3,
        instance_number=1,
    )
    uid = str(pydicom.dcmread(tmp, stop_before_pixels=True).SOPInstanceUID)
    return tmp.rename(folder / f"{uid}{suffix}")


def _png(path: Path, array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> Path:
    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return path


def test_pacs_export_grouped_by_study_and_laterality(tmp_path: Path, tiny_model: Path, size_args) -> None:  # type: ignore[no-untyped-def]
    export = tmp_path / "export"
    export.mkdir()
    a, b = _views(0), _views(1)
    files = {
        "A L-CC": _export_dicom(export, a["L-CC"], "L-CC", "PAT-A", "study-a"),
        "A L-MLO": _export_dicom(export, a["L-MLO"], "L-MLO", "PAT-A", "study-a"),
        "A R-CC": _export_dicom(export, a["R-CC"], "R-CC", "PAT-A", "study-a"),
        "B R-MLO": _export_dicom(export, b["R-MLO"], "R-MLO", "PAT-B", "study-b", suffix=""),  # no extension
    }
    out = tmp_path / "out"
    assert main(["predict", str(export), "--model", str(tiny_model), "--out", str(out), *size_args]) == 0
    images = pd.read_csv(out / "image_predictions.csv", dtype={"exam_id": str, "patient_id": str})
    assert len(images) == 4
    by_path = images.set_index("path")
    study = {k: str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for k, p in files.items()}
    for key, path in files.items():
        row = by_path.loc[str(path)]
        assert row["image_id"] == path.name.removesuffix(".dcm")  # the SOP Instance UID, dots kept
        assert (row["laterality"], row["view"]) == tuple(key.split()[1].split("-"))
        assert row["exam_id"] == study[key] and row["patient_id"] == f"PAT-{key[0]}"
        assert row["breast_id"] == f"{study[key]}_{row['laterality']}"
    breasts = pd.read_csv(out / "breast_predictions.csv", dtype=str)
    exams = pd.read_csv(out / "exam_summary.csv", dtype=str)
    assert len(breasts) == 3 and len(exams) == 2
    assert set(exams["exam_id"]) == {study["A L-CC"], study["B R-MLO"]}
    assert dict(zip(exams["exam_id"], exams["patient_id"], strict=True)) == {
        study["A L-CC"]: "PAT-A",
        study["B R-MLO"]: "PAT-B",
    }
    two_view = breasts.set_index("breast_id").loc[f"{study['A L-CC']}_L"]
    assert (two_view["n_images"], two_view["n_views"]) == ("2", "2")
    for col in ("malignant_pred", "benign_pred"):
        views = by_path.loc[[str(files["A L-CC"]), str(files["A L-MLO"])], col]
        assert float(two_view[col]) == pytest.approx(views.mean(), abs=2e-6)
    exam_a = exams.set_index("exam_id").loc[study["A L-CC"]]
    breasts_a = breasts[breasts["exam_id"] == study["A L-CC"]]
    assert exam_a["n_breasts"] == "2"
    assert float(exam_a["malignant_pred"]) == pytest.approx(breasts_a["malignant_pred"].astype(float).max())


def _bad_inputs(scans: Path, tmp_path: Path) -> dict[str, str]:
    """Write one file per kind of bad input; returns image id -> what its errors.csv reason must say."""
    good_png = io.BytesIO()
    Image.fromarray(_views(5)["L-CC"]).save(good_png, format="PNG")
    good_dcm = tmp_path / "template.dcm"
    write_dicom(
        good_dcm,
        _views(5)["R-CC"],
        laterality="R",
        view="CC",
        patient_id="X",
        exam_id="x",
        image_id="x",
        pixel_mm=0.3,
        instance_number=1,
    )
    expected: dict[str, str] = {}

    def add(name: str, reason: str) -> Path:
        expected[Path(name).stem] = reason
        return scans / name

    white = pydicom.dcmread(good_dcm)
    white.BitsStored, white.HighBit = 16, 15
    white.PixelData = np.full(SIZE, 65535, "<u2").tobytes()
    white.save_as(add("white_L-CC.dcm", "every pixel has the value 65535: no tissue contrast"))
    add("folder_L-MLO.png", "is a directory, expected an image file").mkdir()
    add("gone_R-CC.png", "dangling symbolic link").symlink_to(scans / "deleted.png")
    add("gz_R-MLO.dcm", "this is a gzip file, not a DICOM file").write_bytes(
        gzip.compress(good_dcm.read_bytes())
    )
    os.mkfifo(add("pipe_L-CC.png", "is a named pipe (FIFO)"))
    add("zero_R-CC.dcm", "is a character device").symlink_to("/dev/zero")
    # A symlink loop once crashed the inputs-vs-outputs check (Path.resolve raises on Python 3.11).
    add("loop_L-MLO.png", "cannot be followed").symlink_to(scans / "loop2_L-MLO.png")
    (scans / "loop2_L-MLO.png").symlink_to(scans / "loop_L-MLO.png")
    expected["loop2_L-MLO"] = "cannot be followed"
    add("cut_L-CC.png", "truncated or corrupt PNG").write_bytes(good_png.getvalue()[:3000])
    data = good_dcm.read_bytes()
    add("cut_R-MLO.dcm", "truncated DICOM: the pixel data is").write_bytes(data[: len(data) - 5000])
    add("empty_L-MLO.dcm", "file is empty (0 bytes)").write_bytes(b"")
    add("nopix_L-CC.dcm", "DICOM has no pixel data").write_bytes(data[: data.index(b"\xe0\x7f\x10\x00")])
    header = good_png.getvalue()
    add("flat_R-CC.png", "PNG header says the image is 0x0 pixels").write_bytes(
        header[:16] + b"\0" * 8 + header[24:]  # IHDR width and height zeroed (the CRC no longer matters)
    )
    add("bomb_L-MLO.png", "PNG header claims 100000x100000 pixels").write_bytes(
        header[:16] + (100_000).to_bytes(4, "big") * 2 + header[24:]
    )
    add("text_R-MLO.png", "this is a text file, not a PNG image").write_text("patient list\nA,B\n")
    _png(
        add("jpeg_L-CC.png", "this is a JPEG image, not a PNG image"),
        np.zeros((64, 48), np.uint8),
        fmt="JPEG",
    )
    _png(add("rgb_R-CC.png", "PNG colour model is RGB colour"), np.zeros((64, 48, 3), np.uint8))
    palette = Image.fromarray((_views(5)["L-MLO"] // 16).astype(np.uint8)).convert("P")
    palette.save(add("palette_L-MLO.png", "PNG colour model is palette (indexed colour)"))
    _png(add("alpha_R-MLO.png", "PNG colour model is grey+alpha"), np.zeros((64, 48, 2), np.uint8), mode="LA")
    _png(add("black_L-CC.png", "every pixel has the value 0"), np.zeros(SIZE, np.uint8))
    if os.geteuid() != 0:  # root reads anything
        locked = add("locked_R-CC.png", "permission denied")
        locked.write_bytes(good_png.getvalue())
        locked.chmod(0)
    return expected


def test_mixed_folder_good_and_bad_inputs(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    tiny_model: Path,
    size_args,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    views = _views(3)
    _png(scans / "good_L-CC.png", views["L-CC"])
    _png(scans / "good_R-MLO.png", views["R-MLO"])
    write_dicom(
        scans / "1.2.826.0.1.9.dcm",  # laterality and view from the tags only
        views["R-CC"],
        laterality="R",
        view="CC",
        patient_id="P",
        exam_id="e3",
        image_id="g3",
        pixel_mm=0.3,
        instance_number=1,
    )
    _png(scans / "misnamed_L-MLO.dcm", views["L-MLO"])  # a PNG named .dcm: read as PNG, with a warning
    expected = _bad_inputs(scans, tmp_path)
    manifest = tmp_path / "manifest.csv"
    passwd = Path("/etc/passwd") if Path("/etc/passwd").is_file() else scans / "passwd"
    if not passwd.exists():
        passwd.write_text("root:x:0:0:root:/root:/bin/sh\n")
    pd.DataFrame(
        [
            {
                "image_id": "passwd",
                "image_path": str(passwd),
                "patient_id": "p",
                "exam_id": "m",
                "laterality": "L",
                "view": "CC",
            },
            {
                "image_id": "missing",
                "image_path": "nowhere.png",
                "patient_id": "p",
                "exam_id": "m",
                "laterality": "R",
                "view": "CC",
            },
        ]
    ).to_csv(manifest, index=False)
    expected["passwd"] = "this is a text file, not a PNG or DICOM image"
    expected["missing"] = "file not found"
    assert len(expected) >= 20 - (os.geteuid() == 0)

    def snapshot() -> dict[str, object]:
        out: dict[str, object] = {}
        for p in sorted(scans.rglob("*")):
            mode = os.lstat(p).st_mode
            out[p.name] = p.read_bytes() if stat.S_ISREG(mode) else stat.S_IFMT(mode)
        return out

    before = snapshot()
    out = tmp_path / "out"
    rc = main(
        [
            "predict",
            str(scans),
            "--manifest",
            str(manifest),
            "--model",
            str(tiny_model),
            "--out",
            str(out),
            *size_args,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err and "Traceback" not in caplog.text
    assert "misnamed_L-MLO.dcm: named .dcm but this is a PNG image; reading it as PNG" in caplog.text

    preds = pd.read_csv(out / "image_predictions.csv", dtype=str).set_index("image_id")
    assert set(preds.index) == {"good_L-CC", "good_R-MLO", "1.2.826.0.1.9", "misnamed_L-MLO"}
    assert preds.loc["good_L-CC", ["laterality", "view"]].tolist() == ["L", "CC"]
    assert preds.loc["good_R-MLO", ["laterality", "view"]].tolist() == ["R", "MLO"]
    assert preds.loc["1.2.826.0.1.9", ["laterality", "view"]].tolist() == ["R", "CC"]
    assert preds.loc["misnamed_L-MLO", ["laterality", "view"]].tolist() == ["L", "MLO"]

    errors = pd.read_csv(out / "errors.csv", dtype=str)
    assert errors["image_id"].is_unique and set(errors["image_id"]) == set(expected)  # each input once
    assert not set(errors["image_id"]) & set(preds.index)
    for _, row in errors.iterrows():
        assert row["stage"] == "read", row
        assert expected[row["image_id"]] in row["error"], row
        assert row["error"].startswith(row["path"]), row  # the message names its file first

    run = json.loads((out / "run.json").read_text())
    assert run["n_inputs"] == run["n_run"] == len(expected) + 4
    assert run["n_run"] == run["n_predicted_now"] + run["n_errors"]
    assert (run["n_predicted_now"], run["n_errors"], run["n_already_predicted"]) == (4, len(expected), 0)
    assert snapshot() == before  # inputs untouched: same bytes, the FIFO and links still there
    assert stat.S_ISFIFO(os.lstat(scans / "pipe_L-CC.png").st_mode)
    if (scans / "locked_R-CC.png").exists():
        (scans / "locked_R-CC.png").chmod(0o644)


def test_csv_cells_escaped_ids_keep_unicode_and_read_back(  # type: ignore[no-untyped-def]
    tmp_path: Path, tiny_model: Path, size_args
) -> None:
    views = _views(4)
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    ids = {"L-CC": "bon image été", "R-CC": '=HYPERLINK("http://x")', "L-MLO": "-1+2", "R-MLO": "@sum"}
    for i, (view, image_id) in enumerate(ids.items()):
        _png(data / f"v{i}.png", views[view])
        side, view_name = view.split("-")
        rows.append(
            {
                "image_id": image_id,
                "image_path": f"v{i}.png",
                "patient_id": "+33 1 23",
                "exam_id": "=exam" if side == "L" else "-7",
                "laterality": side,
                "view": view_name,
                "malignant_label": i % 2,
            }
        )
    manifest = data / "m.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    out = tmp_path / "out"
    old_umask = os.umask(0o022)
    try:
        args = [
            "predict",
            "--manifest",
            str(manifest),
            "--model",
            str(tiny_model),
            "--out",
            str(out),
            *size_args,
        ]
        assert main([*args, "--save-saliency"]) == 0
    finally:
        os.umask(old_umask)
    for path in out.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    raw = pd.read_csv(out / "image_predictions.csv", dtype=str, keep_default_na=False)
    assert set(raw["image_id"]) == {"bon image été", '\'=HYPERLINK("http://x")', "'-1+2", "'@sum"}
    assert set(raw["patient_id"]) == {"'+33 1 23"}
    assert set(raw["exam_id"]) == {"'=exam", "-7"}  # "-7" is a number, not a formula: left alone
    assert pd.to_numeric(raw["malignant_pred"]).between(0, 1).all()
    breasts = pd.read_csv(out / "breast_predictions.csv", dtype=str)
    assert set(breasts["breast_id"]) == {"'=exam_L", "'-7_R"}
    saliency = sorted(p.name for p in (out / "saliency").iterdir())
    assert all(p.isascii() and "/" not in p for p in saliency) and len(saliency) == 4
    # A rerun reads the escaped ids back as the originals and skips them all.
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["n_already_predicted"], run["n_run"], run["n_predicted"]) == (4, 0, 4)
    # `mammogmic evaluate` groups the escaped ids consistently.
    assert main(["evaluate", str(out / "image_predictions.csv"), "--label", "malignant_label",
                 "--scores", "malignant_pred", "--group", "exam", "--bootstrap", "0"]) == 0  # fmt: skip


@pytest.mark.parametrize(
    "text", ["=1+1", "+x", "-x", "@x", "\tx", "\rx", "'=x", "''+x", "x=1", "-0.5", "'-0.5", ""]
)
def test_escape_round_trip(text: str) -> None:
    escaped = escape_csv_text(text)
    assert unescape_csv_text(escaped) == text
    core = escaped.lstrip("'")
    assert escaped == text or escaped.startswith("'")
    if core[:1] in ("=", "+", "-", "@", "\t", "\r") and text not in ("-0.5", "'-0.5"):
        assert escaped.startswith("'")
    assert escape_csv_text(-0.5) == -0.5


def test_same_file_given_twice_is_predicted_once(tmp_path: Path, tiny_model: Path, size_args) -> None:  # type: ignore[no-untyped-def]
    scans = tmp_path / "scans"
    scans.mkdir()
    good = _png(scans / "0_L-CC.png", _views(6)["L-CC"])
    out = tmp_path / "out"
    args = [
        "predict",
        str(scans),
        str(good),
        str(scans),
        "--model",
        str(tiny_model),
        "--out",
        str(out),
        *size_args,
    ]
    assert main(args) == 0
    preds = pd.read_csv(out / "image_predictions.csv", dtype=str)
    assert preds["image_id"].tolist() == ["0_L-CC"]
    run = json.loads((out / "run.json").read_text())
    assert (run["n_inputs"], run["n_predicted_now"], run["n_errors"]) == (1, 1, 0)
