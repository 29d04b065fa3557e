"""Classification metrics for screening studies, written in vectorised numpy.

The definitions follow the NYU mammography meta-repository so that numbers are comparable with
published GMIC results:

* AUROC is the area under the ROC curve with ties counted as one half (``roc_auc_score``).
* AUPRC is the *trapezoidal* area under the precision-recall curve (``auc(recall, precision)``),
  which is what the meta-repository reports; average precision (the step-wise sum
  ``Σ (R_k − R_{k−1}) P_k``) is reported next to it because it is the more common definition elsewhere.
* Bootstrap confidence intervals draw ``n`` rows with replacement 2,000 times, skip resamples that
  contain a single class, and read the 2.5% / 97.5% order statistics of the remaining values. Curve bands
  (:func:`roc_band`, :func:`pr_band`) read the same order statistics at each point of a fixed grid.
* An operating point calls ``score >= threshold`` positive; :func:`threshold_at` picks the threshold that
  reaches a target sensitivity or specificity on a (validation) table.

Every area is computed from *weighted* counts over the distinct score values. A bootstrap resample is
just another weight vector (how many times each row was drawn), so all resamples of a column are scored
at once from one sort, which keeps 2,000 resamples of thousands of rows to a fraction of a second.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

logger = logging.getLogger(__name__)

__all__ = [
    "BootstrapResult",
    "ColumnMetrics",
    "CurveBand",
    "EnsembleResult",
    "PairedDifference",
    "PairedTTest",
    "auprc",
    "auroc",
    "average_precision",
    "bootstrap_metric",
    "column_metrics",
    "ensemble_weights_grid",
    "fit_ensemble_weights",
    "format_p_value",
    "hybrid_auroc",
    "paired_auroc_difference",
    "paired_t_test",
    "pr_band",
    "pr_curve",
    "roc_band",
    "roc_curve",
    "sensitivity_specificity",
    "threshold_at",
]

METRICS = ("auroc", "auprc", "average_precision")

# Resamples are scored in chunks so that the (chunk, n) weight matrices stay small (~8 MB each).
_MAX_CHUNK_ELEMENTS = 1_000_000


def _as_binary(labels: ArrayLike, scores: ArrayLike) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    """Validate and convert a label vector (0/1) and a score vector of equal length."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.size and not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"labels must be 0 or 1, found {bad.tolist()}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} NaN or infinite values")
    return y.astype(bool), s


@dataclass(frozen=True)
class _Ranked:
    """Rows sorted by descending score, with the boundaries of tied-score groups."""

    order: NDArray[np.intp]  # row indices, highest score first
    y_sorted: NDArray[np.bool_]
    group_end: NDArray[np.intp]  # exclusive end (in sorted positions) of each distinct score group
    thresholds: NDArray[np.float64]  # the distinct scores, descending

    @classmethod
    def build(cls, y: NDArray[np.bool_], s: NDArray[np.float64]) -> _Ranked:
        order = np.argsort(-s, kind="mergesort")
        s_sorted = s[order]
        boundaries = np.flatnonzero(np.diff(s_sorted)) + 1
        group_end = np.append(boundaries, s_sorted.size).astype(np.intp)
        return cls(order, y[order], group_end, s_sorted[group_end - 1])


def _group_counts(ranked: _Ranked, weights: NDArray[np.float64]) -> tuple[NDArray[Any], NDArray[Any]]:
    """Cumulative weighted true/false positives at each threshold, shape ``(B, G)``.

    Args:
        ranked: sorted rows.
        weights: ``(B, n)`` weight of each row (in the original row order) for ``B`` weightings.
    """
    w = weights[:, ranked.order]
    tp = np.cumsum(np.where(ranked.y_sorted, w, 0.0), axis=1)[:, ranked.group_end - 1]
    fp = np.cumsum(np.where(ranked.y_sorted, 0.0, w), axis=1)[:, ranked.group_end - 1]
    return tp, fp


