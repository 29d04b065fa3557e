"""Evaluate score columns of a table: what ``mammogmic evaluate`` computes, as a library function.

The result is a plain JSON-ready dict (see :func:`evaluate_table`) so that scripts, the CLI and the HTML
report share one format.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from mammogmic.evaluation.aggregation import breast_level, exam_level
from mammogmic.evaluation.metrics import (
    auroc,
    column_metrics,
    fit_ensemble_weights,
    hybrid_auroc,
    paired_auroc_difference,
)

logger = logging.getLogger(__name__)

__all__ = [
    "GROUPS",
    "auroc_summary",
    "evaluate_table",
    "group_table",
    "lambda_key",
    "markdown_summary",
    "select_columns",
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
                f"{_fmt(c['difference'], c['difference_ci'])} | {_fmt(c['p_value'])} |"
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
