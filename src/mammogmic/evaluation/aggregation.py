"""Image → breast → exam aggregation of predictions and labels.

GMIC predicts per image. The paper (and the NYU meta-repository) score a breast by the mean of its
views' predictions, and store breast-level results per exam as ``left_malignant, right_malignant``.
Here:

* a breast's score is the mean over its views (CC, MLO) of each view's mean over its images, so a view
  with two images does not count twice; with one image per view this is the meta-repository's mean;
* a breast's label is the breast-level label column when the table has one, else the maximum of its
  image labels (unknown when all are unknown);
* an exam's score and label are the maxima over its breasts (an exam is positive if any breast is).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

__all__ = [
    "breast_level",
    "exam_level",
    "infer_image_fields",
    "metarepository_breast_table",
]

# Official / meta-repository image names look like "0_L-CC", "12_R_MLO" or "..._L-MLO_2".
IMAGE_NAME = re.compile(
    r"^(?P<exam>.+?)[_-](?P<laterality>[LR])[-_](?P<view>CC|MLO)(?:[_-].*)?$", re.IGNORECASE
)

SCORE_COLUMNS = ("benign_pred", "malignant_pred")
LABEL_COLUMNS = ("benign_label", "malignant_label")
BREAST_LABEL_COLUMNS = {"benign_label": "breast_benign_label", "malignant_label": "breast_malignant_label"}


def infer_image_fields(df: pd.DataFrame, name_column: str = "image_index") -> pd.DataFrame:
    """Add ``exam_id``, ``laterality`` and ``view`` parsed from names like ``0_L-CC`` when missing.

    Args:
        df: image-level table.
        name_column: column holding the image names.

    Returns:
        A copy with the three columns filled where they were absent.

    Raises:
        ValueError: a name does not follow ``<exam>_<L|R>-<CC|MLO>`` and the columns are missing.
    """
    out = df.copy()
    needed = [c for c in ("exam_id", "laterality", "view") if c not in out.columns]
    if not needed:
        return out
    if name_column not in out.columns:
        raise ValueError(
            f"cannot group by breast: the table lacks {needed} and has no {name_column!r} column to parse"
        )
    parsed = out[name_column].astype(str).str.extract(IMAGE_NAME)
    bad = out.loc[parsed["exam"].isna(), name_column].astype(str).tolist()
    if bad:
        raise ValueError(
            f"cannot parse exam/laterality/view from {len(bad)} {name_column} values (e.g. {bad[:3]}); "
            "expected names like '0_L-CC', or add exam_id, laterality and view columns"
        )
    if "exam_id" in needed:
        out["exam_id"] = parsed["exam"]
    if "laterality" in needed:
        out["laterality"] = parsed["laterality"].str.upper()
    if "view" in needed:
        out["view"] = parsed["view"].str.upper()
    return out


def _breast_key(df: pd.DataFrame) -> pd.Series:
    if "breast_id" in df.columns and df["breast_id"].notna().all():
        return df["breast_id"].astype(str)
    return df["exam_id"].astype(str) + "_" + df["laterality"].astype(str).str.upper()


def _first_known(values: pd.Series) -> object:
    known = values.dropna()
    return known.iloc[0] if len(known) else None


def _max_known(values: pd.Series) -> float:
    known = pd.to_numeric(values, errors="coerce").dropna()
    return float(known.max()) if len(known) else float("nan")


def breast_level(
    df: pd.DataFrame,
    score_columns: Sequence[str] = SCORE_COLUMNS,
    label_columns: Sequence[str] = LABEL_COLUMNS,
    name_column: str = "image_index",
    keep_columns: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per breast: mean-over-views scores and breast labels.

    Args:
        df: image-level table with ``breast_id`` or ``exam_id`` + ``laterality`` (parsed from
            ``name_column`` when absent) and optionally ``view``.
        score_columns: columns averaged over views (missing ones are ignored).
        label_columns: image-level label columns; ``breast_<label>`` columns win when present.
        name_column: column with image names used by :func:`infer_image_fields`.
        keep_columns: per-breast attributes (density, site, age...) carried over: the first known value of
            the breast's images (missing ones are ignored).

    Returns:
        Columns ``breast_id, exam_id`` (then ``patient_id`` when the table has one),
        ``laterality, n_images, n_views``, the scores, the labels, then ``keep_columns``.
    """
    table = df.copy()
    if "exam_id" not in table.columns or "laterality" not in table.columns:
        table = infer_image_fields(table, name_column)
    table["breast_id"] = _breast_key(table)
    if "view" not in table.columns:
        table["view"] = (
            table[name_column].astype(str) if name_column in table.columns else np.arange(len(table))
        )
    scores = [c for c in score_columns if c in table.columns]
    with_patient = "patient_id" in table.columns and bool(table["patient_id"].notna().any())
    rows = []
    for breast, part in table.groupby("breast_id", sort=False):
        row: dict[str, object] = {"breast_id": breast, "exam_id": part["exam_id"].iloc[0]}
        if with_patient:
            row["patient_id"] = _first_known(part["patient_id"])
        row.update(
            {
                "laterality": str(part["laterality"].iloc[0]).upper(),
                "n_images": len(part),
                "n_views": part["view"].nunique(),
            }
        )
        for col in scores:
            per_view = pd.to_numeric(part[col], errors="coerce").groupby(part["view"].to_numpy()).mean()
            row[col] = float(per_view.mean())
        for col in label_columns:
            breast_col = BREAST_LABEL_COLUMNS.get(col)
            value = float("nan")
            if breast_col is not None and breast_col in part.columns:
                value = _max_known(part[breast_col])
            if np.isnan(value) and col in part.columns:
                value = _max_known(part[col])
            row[col] = value
        for col in keep_columns:
            if col in part.columns:
                row[col] = _first_known(part[col])
        rows.append(row)
    return pd.DataFrame(rows)


