"""PredictionWriter without a model: reruns merge old and new rows by string ids."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from mammogmic.evaluation.inference import ImageItem, ImageResult
from mammogmic.evaluation.outputs import PredictionWriter


def _result(image_id: str, view: str, malignant: float) -> ImageResult:
    item = ImageItem(image_id=image_id, path=Path(f"/in/{image_id}.png"), malignant_label=1.0)
    return ImageResult(item=item, view=view, benign=0.1, malignant=malignant)


def test_rerun_merges_numeric_looking_ids(tmp_path: Path) -> None:
    first = PredictionWriter(tmp_path)
    first.add_result(_result("7_L-CC", "L-CC", 0.2))
    first.add_result(_result("007_L-CC", "L-CC", 0.4))
    first.finish({})
    again = PredictionWriter(tmp_path)
    assert again.done_ids == {"7_L-CC", "007_L-CC"}
    again.add_result(_result("7_R-CC", "R-CC", 0.9))  # new breast of the exam "7" read back from CSV
    again.finish({})
    exams = pd.read_csv(tmp_path / "exam_summary.csv", dtype=str).set_index("exam_id")
    assert sorted(exams.index) == ["007", "7"]  # "007" is not 7, and old and new "7" rows are one exam
    assert exams.loc["7", "n_breasts"] == "2"
    assert math.isclose(float(exams.loc["7", "malignant_pred"]), 0.9)
    wide = pd.read_csv(tmp_path / "breast_predictions_metarepository.csv", dtype=str).set_index("index")
    assert math.isclose(float(wide.loc["7", "left_malignant"]), 0.2)
    assert math.isclose(float(wide.loc["7", "right_malignant"]), 0.9)
    assert pd.read_csv(tmp_path / "errors.csv").empty


def test_file_stem_keeps_files_inside_the_output() -> None:
    from mammogmic.evaluation.outputs import file_stem

    assert file_stem("0_L-CC") == "0_L-CC"
    risky = ["../../etc/passwd", "a/b", "x y", "..", ".hidden", ""]
    stems = [file_stem(i) for i in risky]
    assert all("/" not in s and ".." not in s and s and not s.startswith(".") for s in stems)
    assert len(set(stems)) == len(stems)
    assert file_stem("a/b") != file_stem("a_b")