def _areas(tp: NDArray[Any], fp: NDArray[Any]) -> dict[str, NDArray[np.float64]]:
    """AUROC, trapezoidal AUPRC and average precision from cumulative counts ``(B, G)``.

    Rows where one class has zero weight get NaN.
    """
    n_pos = tp[:, -1:]
    n_neg = fp[:, -1:]
    valid = (n_pos[:, 0] > 0) & (n_neg[:, 0] > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = tp / n_pos
        fpr = fp / n_neg
        zeros = np.zeros((tp.shape[0], 1))
        tpr0 = np.hstack([zeros, tpr])
        fpr0 = np.hstack([zeros, fpr])
        # Trapezoids between successive ROC points: ties become diagonal segments (= one half).
        roc = np.sum(np.diff(fpr0, axis=1) * (tpr0[:, 1:] + tpr0[:, :-1]) / 2.0, axis=1)
        predicted = tp + fp
        # A threshold above every drawn row has no predictions; it sits on the curve's start (0, 1).
        precision = np.where(predicted > 0, tp / np.where(predicted > 0, predicted, 1.0), 1.0)
        precision0 = np.hstack([np.ones((tp.shape[0], 1)), precision])
        d_recall = np.diff(tpr0, axis=1)
        pr_trap = np.sum(d_recall * (precision0[:, 1:] + precision0[:, :-1]) / 2.0, axis=1)
        ap = np.sum(d_recall * precision, axis=1)
    out = {"auroc": roc, "auprc": pr_trap, "average_precision": ap}
    for value in out.values():
        value[~valid] = np.nan
    return out


def _point_areas(labels: ArrayLike, scores: ArrayLike) -> dict[str, float]:
    y, s = _as_binary(labels, scores)
    if y.all() or not y.any():
        return dict.fromkeys(METRICS, float("nan"))
    ranked = _Ranked.build(y, s)
    tp, fp = _group_counts(ranked, np.ones((1, y.size)))
    return {k: float(v[0]) for k, v in _areas(tp, fp).items()}


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (ties count one half); NaN when only one class is present.

    Args:
        labels: 0/1 ground truth, shape ``(n,)``.
        scores: higher means more likely positive, shape ``(n,)``.
    """
    return _point_areas(labels, scores)["auroc"]


def auprc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Trapezoidal area under the precision-recall curve, as the meta-repository reports it.

    Equals scikit-learn's ``auc(*precision_recall_curve(labels, scores)[1::-1])``; the curve starts
    at (recall 0, precision 1). NaN when only one class is present.
    """
    return _point_areas(labels, scores)["auprc"]


def average_precision(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision ``Σ (R_k − R_{k−1}) P_k`` over distinct thresholds (scikit-learn's definition)."""
    return _point_areas(labels, scores)["average_precision"]


def roc_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """ROC curve points ``(fpr, tpr, thresholds)`` starting at (0, 0), one point per distinct score."""
    y, s = _as_binary(labels, scores)
    ranked = _Ranked.build(y, s)
    tp, fp = _group_counts(ranked, np.ones((1, y.size)))
    n_pos, n_neg = max(tp[0, -1], 1.0), max(fp[0, -1], 1.0)
    fpr = np.concatenate([[0.0], fp[0] / n_neg])
    tpr = np.concatenate([[0.0], tp[0] / n_pos])
    return fpr, tpr, np.concatenate([[np.inf], ranked.thresholds])


def pr_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """Precision-recall points ``(recall, precision, thresholds)`` starting at (0, 1)."""
    y, s = _as_binary(labels, scores)
    ranked = _Ranked.build(y, s)
    tp, fp = _group_counts(ranked, np.ones((1, y.size)))
    recall = np.concatenate([[0.0], tp[0] / max(tp[0, -1], 1.0)])
    precision = np.concatenate([[1.0], tp[0] / (tp[0] + fp[0])])
    return recall, precision, np.concatenate([[np.inf], ranked.thresholds])


@dataclass(frozen=True)
class BootstrapResult:
    """Bootstrap distribution summary of one or more metrics.

    Attributes:
        estimate: metric on the full data.
        ci: ``(low, high)`` 95% interval (NaN when fewer than two usable resamples).
        n_resamples: resamples requested.
        n_valid: resamples that contained both classes (the others are skipped).
    """

    estimate: dict[str, float]
    ci: dict[str, tuple[float, float]]
    n_resamples: int
    n_valid: int


def _percentile_positions(n: int, level: float) -> tuple[int, int]:
    """Positions ``int(α/2·n)`` and ``int((1−α/2)·n)`` in ``n`` sorted resample values (the meta-repository's)."""
    alpha = 1.0 - level
    return min(int(alpha / 2 * n), n - 1), min(int((1 - alpha / 2) * n), n - 1)


def _percentile_ci(values: NDArray[np.float64], level: float) -> tuple[float, float]:
    """CI from sorted resample values at :func:`_percentile_positions`, like the meta-repository."""
    values = np.sort(values[np.isfinite(values)])
    n = values.size
    if n < 2:
        return float("nan"), float("nan")
    lo, hi = _percentile_positions(n, level)
    return float(values[lo]), float(values[hi])


def _resample_weights(rng: np.random.Generator, n: int, count: int) -> NDArray[np.float64]:
    """``(count, n)`` multiplicities of each row in ``count`` resamples of ``n`` rows with replacement."""
    idx = rng.integers(0, n, size=(count, n))
    flat = (idx + (np.arange(count) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=count * n).reshape(count, n).astype(np.float64)


def _bootstrap_areas(
    y: NDArray[np.bool_],
    score_columns: Sequence[NDArray[np.float64]],
    n_resamples: int,
    seed: int | None,
) -> list[dict[str, NDArray[np.float64]]]:
    """Metrics of every column on the *same* resamples (paired bootstrap); NaN for single-class draws."""
    n = y.size
    rng = np.random.default_rng(seed)
    ranked = [_Ranked.build(y, s) for s in score_columns]
    chunk = max(1, min(n_resamples, _MAX_CHUNK_ELEMENTS // max(n, 1)))
    parts: list[list[dict[str, NDArray[np.float64]]]] = [[] for _ in score_columns]
    done = 0
    while done < n_resamples:
        count = min(chunk, n_resamples - done)
        weights = _resample_weights(rng, n, count)
        for i, r in enumerate(ranked):
            parts[i].append(_areas(*_group_counts(r, weights)))
        done += count
    return [{k: np.concatenate([p[k] for p in col_parts]) for k in METRICS} for col_parts in parts]


def bootstrap_metric(
    labels: ArrayLike,
    scores: ArrayLike,
    n_resamples: int = 2000,
    seed: int | None = 0,
    level: float = 0.95,
    min_n: int = 8,
) -> BootstrapResult:
    """Point estimates and bootstrap CIs of AUROC, AUPRC and average precision.

    Args:
        labels: 0/1 ground truth.
        scores: predicted scores.
        n_resamples: number of resamples (the meta-repository uses 2,000).
        seed: seed of the resampling generator (``None``: fresh entropy).
        level: confidence level of the percentile interval.
        min_n: below this many rows no interval is computed (NaN), as in the meta-repository (8).

    Returns:
        A :class:`BootstrapResult`; resamples with one class are skipped and counted out of ``n_valid``.
    """
    y, s = _as_binary(labels, scores)
    estimate = _point_areas(y, s)
    nan_ci = dict.fromkeys(METRICS, (float("nan"), float("nan")))
    if y.size < min_n or n_resamples < 1 or y.all() or not y.any():
        return BootstrapResult(estimate, nan_ci, n_resamples, 0)
    areas = _bootstrap_areas(y, [s], n_resamples, seed)[0]
    n_valid = int(np.isfinite(areas["auroc"]).sum())
    if n_valid < n_resamples:
        logger.info(
            "bootstrap: %d of %d resamples had one class and were skipped", n_resamples - n_valid, n_resamples
        )
    ci = {k: _percentile_ci(areas[k], level) for k in METRICS}
    return BootstrapResult(estimate, ci, n_resamples, n_valid)


@dataclass(frozen=True)
class PairedDifference:
    """Paired bootstrap of ``AUROC(a) − AUROC(b)`` on the same rows.

    Attributes:
        difference: AUROC(a) − AUROC(b) on the full data.
        ci: 95% percentile interval of the resampled differences.
        p_value: two-sided bootstrap p-value, ``2·min(P(d ≤ 0), P(d ≥ 0))`` capped at 1.
        n_valid: resamples with both classes.
    """

    auroc_a: float
    auroc_b: float
    difference: float
    ci: tuple[float, float]
    p_value: float
    n_valid: int


def paired_auroc_difference(
    labels: ArrayLike,
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    n_resamples: int = 2000,
    seed: int | None = 0,
    level: float = 0.95,
) -> PairedDifference:
    """Difference of AUROC between two score columns with a paired bootstrap CI.

    Both columns are scored on the same resampled rows, so the interval reflects the correlation
    between the two readers/models.
    """
    y, a = _as_binary(labels, scores_a)
    _, b = _as_binary(labels, scores_b)
    auc_a, auc_b = auroc(y, a), auroc(y, b)
    diff = auc_a - auc_b
    if y.all() or not y.any() or n_resamples < 1:
        return PairedDifference(auc_a, auc_b, diff, (float("nan"), float("nan")), float("nan"), 0)
    ra, rb = _bootstrap_areas(y, [a, b], n_resamples, seed)
    d = ra["auroc"] - rb["auroc"]
    d = d[np.isfinite(d)]
    if d.size == 0:
        return PairedDifference(auc_a, auc_b, diff, (float("nan"), float("nan")), float("nan"), 0)
    p = min(1.0, 2.0 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    return PairedDifference(auc_a, auc_b, diff, _percentile_ci(d, level), p, int(d.size))


@dataclass(frozen=True)
class PairedTTest:
    """Paired t-test of ``a − b`` over matched units (e.g. training seeds of two configurations).

    Attributes:
        mean_difference: mean of ``a − b``.
        sd_difference: sample standard deviation of ``a − b`` (ddof 1).
        t: ``mean / (sd / √n)``; ±inf when every difference is equal and non-zero.
        p_value: two-sided p-value of Student's t with ``n − 1`` degrees of freedom (nan below two pairs, 1 when
            every difference is 0).
        n: number of pairs.
    """

    mean_difference: float
    sd_difference: float
    t: float
    p_value: float
    n: int


def paired_t_test(a: ArrayLike, b: ArrayLike) -> PairedTTest:
    """Student's paired t-test of ``a`` against ``b`` (same length, pairs with a non-finite value dropped)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired_t_test: expected two 1-D arrays of one length, got {x.shape} and {y.shape}")
    d = (x - y)[np.isfinite(x) & np.isfinite(y)]
    n = int(d.size)
    mean = float(d.mean()) if n else float("nan")
    if n < 2:
        return PairedTTest(mean, float("nan"), float("nan"), float("nan"), n)
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        t = 0.0 if mean == 0.0 else float(np.copysign(np.inf, mean))
        return PairedTTest(mean, sd, t, 1.0 if mean == 0.0 else 0.0, n)
    t = mean / (sd / np.sqrt(n))
    df = n - 1
    # P(|T| >= |t|) = I_x(df/2, 1/2) with x = df / (df + t²).
    p = _regularized_beta(df / (df + t * t), df / 2.0, 0.5)
    return PairedTTest(mean, sd, float(t), float(min(1.0, max(0.0, p))), n)


def format_p_value(p: float | None, decimals: int = 3) -> str:
    """A p-value as the project's tables print it: ``decimals`` places, never a zero.

    A p that would print as zero at ``decimals`` places is shown with three (``0.003``), and one below 0.001 as
    ``<0.001``: "p 0.00" would read as certainty. ``n/a`` for None or NaN.
    """
    if p is None or not math.isfinite(p):
        return "n/a"
    text = f"{p:.{decimals}f}"
    if float(text) > 0.0:
        return text
    return f"{p:.3f}" if p >= 0.0005 else "<0.001"


def _regularized_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b) by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below the mean; use the symmetry
        return 1.0 - _regularized_beta(1.0 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny, c, f = 1e-300, 1.0, 0.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f / a


def sensitivity_specificity(
    labels: ArrayLike, scores: ArrayLike, thresholds: Sequence[float]
) -> list[dict[str, float]]:
    """Sensitivity and specificity when ``score >= threshold`` is called positive.

    Returns:
        One dict per threshold with ``threshold``, ``sensitivity``, ``specificity``, ``tp``, ``fp``,
        ``tn``, ``fn`` (NaN rates when a class is absent).
    """
    y, s = _as_binary(labels, scores)
    t = np.asarray(thresholds, dtype=np.float64)
    called = s[None, :] >= t[:, None]  # (T, n)
    tp = (called & y).sum(axis=1)
    fp = (called & ~y).sum(axis=1)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    rows = []
    for i, thr in enumerate(t):
        rows.append(
            {
                "threshold": float(thr),
                "sensitivity": tp[i] / n_pos if n_pos else float("nan"),
                "specificity": (n_neg - fp[i]) / n_neg if n_neg else float("nan"),
                "tp": int(tp[i]),
                "fp": int(fp[i]),
                "tn": int(n_neg - fp[i]),
                "fn": int(n_pos - tp[i]),
            }
        )
    return rows


def threshold_at(
    labels: ArrayLike,
    scores: ArrayLike,
    sensitivity: float | None = None,
    specificity: float | None = None,
) -> dict[str, float]:
    """The operating point (``score >= threshold`` called positive) that reaches a target on these rows.

    Give exactly one target:

    * ``sensitivity=s``: the *highest* threshold whose sensitivity is at least ``s`` (the fewest false
      positives that still find that share of the cancers);
    * ``specificity=p``: the *lowest* threshold whose specificity is at least ``p`` (the most cancers found
      within that false-positive budget). When only calling nothing reaches ``p``, the threshold lies just
      above the highest score.

    Thresholds are the distinct scores themselves, so applying the result to the same rows reproduces its
    counts exactly.

    Returns:
        The :func:`sensitivity_specificity` row at the chosen threshold.

    Raises:
        ValueError: not exactly one target, a target outside (0, 1], or rows of a single class.
    """
    if sensitivity is not None and specificity is None:
        name, target = "sensitivity", float(sensitivity)
    elif specificity is not None and sensitivity is None:
        name, target = "specificity", float(specificity)
    else:
        raise ValueError("give exactly one of sensitivity= or specificity=")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target {name} must be in (0, 1], got {target}")
    y, s = _as_binary(labels, scores)
    if y.all() or not y.any():
        raise ValueError(f"cannot fit a threshold for a {name} on rows of one class ({y.size} rows)")
    fpr, tpr, thresholds = roc_curve(y, s)
    if name == "sensitivity":
        # tpr rises as the threshold falls: the first (highest) threshold that reaches the target.
        chosen = float(thresholds[int(np.argmax(tpr >= target - 1e-12))])
    else:
        ok = np.flatnonzero(1.0 - fpr >= target - 1e-12)  # specificity falls as the threshold falls
        chosen = float(thresholds[ok[-1]])
        if not np.isfinite(chosen):
            chosen = float(np.nextafter(s.max(), np.inf))
    return sensitivity_specificity(y, s, [chosen])[0]


@dataclass(frozen=True)
class CurveBand:
    """Pointwise bootstrap band of a ROC or precision-recall curve.

    Attributes:
        grid: the x values (false positive rate for ROC, recall for PR), from 0 to 1.
        low: lower bound of the curve's y value (sensitivity, precision) at each grid point.
        high: upper bound.
        level: confidence level.
        n_valid: resamples with both classes (single-class draws are skipped, as for the CIs).
    """

    grid: NDArray[np.float64]
    low: NDArray[np.float64]
    high: NDArray[np.float64]
    level: float
    n_valid: int


def _curve_band(
    kind: str,
    labels: ArrayLike,
    scores: ArrayLike,
    n_resamples: int,
    seed: int | None,
    level: float,
    points: int,
    min_n: int,
) -> CurveBand:
    y, s = _as_binary(labels, scores)
    grid = np.linspace(0.0, 1.0, points)
    empty = CurveBand(grid, np.full(points, np.nan), np.full(points, np.nan), level, 0)
    if y.size < min_n or n_resamples < 1 or y.all() or not y.any():
        return empty
    n = y.size
    ranked = _Ranked.build(y, s)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, _MAX_CHUNK_ELEMENTS // max(n, 1)))
    curves: list[NDArray[np.float64]] = []
    done = 0
    while done < n_resamples:  # the resamples bootstrap_metric draws for the same seed
        count = min(chunk, n_resamples - done)
        tp, fp = _group_counts(ranked, _resample_weights(rng, n, count))
        done += count
        n_pos, n_neg = tp[:, -1], fp[:, -1]
        for i in np.flatnonzero((n_pos > 0) & (n_neg > 0)):
            recall = np.concatenate([[0.0], tp[i] / n_pos[i]])
            if kind == "roc":
                x, value = np.concatenate([[0.0], fp[i] / n_neg[i]]), recall
            else:
                predicted = tp[i] + fp[i]
                precision = np.where(predicted > 0, tp[i] / np.where(predicted > 0, predicted, 1.0), 1.0)
                x, value = recall, np.concatenate([[1.0], precision])
            curves.append(np.interp(grid, x, value))
    if len(curves) < 2:
        return empty
    stacked = np.sort(np.stack(curves), axis=0)  # (valid resamples, points), each column sorted
    lo, hi = _percentile_positions(stacked.shape[0], level)
    return CurveBand(grid, stacked[lo], stacked[hi], level, stacked.shape[0])


def roc_band(
    labels: ArrayLike,
    scores: ArrayLike,
    n_resamples: int = 2000,
    seed: int | None = 0,
    level: float = 0.95,
    points: int = 101,
    min_n: int = 8,
) -> CurveBand:
    """Bootstrap band of the ROC curve: sensitivity at each false positive rate of a ``points`` grid.

    Each resample's ROC curve (the points of :func:`roc_curve`, joined by straight lines as the AUROC's
    trapezoids are) is read at the grid; the band is the percentile interval of those values per grid point,
    with the rows, the seed and the order statistics of :func:`bootstrap_metric`. NaN below ``min_n`` rows
    or with one class.
    """
    return _curve_band("roc", labels, scores, n_resamples, seed, level, points, min_n)


def pr_band(
    labels: ArrayLike,
    scores: ArrayLike,
    n_resamples: int = 2000,
    seed: int | None = 0,
    level: float = 0.95,
    points: int = 101,
    min_n: int = 8,
) -> CurveBand:
    """Bootstrap band of the precision-recall curve: precision at each recall of a ``points`` grid
    (the points of :func:`pr_curve` joined by straight lines, as the trapezoidal AUPRC); see :func:`roc_band`."""
    return _curve_band("pr", labels, scores, n_resamples, seed, level, points, min_n)


@dataclass(frozen=True)
class ColumnMetrics:
    """Everything reported for one score column (see :func:`column_metrics`)."""

    n: int
    n_positive: int
    auroc: float
    auroc_ci: tuple[float, float]
    auprc: float
    auprc_ci: tuple[float, float]
    average_precision: float
    average_precision_ci: tuple[float, float]
    n_bootstrap_valid: int
    operating_points: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists, NaN becomes None)."""

        def clean(v: Any) -> Any:
            if isinstance(v, float):
                return None if not np.isfinite(v) else v
            if isinstance(v, (tuple, list)):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, np.generic):
                return clean(v.item())
            return v

        return {
            "auroc": clean(self.auroc),
            "auroc_ci": clean(self.auroc_ci),
            "auprc": clean(self.auprc),
            "auprc_ci": clean(self.auprc_ci),
            "average_precision": clean(self.average_precision),
            "average_precision_ci": clean(self.average_precision_ci),
            "n": self.n,
            "n_positive": self.n_positive,
            "n_bootstrap_valid": self.n_bootstrap_valid,
            "operating_points": clean(self.operating_points),
        }


def column_metrics(
    labels: ArrayLike,
    scores: ArrayLike,
    n_resamples: int = 2000,
    seed: int | None = 0,
    thresholds: Sequence[float] = (),
    min_n: int = 8,
) -> ColumnMetrics:
    """AUROC, AUPRC, average precision with bootstrap CIs plus operating points for one column."""
    y, s = _as_binary(labels, scores)
    boot = bootstrap_metric(y, s, n_resamples=n_resamples, seed=seed, min_n=min_n)
    return ColumnMetrics(
        n=int(y.size),
        n_positive=int(y.sum()),
        auroc=boot.estimate["auroc"],
        auroc_ci=boot.ci["auroc"],
        auprc=boot.estimate["auprc"],
        auprc_ci=boot.ci["auprc"],
        average_precision=boot.estimate["average_precision"],
        average_precision_ci=boot.ci["average_precision"],
        n_bootstrap_valid=boot.n_valid,
        operating_points=sensitivity_specificity(y, s, thresholds) if len(thresholds) else [],
    )


def hybrid_auroc(
    labels: ArrayLike,
    readers: Mapping[str, ArrayLike],
    model: ArrayLike,
    lambdas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
) -> tuple[dict[str, dict[float, float]], dict[float, float]]:
    """AUROC of the human–machine hybrid ``λ·reader + (1−λ)·model`` for every reader and λ.

    ``λ = 1`` is the reader alone and ``λ = 0`` the model alone.

    Returns:
        ``(per_reader, mean)``: ``per_reader[name][λ]`` and the mean over readers ``mean[λ]``.
    """
    y, m = _as_binary(labels, model)
    lam = [float(v) for v in lambdas]
    for v in lam:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"hybrid weights must lie in [0, 1], got {v}")
    per_reader: dict[str, dict[float, float]] = {}
    for name, values in readers.items():
        _, r = _as_binary(y, values)
        per_reader[name] = {v: auroc(y, v * r + (1.0 - v) * m) for v in lam}
    mean = {
        v: float(np.mean([per_reader[k][v] for k in per_reader])) if per_reader else float("nan") for v in lam
    }
    return per_reader, mean


def ensemble_weights_grid(n_models: int, step: float = 0.1) -> NDArray[np.float64]:
    """All weight vectors on the simplex ``Σλ_i = 1, λ_i ≥ 0`` with spacing ``step``, shape ``(W, n_models)``."""
    if n_models < 1:
        raise ValueError("an ensemble needs at least one model")
    k = round(1.0 / step)
    if k < 1 or abs(k * step - 1.0) > 1e-9:
        raise ValueError(f"step must divide 1 evenly (e.g. 0.1, 0.05, 0.25), got {step}")
    if n_models == 1:
        return np.ones((1, 1))
    rows = []
    # Stars and bars: choose where the n_models − 1 bars go among k + n_models − 1 slots.
    for bars in itertools.combinations(range(k + n_models - 1), n_models - 1):
        edges = (-1, *bars, k + n_models - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(n_models)])
    return np.asarray(rows, dtype=np.float64) / k


@dataclass(frozen=True)
class EnsembleResult:
    """Weights chosen on a validation set and their AUROC there and (optionally) on a test set."""

    columns: list[str]
    weights: list[float]
    val_auroc: float
    test_auroc: float | None
    member_val_auroc: dict[str, float]
    member_test_auroc: dict[str, float] | None
    n_candidates: int


def _score_matrix(
    labels: ArrayLike, scores: Mapping[str, ArrayLike], columns: Sequence[str]
) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    """Validated labels and the ``(n, M)`` matrix of the named score columns."""
    pairs = [_as_binary(labels, scores[c]) for c in columns]
    return pairs[0][0], np.stack([s for _, s in pairs], axis=1)


def fit_ensemble_weights(
    val_labels: ArrayLike,
    val_scores: Mapping[str, ArrayLike],
    test_labels: ArrayLike | None = None,
    test_scores: Mapping[str, ArrayLike] | None = None,
    step: float = 0.1,
) -> EnsembleResult:
    """Choose ``Σλ_i·model_i`` weights (``Σλ_i = 1``) maximising validation AUROC; apply them to test.

    Ties between weight vectors go to the one closest to equal weights, so a flat optimum gives a
    plain average rather than an arbitrary corner.

    Args:
        val_labels: validation labels.
        val_scores: column name → validation scores (same length as the labels).
        test_labels: test labels (optional).
        test_scores: the same column names → test scores.
        step: grid spacing of the weights.
    """
    columns = list(val_scores)
    if not columns:
        raise ValueError("an ensemble needs at least one score column")
    y, x = _score_matrix(val_labels, val_scores, columns)  # x: (n, M)
    grid = ensemble_weights_grid(len(columns), step)
    aucs = np.array([auroc(y, x @ w) for w in grid])
    best_auc = np.nanmax(aucs)
    candidates = np.flatnonzero(aucs >= best_auc - 1e-12)
    uniform = np.full(len(columns), 1.0 / len(columns))
    best = candidates[np.argmin(np.abs(grid[candidates] - uniform).sum(axis=1))]
    weights = grid[best]
    member_val = {c: auroc(y, x[:, i]) for i, c in enumerate(columns)}
    test_auc = None
    member_test = None
    if test_labels is not None and test_scores is not None:
        missing = [c for c in columns if c not in test_scores]
        if missing:
            raise ValueError(f"test scores lack ensemble columns {missing}")
        yt, xt = _score_matrix(test_labels, test_scores, columns)
        test_auc = auroc(yt, xt @ weights)
        member_test = {c: auroc(yt, xt[:, i]) for i, c in enumerate(columns)}
    return EnsembleResult(
        columns=columns,
        weights=[float(v) for v in weights],
        val_auroc=float(aucs[best]),
        test_auroc=test_auc,
        member_val_auroc=member_val,
        member_test_auroc=member_test,
        n_candidates=int(grid.shape[0]),
    )
