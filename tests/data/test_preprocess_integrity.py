"""``mammogmic preprocess`` output folders: ours or new, one writer, a cache keyed on what made it."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from data_helpers import synthetic_breast
from PIL import Image

import mammogmic.data.cache as cache
from mammogmic._outdir import OutputFolder, OutputLayout
from mammogmic.cli.main import main
from mammogmic.data.cache import PreprocessSettings, preprocess_manifest
from mammogmic.data.manifest import load_manifest

SETTINGS = ["--crop-iterations", "3", "--buffer-size", "5", "--window-size", "64", "48", "--no-progress"]
FAST = PreprocessSettings(iterations=3, buffer_size=5, window_shape=(64, 48))


def _image(path: Path, side: str, value: int = 3000) -> None:
    image = np.zeros((160, 120), np.uint16)
    block = synthetic_breast((130, 80), side, value=value)
    if side == "L":
        image[15:145, :80] = block
    else:
        image[15:145, 40:] = block
    Image.fromarray(image).save(path)


def _mask(path: Path, rows: slice) -> None:
    mask = np.zeros((160, 120), np.uint8)
    mask[rows, 20:40] = 255
    Image.fromarray(mask).save(path)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    _image(folder / "a.png", "L")
    _image(folder / "b.png", "R")
    _mask(folder / "a_mask.png", slice(60, 80))
    _write_manifest(folder, view_b="CC")
    return folder


def _write_manifest(folder: Path, view_b: str) -> None:
    (folder / "manifest.csv").write_text(
        "image_id,image_path,patient_id,exam_id,laterality,view,malignant_mask_path\n"
        "a,a.png,p,e,L,CC,a_mask.png\n"
        f"b,b.png,p,e,R,{view_b},\n",
        encoding="utf-8",
    )


def _run(data: Path, out: Path) -> cache.PreprocessSummary:
    return preprocess_manifest(load_manifest(data / "manifest.csv"), out, settings=FAST)


def test_user_files_are_never_overwritten(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.csv").write_bytes(b"my,own\nmanifest,1\n")
    (mine / "summary.json").write_bytes(b'{"mine": true}')
    for extra in ([], ["--force"]):
        assert main(["preprocess", str(data / "manifest.csv"), "--out", str(mine), *SETTINGS, *extra]) == 2
        err = capsys.readouterr().err
        assert "manifest.csv, summary.json were not written by 'mammogmic preprocess'" in err
        assert (mine / "manifest.csv").read_bytes() == b"my,own\nmanifest,1\n"
        assert (mine / "summary.json").read_bytes() == b'{"mine": true}'
        assert not (mine / "cache").exists()

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_bytes(b"keep me")
    assert main(["preprocess", str(data / "manifest.csv"), "--out", str(notes), *SETTINGS]) == 2
    assert "notes.txt" in capsys.readouterr().err and not (notes / "cache").exists()
    assert main(["preprocess", str(data / "manifest.csv"), "--out", str(notes), *SETTINGS, "--force"]) == 0
    assert (notes / "notes.txt").read_bytes() == b"keep me"
    assert {r.image_id for r in load_manifest(notes / "manifest.csv")} == {"a", "b"}

    predicted = tmp_path / "predicted"  # a folder of another command
    with OutputFolder(predicted, OutputLayout("predict", frozenset({"run.json"}))) as folder:
        folder.claim("run.json")
        (predicted / "run.json").write_text("{}")
    assert main(["preprocess", str(data / "manifest.csv"), "--out", str(predicted), *SETTINGS]) == 2
    assert "holds the outputs of 'mammogmic predict'" in capsys.readouterr().err


def test_one_writer_at_a_time(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "prep"
    holder = OutputFolder(out, cache.PREPROCESS_LAYOUT)  # another preprocess run, still busy
    holder.__enter__()
    try:
        assert main(["preprocess", str(data / "manifest.csv"), "--out", str(out), *SETTINGS]) == 2
        assert "another mammogmic run" in capsys.readouterr().err
        assert not (out / "manifest.csv").exists()
        threading.Timer(1.0, holder.__exit__, (None, None, None)).start()
        assert main(["preprocess", str(data / "manifest.csv"), "--out", str(out), *SETTINGS, "--wait"]) == 0
    finally:
        holder.__exit__(None, None, None)
    assert {r.image_id for r in load_manifest(out / "manifest.csv")} == {"a", "b"}


def test_cache_keyed_on_manifest_fields_masks_and_settings(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    assert _run(data, out).processed == 2
    assert _run(data, out).skipped == 2
    _write_manifest(data, view_b="MLO")  # same pixels, another view: the crop depends on it
    again = _run(data, out)
    assert (again.processed, again.skipped) == (1, 1)
    assert {r.image_id: r.view for r in load_manifest(out / "manifest.csv")}["b"] == "MLO"
    _mask(data / "a_mask.png", slice(90, 100))  # a mask redrawn
    again = _run(data, out)
    assert (again.processed, again.skipped) == (1, 1)
    row = {r.image_id: r for r in load_manifest(out / "manifest.csv")}["a"]
    cached_mask = np.load(out / row.extra["cached_malignant_mask_path"])
    assert cached_mask.sum() == 10 * 20  # the new mask, not the first one (20 x 20)
    other = preprocess_manifest(
        load_manifest(data / "manifest.csv"),
        out,
        settings=PreprocessSettings(iterations=4, buffer_size=5, window_shape=(64, 48)),
    )
    assert (other.processed, other.skipped) == (2, 0)


def test_interrupted_run_leaves_no_stale_manifest(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "prep"
    assert _run(data, out).processed == 2
    _image(data / "a.png", "L", value=5000)  # both sources change; the run stops after the first
    _image(data / "b.png", "R", value=5000)
    real_crop = cache.crop_breast
    calls: list[str] = []

    def crop_then_stop(image: np.ndarray, view: str, *args: object, **kwargs: object) -> object:
        calls.append(view)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_crop(image, view, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cache, "crop_breast", crop_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _run(data, out)
    monkeypatch.undo()
    # No manifest that would pair the first run's centres with this run's crops; the journal resumes.
    assert not (out / "manifest.csv").exists() and not (out / "summary.json").exists()
    with open(out / "progress.jsonl", "ab") as journal:
        journal.write(b'{"image_id": "b", "rec')  # a line cut by a kill
    resumed = _run(data, out)
    assert (resumed.skipped, resumed.processed) == (1, 1)
    assert json.loads((out / "summary.json").read_text())["processed"] == 1
    rows = {r.image_id: r for r in load_manifest(out / "manifest.csv")}
    for image_id in ("a", "b"):
        assert rows[image_id].source_sha256 == cache.sha256_file(data / f"{image_id}.png")
    lines = (out / "progress.jsonl").read_text().splitlines()
    assert lines[-2] == '{"image_id": "b", "rec' and json.loads(lines[-1])["image_id"] == "b"
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
