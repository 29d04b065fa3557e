"""Manifest loading/validation/saving: every bad row reported by line and reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mammogmic.data.manifest import COLUMNS, Manifest, load_manifest, save_manifest
from mammogmic.errors import ManifestError

HEADER = "image_id,image_path,patient_id,exam_id,laterality,view,benign_label,malignant_label,split,boxes\n"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_good_manifest_round_trip(tmp_path: Path) -> None:
    boxes = json.dumps([{"label": "malignant", "box": [1, 2, 30, 40]}]).replace('"', '""')
    path = _write(
        tmp_path / "m.csv",
        HEADER + f'a,imgs/a.png,p1,e1,L,CC,0,1,train,"{boxes}"\n' + "b,/abs/b é.png,p1,e1,right,mlo,,,,\n",
    )
    manifest = load_manifest(path)
    a, b = manifest.rows
    assert (a.laterality, a.view, a.breast_id, a.labels()) == ("L", "CC", "e1_L", (0, 1))
    assert a.boxes == [{"label": "malignant", "box": [1, 2, 30, 40]}] and a.split == "train"
    assert (b.laterality, b.view, b.labels(), b.split, b.horizontal_flip) == (
        "R",
        "MLO",
        (None, None),
        None,
        "NO",
    )
    assert manifest.resolve(a.image_path) == tmp_path / "imgs" / "a.png"
    assert manifest.resolve(b.image_path) == Path("/abs/b é.png")
    # Saving elsewhere rebases relative paths; reloading gives the same rows.
    out = save_manifest(manifest, tmp_path / "sub" / "copy.csv")
    again = load_manifest(out)
    assert again.resolve(again.rows[0].image_path) == (tmp_path / "imgs" / "a.png").resolve()
    assert [r.labels() for r in again] == [(0, 1), (None, None)]
    assert out.read_text(encoding="utf-8").splitlines()[0].split(",")[: len(COLUMNS)] == list(COLUMNS)


def test_every_bad_row_is_reported(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "bad.csv",
        HEADER
        + "a,a.png,p,e,L,CC,0,1,train,\n"  # line 2 ok
        + "a,b.png,p,e,L,CC,0,0,,\n"  # line 3 duplicate
        + "c,c.png,p,e,X,CC,,,,\n"  # line 4 laterality
        + "d,d.png,p,e,L,ML,2,yes,,\n"  # line 5 view + two labels
        + "e,,p,e,L,CC,,,holdout,\n"  # line 6 empty path + split
        + 'f,f.png,p,e,L,CC,,,,"[{""label"": ""x"", ""box"": [5, 1, 2, 3]}]"\n',  # line 7 box order
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    for expected in (
        "line 3: duplicate image_id 'a' (first on line 2)",
        "line 4: laterality must be L or R, got 'X'",
        "line 5: view must be CC or MLO, got 'ML'",
        "line 5: benign_label must be 0, 1 or empty, got '2'",
        "line 5: malignant_label must be 0, 1 or empty, got 'yes'",
        "line 6: image_path is empty",
        "line 6: split must be train, val, test or empty, got 'holdout'",
        "line 7: boxes[0].box has x_max < x_min",
    ):
        assert expected in message
    assert "line 2:" not in message and str(path) in message


def test_missing_columns_and_other_file_errors(tmp_path: Path) -> None:
    path = _write(tmp_path / "cols.csv", "image_id,image_path,patient_id\nx,x.png,p\n")
    with pytest.raises(ManifestError, match="missing required column\\(s\\): exam_id, laterality, view"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match="it is a directory"):
        load_manifest(tmp_path)
    empty = _write(tmp_path / "empty.csv", "")
    with pytest.raises(ManifestError, match="empty manifest"):
        load_manifest(empty)


def test_check_files_and_label_consistency(tmp_path: Path) -> None:
    (tmp_path / "here.png").write_bytes(b"x")
    path = _write(
        tmp_path / "m.csv",
        "image_id,image_path,patient_id,exam_id,laterality,view,malignant_label,breast_malignant_label\n"
        "a,here.png,p,e,L,CC,1,1\n"
        "b,gone.png,p,e,L,CC,,\n"
        "c,here.png,p,e,R,CC,1,0\n",
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(path, check_files=True)
    message = str(info.value)
    assert "line 3: image file not found" in message
    assert "line 4: malignant_label is 1 but breast_malignant_label is 0" in message
    assert isinstance(Manifest([], tmp_path).filter(split="train"), Manifest)


def test_unreadable_and_non_utf8_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    latin = tmp_path / "latin.csv"
    latin.write_bytes(HEADER.encode() + "a,\xe9.png,p,e,L,CC,,,,\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"latin\.csv: not a UTF-8 CSV file"):
        load_manifest(latin)
    locked = _write(tmp_path / "locked.csv", HEADER)
    real_open = open

    def fake_open(file: object, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if Path(str(file)) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", fake_open)
    with pytest.raises(ManifestError, match=r"locked\.csv: permission denied"):
        load_manifest(locked)