def exam_level(
    breasts: pd.DataFrame,
    score_columns: Sequence[str] = SCORE_COLUMNS,
    label_columns: Sequence[str] = LABEL_COLUMNS,
) -> pd.DataFrame:
    """One row per exam: maximum over its breasts of each score and label (unknown labels ignored).

    Columns: ``exam_id`` (then ``patient_id`` when ``breasts`` has one), ``n_breasts``, scores, labels.
    """
    rows = []
    with_patient = "patient_id" in breasts.columns and bool(breasts["patient_id"].notna().any())
    for exam, part in breasts.groupby("exam_id", sort=False):
        row: dict[str, object] = {"exam_id": exam}
        if with_patient:
            row["patient_id"] = _first_known(part["patient_id"])
        row["n_breasts"] = len(part)
        for col in score_columns:
            if col in part.columns:
                row[col] = float(pd.to_numeric(part[col], errors="coerce").max())
        for col in label_columns:
            if col in part.columns:
                row[col] = _max_known(part[col])
        rows.append(row)
    return pd.DataFrame(rows)


def metarepository_breast_table(breasts: pd.DataFrame) -> pd.DataFrame:
    """Wide per-exam table in the meta-repository layout.

    Columns: ``index`` (the exam id), ``left_malignant, right_malignant`` (what the meta-repository's
    ``score.py`` reads), then ``left_benign, right_benign`` and, when labels are known,
    ``left_malignant_label, right_malignant_label, left_benign_label, right_benign_label``.
    A breast without images is left empty.
    """
    out: dict[str, dict[object, float]] = {}
    side_name = {"L": "left", "R": "right"}
    for _, row in breasts.iterrows():
        side = side_name.get(str(row["laterality"]).upper())
        if side is None:
            raise ValueError(
                f"breast {row['breast_id']!r} has laterality {row['laterality']!r}, expected L or R"
            )
        for kind in ("malignant", "benign"):
            if f"{kind}_pred" in row:
                out.setdefault(f"{side}_{kind}", {})[row["exam_id"]] = row[f"{kind}_pred"]
            if f"{kind}_label" in row:
                out.setdefault(f"{side}_{kind}_label", {})[row["exam_id"]] = row[f"{kind}_label"]
    exams = list(dict.fromkeys(breasts["exam_id"].tolist()))
    order = [
        "left_malignant",
        "right_malignant",
        "left_benign",
        "right_benign",
        "left_malignant_label",
        "right_malignant_label",
        "left_benign_label",
        "right_benign_label",
    ]
    table = pd.DataFrame({"index": exams})
    for col in order:
        values = out.get(col)
        if values is None and col.endswith("_label"):
            continue
        values = values or {}
        table[col] = [values.get(e, np.nan) for e in exams]
    label_cols = [c for c in table.columns if c.endswith("_label")]
    if label_cols and table[label_cols].isna().all().all():
        table = table.drop(columns=label_cols)
    return table
