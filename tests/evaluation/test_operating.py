"""Operating points fitted at breast level, subgroup metrics and age bands (mammogmic.evaluation.table)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mammogmic.evaluation.aggregation import breast_level
from mammogmic.evaluation.table import (
    OperatingPoint,
    age_band,
    fit_operating_point,
    subgroup_columns,
    subgroup_metrics,
)


def _images() -> pd.DataFrame:
    # Breast score = mean of its CC and MLO: e0 L 0.7 (cancer), e0 R 0.3, e1 L 0.4 (cancer), e1 R 0.6, e2 L 0.1,
    # e2 R 0.9 without a label (left out of the fit).
    rows = []
    for exam, side, cc, mlo, label in [
        ("e0", "L", 0.8, 0.6, 1),
        ("e0", "R", 0.2, 0.4, 0),
        ("e1", "L", 0.5, 0.3, 1),
        ("e1", "R", 0.6, 0.6, 0),
        ("e2", "L", 0.1, 0.1, 0),
        ("e2", "R", 0.9, 0.9, None),
    ]:
        for view, score in (("CC", cc), ("MLO", mlo)):
            rows.append(
                {
                    "image_index": f"{exam}_{side}-{view}",
                    "exam_id": exam,
                    "laterality": side,
                    "view": view,
                    "malignant_pred": score,
                    "malignant_label": label,
                }
            )
    return pd.DataFrame(rows)


def test_operating_point_is_fitted_on_breasts() -> None:
    point = fit_operating_point(_images(), "sensitivity", 1.0, source="val.csv")
    # Both cancers (0.7, 0.4) are found from 0.4 on; the 0.6 breast is then a false positive.
    assert point.threshold == pytest.approx(0.4) and point.level == "breast"
    fitted = point.fitted_on
    assert fitted is not None
    assert (fitted["tp"], fitted["fp"], fitted["tn"], fitted["fn"]) == (2, 1, 2, 0)
    assert fitted["n"] == 5 and fitted["n_positive"] == 2  # the unlabelled breast is left out
    assert "sensitivity 1 fitted on val.csv" in point.description
    point = fit_operating_point(_images(), "specificity", 1.0)
    assert point.threshold == pytest.approx(0.7)  # above the 0.6 negative, the lowest such score
    assert point.fitted_on is not None and point.fitted_on["sensitivity"] == pytest.approx(0.5)
    # Per image it would differ: the highest negative image (0.6) is not the highest negative breast.
    with pytest.raises(ValueError, match="sensitivity or specificity"):
        fit_operating_point(_images(), "ppv", 0.5)
    with pytest.raises(ValueError, match="no label column"):
        fit_operating_point(_images().drop(columns="malignant_label"), "sensitivity", 0.9, source="v.csv")
    assert OperatingPoint.given(0.25).threshold == 0.25
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        OperatingPoint.given(1.5)


def test_subgroups_by_breast() -> None:
    images = _images()
    density = {"e0": "A", "e1": "B", "e2": ""}
    images["density"] = images["exam_id"].map(density)
    images["age"] = images["exam_id"].map({"e0": "045Y", "e1": "63", "e2": None})
    assert subgroup_columns(images) == {"density": "density", "age band": "age"}
    breasts = breast_level(images, ["malignant_pred"], ["malignant_label"], keep_columns=["density", "age"])
    assert list(breasts["density"]) == ["A", "A", "B", "B", "", ""]
    rows = subgroup_metrics(
        breasts, "density", "malignant_label", "malignant_pred", threshold=0.5, n_bootstrap=0
    )
    assert [(r["value"], r["n"], r["n_positive"]) for r in rows] == [
        ("A", 2, 1),
        ("B", 2, 1),
        ("unknown", 1, 0),
    ]
    assert rows[0]["auroc"] == 1.0  # 0.7 cancer over 0.3
    assert rows[1]["auroc"] == 0.0  # 0.4 cancer under 0.6
    assert rows[2]["auroc"] is None  # one class
    op = rows[1]["operating_point"]
    assert (op["tp"], op["fp"], op["tn"], op["fn"]) == (0, 1, 0, 1)
    bands = subgroup_metrics(breasts, "age", "malignant_label", "malignant_pred", n_bootstrap=0, bands=True)
    assert [(r["value"], r["n"]) for r in bands] == [("60-69", 2), ("<50", 2), ("unknown", 1)]
    assert "operating_point" not in bands[0]


@pytest.mark.parametrize(
    ("value", "band"),
    [(49, "<50"), (49.9, "<50"), (50, "50-59"), ("057Y", "50-59"), (69.9, "60-69"), (70, "70+"), (88, "70+")],
)
def test_age_band(value: object, band: str) -> None:
    assert age_band(value) == band


def test_age_band_unknown() -> None:
    assert age_band(None) is None and age_band(math.nan) is None and age_band("old") is None
    assert age_band(np.float64("nan")) is None and age_band(-3) is None
