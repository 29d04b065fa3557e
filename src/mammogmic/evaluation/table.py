"""Evaluate score columns of a table: what ``mammogmic evaluate`` computes, as a library function.

The result is a plain JSON-ready dict (see :func:`evaluate_table`) so that scripts, the CLI and the HTML
report share one format.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mammogmic.evaluation.aggregation import breast_level, exam_level
from mammogmic.evaluation.metrics import (
    auroc,
    column_metrics,
    fit_ensemble_weights,
    format_p_value,
    hybrid_auroc,
    paired_auroc_difference,
    threshold_at,
)

logger = logging.getLogger(__name__)

__all__ = [
    "GROUPS",
    "SUBGROUPS",
    "OperatingPoint",
    "age_band",
    "auroc_summary",
    "evaluate_table",
    "fit_operating_point",
    "group_table",
    "lambda_key",
    "markdown_summary",
    "select_columns",
    "subgroup_columns",
    "subgroup_metrics",
]

GROUPS = ("image", "breast", "exam")


def lambda_key(value: float) -> str:
    """JSON key of a hybrid weight: shortest form, e.g. ``0``, ``0.25``, ``1``."""
    return f"{value:g}"


def select_columns(columns: Sequence[str], patterns: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """Columns matching any pattern (exact name or shell glob), in pattern order, without duplicates.

    Raises:
        ValueError: a pattern matches no column; the message lists the available columns.
    """
    available = [c for c in columns if c not in exclude]
    chosen: list[str] = []
    for pattern in patterns:
        matches = [pattern] if pattern in available else fnmatch.filter(available, pattern)
        if not matches:
            raise ValueError(f"--scores pattern {pattern!r} matches no column; columns are {list(columns)}")
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def group_table(df: pd.DataFrame, label: str, columns: Sequence[str], group: str) -> pd.DataFrame:
    """Aggregate an image-level table to breasts or exams (see :mod:`mammogmic.evaluation.aggregation`).

    Scores are averaged over a breast's views; labels are the maximum over its images (or its breast
    label column); exams take the maximum over breasts.
    """
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    if group == "image":
        return df
    breasts = breast_level(df, score_columns=list(columns), label_columns=[label])
    if group == "breast":
        return breasts
    return exam_level(breasts, score_columns=list(columns), label_columns=[label])


def auroc_summary(table: pd.DataFrame, level: str = "image", prefix: str = "") -> dict[str, float]:
    """Benign, malignant and mean AUROC of an image table (``image_predictions.csv`` columns) at ``level``.

    The numbers ``mammogmic evaluate --group LEVEL`` reports (same aggregation, same AUROC), without the
    bootstrap; the trainer validates with it. NaN for a class whose labels are missing or all equal.
    """
    out: dict[str, float] = {}
    for name in ("benign", "malignant"):
        label, score = f"{name}_label", f"{name}_pred"
        value = float("nan")
        if label in table.columns and len(table):
            grouped = group_table(table, label, [score], level)
            y = pd.to_numeric(grouped[label], errors="coerce").to_numpy(dtype=np.float64)
            s = pd.to_numeric(grouped[score], errors="coerce").to_numpy(dtype=np.float64)
            ok = np.isfinite(y) & np.isfinite(s)
            if ok.any() and 0 < y[ok].sum() < ok.sum():
                value = float(auroc(y[ok].astype(int), s[ok]))
        out[f"{prefix}{name}_auroc"] = value
    known = [v for v in out.values() if np.isfinite(v)]
    out[f"{prefix}mean_auroc"] = float(np.mean(known)) if known else float("nan")
    return out


def _labels(df: pd.DataFrame, label: str, source: str) -> pd.Series:
    if label not in df.columns:
        raise ValueError(f"{source}: no label column {label!r}; columns are {list(df.columns)}")
    values = pd.to_numeric(df[label], errors="coerce")
    bad = values.notna() & ~values.isin([0, 1])
    if bad.any():
        raise ValueError(
            f"{source}: label column {label!r} must hold 0/1, found {sorted(values[bad].unique())[:5]}"
        )
    return values


def _numeric(df: pd.DataFrame, columns: Sequence[str], source: str) -> pd.DataFrame:
    out = df[list(columns)].apply(pd.to_numeric, errors="coerce")
    for col in columns:
        n_bad = int((out[col].isna() & df[col].notna()).sum())
        if n_bad:
            raise ValueError(f"{source}: score column {col!r} has {n_bad} non-numeric values")
    return out


def _clean(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def evaluate_table(
    df: pd.DataFrame,
    label: str,
    scores: Sequence[str],
    group: str = "image",
    hybrid_model: str | None = None,
    lambdas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    compare: Sequence[tuple[str, str]] = (),
    ensemble_val: pd.DataFrame | None = None,
    ensemble_step: float = 0.1,
    n_bootstrap: int = 2000,
    seed: int | None = 0,
    thresholds: Sequence[float] = (),
    source: str = "table",
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Metrics of every score column plus optional comparisons, as a JSON-ready dict.

    Args:
        df: the table (image-level unless ``group`` says it is to be aggregated).
        label: 0/1 label column; rows with an empty label are dropped.
        scores: column names or shell globs (the label column never matches a glob).
        group: ``image`` (rows as they are), ``breast`` or ``exam``.
        hybrid_model: the model column of the human–machine hybrid; every other score column is a reader.
        lambdas: weights of the reader in ``λ·reader + (1−λ)·model``.
        compare: pairs ``(a, b)`` for the paired bootstrap of AUROC(a) − AUROC(b).
        ensemble_val: validation table; weights ``Σλ_i = 1`` over the score columns are chosen on it
            (maximum AUROC) and applied to ``df``, adding an ``ensemble`` column.
        ensemble_step: spacing of the ensemble weight grid.
        n_bootstrap: bootstrap resamples (0 disables CIs).
        seed: bootstrap seed.
        thresholds: operating points for sensitivity/specificity.
        source: name used in error messages.

    Returns:
        ``(result, table)``: ``result`` is ``{"label", "group", "n_rows", "n_dropped_unlabelled",
        "bootstrap", "seed", "metrics": {column: {...}}}`` plus ``hybrid``/``hybrid_mean``, ``comparisons`` and ``ensemble``
        when requested (hybrid keys are weights formatted by :func:`lambda_key`); ``table`` is the
        labelled, grouped table the metrics were computed on (with an ``ensemble`` column if fitted).
    """
    columns = select_columns(list(df.columns), scores, exclude=[label])
    for name in [hybrid_model, *(c for pair in compare for c in pair)]:
        if name is not None and name not in df.columns:
            raise ValueError(f"{source}: no column {name!r}; columns are {list(df.columns)}")
    extra = [c for c in [hybrid_model, *(c for pair in compare for c in pair)] if c and c not in columns]
    used = columns + extra
    _labels(df, label, source)
    _numeric(df, used, source)
    table = group_table(df, label, used, group)
    y_all = _labels(table, label, source)
    table = table.loc[y_all.notna()].reset_index(drop=True)
    n_dropped = int(y_all.isna().sum())
    if n_dropped:
        logger.warning("%s: %d %s rows without a %r label were left out", source, n_dropped, group, label)
    values = _numeric(table, used, source)
    y = table[label].astype(int).to_numpy()
    result: dict[str, Any] = {
        "label": label,
        "group": group,
        "n_rows": int(len(table)),
        "n_dropped_unlabelled": n_dropped,
        "bootstrap": int(n_bootstrap),
        "seed": seed,
        "metrics": {},
    }

    def finite_rows(cols: Sequence[str]) -> np.ndarray:
        mask = np.isfinite(values[list(cols)].to_numpy(dtype=np.float64)).all(axis=1)
        missing = int((~mask).sum())
        if missing:
            logger.warning("%s: %d rows with empty %s left out", source, missing, "/".join(cols))
        return mask

    for col in columns:
        mask = finite_rows([col])
        metrics = column_metrics(
            y[mask], values[col].to_numpy()[mask], n_resamples=n_bootstrap, seed=seed, thresholds=thresholds
        )
        result["metrics"][col] = metrics.to_dict()

    if hybrid_model is not None:
        readers = [c for c in columns if c != hybrid_model]
        if not readers:
            raise ValueError("--hybrid-model needs at least one other --scores column (the readers)")
        # Each reader on the cases it read (reader studies often leave cells empty), with the model.
        per_reader: dict[str, dict[float, float]] = {}
        counts: dict[str, int] = {}
        for reader in readers:
            mask = finite_rows([reader, hybrid_model])
            single, _ = hybrid_auroc(
                y[mask],
                {reader: values[reader].to_numpy()[mask]},
                values[hybrid_model].to_numpy()[mask],
                lambdas,
            )
            per_reader[reader] = single[reader]
            counts[reader] = int(mask.sum())
        keys = list(next(iter(per_reader.values())))
        mean = {k: float(np.mean([per_reader[r][k] for r in readers])) for k in keys}
        result["hybrid_model"] = hybrid_model
        result["hybrid_n"] = counts
        result["hybrid"] = {
            r: {lambda_key(k): _clean(v) for k, v in d.items()} for r, d in per_reader.items()
        }
        result["hybrid_mean"] = {lambda_key(k): _clean(v) for k, v in mean.items()}

    comparisons = []
    for a, b in compare:
        mask = finite_rows([a, b])
        diff = paired_auroc_difference(
            y[mask],
            values[a].to_numpy()[mask],
            values[b].to_numpy()[mask],
            n_resamples=n_bootstrap,
            seed=seed,
        )
        comparisons.append(
            _clean(
                {
                    "a": a,
                    "b": b,
                    "n": int(mask.sum()),
                    "auroc_a": diff.auroc_a,
                    "auroc_b": diff.auroc_b,
                    "difference": diff.difference,
                    "difference_ci": list(diff.ci),
                    "p_value": diff.p_value,
                    "n_bootstrap_valid": diff.n_valid,
                }
            )
        )
    if comparisons:
        result["comparisons"] = comparisons

    if ensemble_val is not None:
        if len(columns) < 2:
            raise ValueError("an ensemble needs at least two --scores columns")
        missing = [c for c in columns if c not in ensemble_val.columns]
        if missing:
            raise ValueError(f"validation table lacks score columns {missing}")
        _labels(ensemble_val, label, "validation table")
        _numeric(ensemble_val, columns, "validation table")
        val = group_table(ensemble_val, label, columns, group)
        val_y = _labels(val, label, "validation table")
        val_values = _numeric(val, columns, "validation table")
        val_mask = val_y.notna().to_numpy() & np.isfinite(val_values.to_numpy(dtype=np.float64)).all(axis=1)
        mask = finite_rows(columns)
        fit = fit_ensemble_weights(
            val_y.to_numpy()[val_mask].astype(int),
            {c: val_values[c].to_numpy()[val_mask] for c in columns},
            y[mask],
            {c: values[c].to_numpy()[mask] for c in columns},
            step=ensemble_step,
        )
        combined = values[columns].to_numpy()[mask] @ np.asarray(fit.weights)
        result["ensemble"] = _clean(
            {
                "columns": fit.columns,
                "weights": dict(zip(fit.columns, fit.weights, strict=True)),
                "step": ensemble_step,
                "n_candidates": fit.n_candidates,
                "n_val": int(val_mask.sum()),
                "val_auroc": fit.val_auroc,
                "test_auroc": fit.test_auroc,
                "member_val_auroc": fit.member_val_auroc,
                "member_test_auroc": fit.member_test_auroc,
            }
        )
        result["metrics"]["ensemble"] = column_metrics(
            y[mask], combined, n_resamples=n_bootstrap, seed=seed, thresholds=thresholds
        ).to_dict()
        table = table.assign(ensemble=np.nan)
        table.loc[np.flatnonzero(mask), "ensemble"] = combined
    return result, table


