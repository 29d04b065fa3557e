"""``mammogmic preprocess``: batch crop cache, errors.csv, resume, refusal to write into inputs."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from data_helpers import synthetic_breast, write_dicom
from PIL import Image

from mammogmic.cli.main import main
from mammogmic.data import crop_breast, read_image
from mammogmic.data.cache import PreprocessSettings, preprocess_manifest
from mammogmic.data.manifest import load_manifest
from mammogmic.errors import MammogmicError

SETTINGS = ["--crop-iterations", "3", "--buffer-size", "5", "--window-size", "64", "48", "--no-progress"]


def _breast_png(path: Path, side: str) -> Path:
    image = np.zeros((160, 120), np.uint16)
    block = synthetic_breast((130, 80), side)
    if side == "L":
        image[15:145, :80] = block
    else:
        image[15:145, 40:] = block
    Image.fromarray(image).save(path)
    return path


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    data = tmp_path / "input data ü"
    data.mkdir()
    _breast_png(data / "good L.png", "L")
    _breast_png(data / "good_R.png", "R")
    Image.fromarray(np.zeros((160, 120), np.uint16)).save(data / "black.png")
    (data / "empty.png").write_bytes(b"")
    (data / "folder.png").mkdir()
    mask = np.zeros((160, 120), np.uint8)
    mask[60:80, 20:40] = 255
    Image.fromarray(mask).save(data / "mask.png")
    # A DICOM stored mirrored: tags say L but the chest wall is on the right.
    mirrored = np.zeros((160, 120), np.uint16)
    mirrored[15:145, 40:] = synthetic_breast((130, 80), "R")
    write_dicom(data / "mirrored.dcm", mirrored, laterality="L", view="CC")
    rows = [
        "image_id,image_path,patient_id,exam_id,laterality,view,malignant_label,malignant_mask_path",
        "g1,good L.png,p,e,L,CC,1,mask.png",
        "g2,good_R.png,p,e,R,MLO,0,",
        "z,black.png,p,e,L,CC,,",
        "x,empty.png,p,e,L,CC,,",
        "d,folder.png,p,e,L,CC,,",
        "m,missing.png,p,e,L,CC,,",
        "flip,mirrored.dcm,p,e,L,CC,,",
    ]
    (data / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return data


def test_preprocess_batch_errors_and_resume(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    before = {p.name: p.stat().st_mtime_ns for p in dataset.iterdir()}
    code = main(["preprocess", str(dataset / "manifest.csv"), "--out", str(out), *SETTINGS])
    assert code == 3  # some images failed, the rest went through
    manifest = load_manifest(out / "manifest.csv")
    rows = {r.image_id: r for r in manifest}
    assert set(rows) == {"g1", "g2", "flip"}
    with open(out / "errors.csv", newline="", encoding="utf-8") as handle:
        errors = {r["image_id"]: r for r in csv.DictReader(handle)}
    assert set(errors) == {"z", "x", "d", "m"}
    # An all-black image is refused when read (io.py's contrast guard), before the crop looks for a breast.
    assert errors["z"]["stage"] == "read" and "no tissue contrast" in errors["z"]["reason"]
    assert errors["x"]["stage"] == "read" and "file is empty" in errors["x"]["reason"]
    assert "is a directory" in errors["d"]["reason"] and "file not found" in errors["m"]["reason"]
    # Cached crops equal the library crop, and the columns are filled.
    image, _ = read_image(dataset / "good L.png")
    info = crop_breast(image, "L-CC", iterations=3, buffer_size=5)
    g1 = rows["g1"]
    np.testing.assert_array_equal(np.load(manifest.resolve(g1.cached_path)), info.cropped)
    assert g1.window_location == list(info.window_location) and g1.best_center is not None
    cached_mask = np.load(manifest.resolve(g1.extra["cached_malignant_mask_path"]))
    assert cached_mask.shape == info.cropped.shape and cached_mask.sum() == 400
    assert (
        rows["flip"].horizontal_flip == "YES"
        and "chest wall on the right" in rows["flip"].extra["orientation_note"]
    )
    assert Path(g1.image_path).is_absolute()
    assert json.loads((out / "summary.json").read_text()) == {
        "total": 7,
        "processed": 3,
        "skipped": 0,
        "failed": 4,
    }
    preview = np.asarray(Image.open(out / "preview.png"))
    assert preview.ndim == 3 and (preview[..., 0] > preview[..., 1]).any()  # red window outlines drawn
    # The input folder is untouched.
    assert {p.name: p.stat().st_mtime_ns for p in dataset.iterdir()} == before

    # Rerun: everything good is skipped; a changed source is redone.
    again = preprocess_manifest(
        load_manifest(dataset / "manifest.csv"),
        out,
        settings=PreprocessSettings(iterations=3, buffer_size=5, window_shape=(64, 48)),
    )
    assert (again.skipped, again.processed, again.failed) == (3, 0, 4)
    _breast_png(dataset / "good_R.png", "R")  # rewritten: new mtime, same content -> hash says unchanged
    os.utime(dataset / "good_R.png", ns=(1, 1))
    third = preprocess_manifest(
        load_manifest(dataset / "manifest.csv"),
        out,
        settings=PreprocessSettings(iterations=3, buffer_size=5, window_shape=(64, 48)),
    )
    assert third.skipped == 3
    changed = np.zeros((160, 120), np.uint16)
    changed[20:150, 30:] = synthetic_breast((130, 90), "R")
    Image.fromarray(changed).save(dataset / "good_R.png")
    fourth = preprocess_manifest(
        load_manifest(dataset / "manifest.csv"),
        out,
        settings=PreprocessSettings(iterations=3, buffer_size=5, window_shape=(64, 48)),
    )
    assert (fourth.skipped, fourth.processed) == (2, 1)


def test_parallel_matches_serial(dataset: Path, tmp_path: Path) -> None:
    assert main(["preprocess", str(dataset / "manifest.csv"), "--out", str(tmp_path / "a"), *SETTINGS]) == 3
    assert (
        main(
            ["preprocess", str(dataset / "manifest.csv"), "--out", str(tmp_path / "b"), "-j", "2", *SETTINGS]
        )
        == 3
    )
    a = (tmp_path / "a" / "manifest.csv").read_text(encoding="utf-8")
    b = (tmp_path / "b" / "manifest.csv").read_text(encoding="utf-8")
    assert a == b


def test_refuses_to_write_into_input_folder(dataset: Path) -> None:
    manifest = load_manifest(dataset / "manifest.csv")
    with pytest.raises(MammogmicError, match="input folder"):
        preprocess_manifest(manifest, dataset / "cache here")
    assert main(["preprocess", str(dataset / "manifest.csv"), "--out", str(dataset), *SETTINGS]) == 2


def test_prepare_refuses_out_inside_source_and_existing(tmp_path: Path) -> None:
    source = tmp_path / "vindr"
    source.mkdir()
    assert main(["prepare", "vindr", str(source), "--out", str(source / "m")]) == 2
    assert not (source / "m").exists()
    existing = tmp_path / "m" / "manifest.csv"
    existing.parent.mkdir()
    existing.write_text("keep")
    assert main(["prepare", "vindr", str(source), "--out", str(existing.parent)]) == 2
    assert existing.read_text() == "keep"


def test_unexpected_error_in_one_image_does_not_stop_the_batch(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mammogmic.data.cache as cache

    real_crop = cache.crop_breast

    def flaky_crop(image: np.ndarray, view: str, *args: object, **kwargs: object) -> object:
        if view == "R-MLO":
            raise RuntimeError("simulated library failure")
        return real_crop(image, view, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cache, "crop_breast", flaky_crop)
    summary = preprocess_manifest(
        load_manifest(dataset / "manifest.csv"),
        tmp_path / "out",
        settings=PreprocessSettings(iterations=3, buffer_size=5, window_shape=(64, 48)),
    )
    assert (summary.processed, summary.failed) == (2, 5)
    with open(tmp_path / "out" / "errors.csv", newline="", encoding="utf-8") as handle:
        errors = {r["image_id"]: r for r in csv.DictReader(handle)}
    assert errors["g2"]["stage"] == "crop"
    assert "RuntimeError: simulated library failure" in errors["g2"]["reason"]
    assert "good_R.png" in errors["g2"]["reason"]


def test_relative_manifest_path_gives_a_manifest_usable_from_anywhere(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both the manifest and --out are given relative to the working folder, as typed on a command line.
    monkeypatch.chdir(tmp_path)
    assert main(["preprocess", f"{dataset.name}/manifest.csv", "--out", "prep", *SETTINGS]) == 3
    monkeypatch.chdir(dataset)  # any other folder: the output manifest must not depend on it
    manifest = load_manifest(tmp_path / "prep" / "manifest.csv")
    assert {r.image_id for r in manifest} == {"g1", "g2", "flip"}
    for row in manifest:
        assert Path(row.image_path).is_absolute()  # as docs/data.md says
        for value in (row.image_path, row.malignant_mask_path, row.cached_path):
            path = manifest.resolve(value)
            assert value is None or (path is not None and path.is_file()), (row.image_id, value)
    assert not Path(manifest.rows[0].cached_path or "").is_absolute()  # relative to the manifest's folder
    for name in ("summary.json", "preprocess.json"):
        json.loads((tmp_path / "prep" / name).read_text(), parse_constant=_reject_nan)


def _reject_nan(token: str) -> None:
    raise AssertionError(f"invalid JSON constant {token}")
