"""Breast- and exam-level aggregation on a hand-made table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mammogmic.evaluation.aggregation import (
    breast_level,
    exam_level,
    infer_image_fields,
    metarepository_breast_table,
)


def _images() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_index": ["0_L-CC", "0_L-MLO", "0_R-CC", "0_R-MLO", "0_R-MLO_2", "1_L-CC", "1_R-MLO"],
            "benign_pred": [0.1, 0.3, 0.5, 0.7, 0.9, 0.2, 0.4],
            "malignant_pred": [0.2, 0.4, 0.6, 0.0, 1.0, 0.8, 0.1],
            "benign_label": [0, 0, 1, 1, 1, 0, np.nan],
            "malignant_label": [0, 0, 1, 1, 1, 1, np.nan],
        }
    )


def test_parse_names() -> None:
    t = infer_image_fields(_images())
    assert t["exam_id"].tolist()[:2] == ["0", "0"]
    assert t["laterality"].tolist() == ["L", "L", "R", "R", "R", "L", "R"]
    assert t["view"].tolist()[:4] == ["CC", "MLO", "CC", "MLO"]
    with pytest.raises(ValueError, match="cannot parse"):
        infer_image_fields(pd.DataFrame({"image_index": ["scan7"]}))


def test_breast_level_means_over_views() -> None:
    b = breast_level(_images()).set_index("breast_id")
    assert list(b.index) == ["0_L", "0_R", "1_L", "1_R"]
    assert b.loc["0_L", "malignant_pred"] == pytest.approx(0.3)
    # R-MLO has two images (0.0, 1.0) → view mean 0.5, then mean with CC 0.6 → 0.55.
    assert b.loc["0_R", "malignant_pred"] == pytest.approx(0.55)
    assert b.loc["0_R", "benign_pred"] == pytest.approx((0.5 + 0.8) / 2)
    assert b.loc["0_R", "n_images"] == 3 and b.loc["0_R", "n_views"] == 2
    assert b.loc["1_L", "malignant_label"] == 1
    assert np.isnan(b.loc["1_R", "malignant_label"])


def test_breast_label_column_wins() -> None:
    t = _images()
    t["breast_malignant_label"] = [1, 1, 0, 0, 0, 1, 0]
    b = breast_level(t).set_index("breast_id")
    assert b.loc["0_L", "malignant_label"] == 1
    assert b.loc["0_R", "malignant_label"] == 0
    assert b.loc["1_R", "malignant_label"] == 0


def test_exam_level_and_metarepository_layout() -> None:
    b = breast_level(_images())
    e = exam_level(b).set_index("exam_id")
    assert e.loc["0", "malignant_pred"] == pytest.approx(0.55)
    assert e.loc["1", "malignant_label"] == 1
    wide = metarepository_breast_table(b)
    assert list(wide.columns[:5]) == [
        "index",
        "left_malignant",
        "right_malignant",
        "left_benign",
        "right_benign",
    ]
    row = wide.set_index("index").loc["1"]
    assert row["left_malignant"] == pytest.approx(0.8)
    assert row["right_malignant"] == pytest.approx(0.1)
    assert row["left_malignant_label"] == 1


def test_explicit_columns_used() -> None:
    t = pd.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "exam_id": ["e", "e", "e"],
            "laterality": ["l", "L", "R"],
            "view": ["CC", "MLO", "CC"],
            "malignant_pred": [0.2, 0.6, 0.1],
        }
    )
    b = breast_level(t, name_column="image_id").set_index("breast_id")
    assert b.loc["e_L", "malignant_pred"] == pytest.approx(0.4)


def test_group_table_levels() -> None:
    from mammogmic.evaluation.table import group_table

    t = _images()
    assert group_table(t, "malignant_label", ["malignant_pred"], "image") is t
    breasts = group_table(t, "malignant_label", ["malignant_pred"], "breast")
    assert len(breasts) == 4
    exams = group_table(t, "malignant_label", ["malignant_pred"], "exam").set_index("exam_id")
    # exam 1: breasts 1_L (0.8, label 1) and 1_R (0.1, label unknown) → max score 0.8, label 1
    assert exams.loc["1", "malignant_pred"] == pytest.approx(0.8)
    assert exams.loc["1", "malignant_label"] == 1
    with pytest.raises(ValueError, match="group must be"):
        group_table(t, "malignant_label", ["malignant_pred"], "patient")