def _fmt(value: Any, ci: Any = None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    if ci and ci[0] is not None:
        text += f" ({ci[0]:.3f}–{ci[1]:.3f})"
    return text


def markdown_summary(result: dict[str, Any], title: str = "Evaluation") -> str:
    """Markdown tables of an :func:`evaluate_table` result."""
    lines = [
        f"# {title}",
        "",
        f"Label `{result['label']}`, {result['group']} level, {result['n_rows']} rows; "
        f"95% CIs from {result['bootstrap']} bootstrap resamples (seed {result['seed']}).",
        "",
        "| column | n | positives | AUROC (95% CI) | AUPRC (95% CI) | average precision (95% CI) |",
        "|---|---:|---:|---|---|---|",
    ]
    for col, m in result["metrics"].items():
        lines.append(
            f"| {col} | {m['n']} | {m['n_positive']} | {_fmt(m['auroc'], m['auroc_ci'])} | "
            f"{_fmt(m['auprc'], m['auprc_ci'])} | {_fmt(m['average_precision'], m['average_precision_ci'])} |"
        )
    points = [(col, p) for col, m in result["metrics"].items() for p in m.get("operating_points", [])]
    if points:
        lines += [
            "",
            "| column | threshold | sensitivity | specificity | TP | FP | TN | FN |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for col, p in points:
            lines.append(
                f"| {col} | {p['threshold']:g} | {_fmt(p['sensitivity'])} | {_fmt(p['specificity'])} | "
                f"{p['tp']} | {p['fp']} | {p['tn']} | {p['fn']} |"
            )
    if "hybrid" in result:
        keys = list(result["hybrid_mean"])
        lines += [
            "",
            f"Hybrid AUROC of λ·reader + (1−λ)·`{result['hybrid_model']}` (λ = 1: reader alone, 0: model alone)",
            "",
            "| reader | " + " | ".join(f"λ={k}" for k in keys) + " |",
            "|---|" + "---:|" * len(keys),
        ]
        for reader, row in result["hybrid"].items():
            lines.append(f"| {reader} | " + " | ".join(_fmt(row[k]) for k in keys) + " |")
        lines.append("| **mean** | " + " | ".join(_fmt(result["hybrid_mean"][k]) for k in keys) + " |")
    if "comparisons" in result:
        lines += [
            "",
            "| A | B | n | AUROC A | AUROC B | A − B (95% CI) | p |",
            "|---|---|---:|---:|---:|---|---:|",
        ]
        for c in result["comparisons"]:
            lines.append(
                f"| {c['a']} | {c['b']} | {c['n']} | {_fmt(c['auroc_a'])} | {_fmt(c['auroc_b'])} | "
                f"{_fmt(c['difference'], c['difference_ci'])} | {format_p_value(c['p_value'])} |"
            )
    if "ensemble" in result:
        e = result["ensemble"]
        weights = ", ".join(f"{k} {v:g}" for k, v in e["weights"].items())
        lines += [
            "",
            f"Ensemble weights chosen on the validation table ({e['n_val']} rows, grid step {e['step']:g}): "
            f"{weights}; validation AUROC {_fmt(e['val_auroc'])}, test AUROC {_fmt(e['test_auroc'])}.",
        ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold: ``score >= threshold`` is called positive at ``level``.

    Attributes:
        threshold: the cut-off on the malignant score.
        description: how it was chosen, in words (for reports).
        level: the unit it is applied to (``breast``: the call per breast).
        target: ``sensitivity`` or ``specificity`` when fitted, else ``None``.
        target_value: the target's value.
        fitted_on: the :func:`~mammogmic.evaluation.metrics.sensitivity_specificity` row on the table it was
            fitted on, with ``n`` and ``source``; ``None`` for a threshold that was given.
    """

    threshold: float
    description: str
    level: str = "breast"
    target: str | None = None
    target_value: float | None = None
    fitted_on: Mapping[str, Any] | None = None

    @classmethod
    def given(cls, threshold: float, level: str = "breast") -> OperatingPoint:
        """A threshold given by the user."""
        if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
            raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
        return cls(float(threshold), f"malignant score >= {threshold:g} (given)", level)


def fit_operating_point(
    df: pd.DataFrame,
    target: str,
    value: float,
    label: str = "malignant_label",
    score: str = "malignant_pred",
    level: str = "breast",
    source: str = "validation table",
) -> OperatingPoint:
    """The threshold that reaches ``target`` (``sensitivity`` or ``specificity``) = ``value`` on a table.

    ``df`` is an image-level table (a validation run's ``image_predictions.csv``); it is grouped to ``level``
    by the same aggregation as :func:`evaluate_table`, unlabelled rows are left out, and
    :func:`~mammogmic.evaluation.metrics.threshold_at` picks the threshold.

    Raises:
        ValueError: a missing column, labels that are not 0/1, an unknown target, or one class only.
    """
    if target not in ("sensitivity", "specificity"):
        raise ValueError(f"operating point target must be sensitivity or specificity, got {target!r}")
    _labels(df, label, source)
    if score not in df.columns:
        raise ValueError(f"{source}: no score column {score!r}; columns are {list(df.columns)}")
    _numeric(df, [score], source)
    table = group_table(df, label, [score], level)
    y = _labels(table, label, source)
    s = pd.to_numeric(table[score], errors="coerce")
    keep = (y.notna() & s.notna()).to_numpy()
    if not keep.any():
        raise ValueError(f"{source}: no {level} with both a {label!r} label and a score")
    row = threshold_at(y[keep].astype(int).to_numpy(), s[keep].to_numpy(dtype=float), **{target: value})
    fitted = {**row, "n": int(keep.sum()), "n_positive": int(y[keep].sum()), "source": source}
    description = (
        f"malignant score >= {row['threshold']:.4g}: {target} {value:g} fitted on {source} "
        f"({fitted['n']} {level}s, {fitted['n_positive']} positive; there sensitivity "
        f"{row['sensitivity']:.3f}, specificity {row['specificity']:.3f})"
    )
    return OperatingPoint(float(row["threshold"]), description, level, target, float(value), fitted)


#: Subgroups reported when a table has one of the columns (first match wins), in this order.
SUBGROUPS: dict[str, tuple[str, ...]] = {
    "density": ("density", "breast_density", "birads_density"),
    "vendor": ("vendor", "manufacturer"),
    "site": ("site", "institution"),
    "dataset": ("dataset",),
    "age band": ("age", "patient_age"),
}


def age_band(value: Any) -> str | None:
    """Screening age band of an age (``57``, ``"57"``, DICOM ``"057Y"``): ``<50``, ``50-59``, ``60-69``, ``70+``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().upper().removesuffix("Y")
    try:
        age = float(text)
    except ValueError:
        return None
    if not math.isfinite(age) or age < 0:
        return None
    if age < 50:
        return "<50"
    if age >= 70:
        return "70+"
    low = int(age // 10) * 10
    return f"{low}-{low + 9}"


def subgroup_columns(df: pd.DataFrame) -> dict[str, str]:
    """``{subgroup name: column}`` for the :data:`SUBGROUPS` whose column ``df`` has with a known value."""
    found = {}
    for name, candidates in SUBGROUPS.items():
        for col in candidates:
            if col in df.columns and df[col].replace("", np.nan).notna().any():
                found[name] = col
                break
    return found


def subgroup_metrics(
    table: pd.DataFrame,
    column: str,
    label: str,
    score: str,
    threshold: float | None = None,
    n_bootstrap: int = 2000,
    seed: int | None = 0,
    bands: bool = False,
) -> list[dict[str, Any]]:
    """Metrics of ``score`` per value of ``column`` on an already grouped (e.g. breast) table.

    Args:
        table: one row per unit, with ``column``, ``label`` and ``score``.
        column: the subgroup column; with ``bands`` its values are ages turned into :func:`age_band`.
        label: 0/1 label column (unlabelled rows are left out).
        score: score column.
        threshold: also report sensitivity/specificity of ``score >= threshold``.
        n_bootstrap: resamples of the AUROC CI.
        seed: bootstrap seed.
        bands: group ages into bands.

    Returns:
        One dict per value (sorted; unknown values last as ``"unknown"``): ``value``, ``n``, ``n_positive``,
        ``auroc``, ``auroc_ci`` (``None`` where undefined: one class, or too few rows for a CI) and, with a
        threshold, ``operating_point`` (the sensitivity/specificity row).
    """
    y = _labels(table, label, "subgroup table")
    values = table[column].map(age_band) if bands else table[column].replace("", np.nan)
    values = values.map(
        lambda v: "unknown" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
    )
    s = pd.to_numeric(table[score], errors="coerce")
    keep = y.notna() & s.notna()
    rows = []
    known = sorted(v for v in values[keep].unique() if v != "unknown")
    order = known + (["unknown"] if (values[keep] == "unknown").any() else [])
    for value in order:
        mask = (keep & (values == value)).to_numpy()
        yy = y[mask].astype(int).to_numpy()
        metrics = column_metrics(
            yy,
            s[mask].to_numpy(dtype=float),
            n_resamples=n_bootstrap,
            seed=seed,
            thresholds=[threshold] if threshold is not None else (),
        ).to_dict()
        row: dict[str, Any] = {
            "value": value,
            "n": metrics["n"],
            "n_positive": metrics["n_positive"],
            "auroc": metrics["auroc"],
            "auroc_ci": metrics["auroc_ci"],
        }
        if threshold is not None:
            row["operating_point"] = metrics["operating_points"][0]
        rows.append(row)
    return rows
