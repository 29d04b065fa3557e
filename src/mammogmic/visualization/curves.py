"""ROC and precision-recall curve figures (matplotlib; the caller picks the backend).

Optionally with a pointwise bootstrap band around each curve (:func:`mammogmic.evaluation.metrics.roc_band`,
:func:`~mammogmic.evaluation.metrics.pr_band`) and an operating point marked on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from mammogmic.evaluation.metrics import (
    auprc,
    auroc,
    pr_band,
    pr_curve,
    roc_band,
    roc_curve,
    sensitivity_specificity,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_pr", "plot_roc"]


def _split(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    keep = np.isfinite(s)
    return y[keep], s[keep]


def _plot(
    kind: str,
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]],
    title: str,
    size: float,
    band_resamples: int,
    seed: int,
    thresholds: Mapping[str, float] | None,
) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size, size), dpi=150)
    ax = fig.add_subplot()
    banded = False
    for name, (labels, scores) in curves.items():
        y, s = _split(labels, scores)
        if y.size == 0 or y.all() or not y.any():
            continue
        if kind == "roc":
            fpr, tpr, _ = roc_curve(y, s)
            line = ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(y, s):.3f})")
        else:
            recall, precision, _ = pr_curve(y, s)
            line = ax.plot(recall, precision, label=f"{name} (AUPRC {auprc(y, s):.3f})")
            ax.axhline(y.mean(), color=line[0].get_color(), linestyle=":", linewidth=0.8)
        color = line[0].get_color()
        if band_resamples > 0:
            band = (roc_band if kind == "roc" else pr_band)(y, s, n_resamples=band_resamples, seed=seed)
            if np.isfinite(band.low).any():
                ax.fill_between(band.grid, band.low, band.high, color=color, alpha=0.18, linewidth=0)
                banded = True
        if thresholds and name in thresholds:
            point = sensitivity_specificity(y, s, [thresholds[name]])[0]
            called = point["tp"] + point["fp"]
            x = 1.0 - point["specificity"] if kind == "roc" else point["sensitivity"]
            value = point["sensitivity"] if kind == "roc" else (point["tp"] / called if called else 1.0)
            ax.plot(
                [x],
                [value],
                marker="o",
                markersize=7,
                markerfacecolor="white",
                markeredgecolor=color,
                markeredgewidth=2,
                linestyle="none",
                label=f"{name} at ≥ {thresholds[name]:.3g}: sens {point['sensitivity']:.2f}, "
                f"spec {point['specificity']:.2f}",
            )
    if banded:
        ax.fill_between([], [], [], color="0.5", alpha=0.18, label="95% bootstrap band")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
        _finish(ax, "False positive rate (1 − specificity)", "True positive rate (sensitivity)", title)
    else:
        _finish(ax, "Recall (sensitivity)", "Precision (PPV)", title, legend="lower left")
    return fig


def plot_roc(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]],
    title: str = "ROC",
    size: float = 5.0,
    band_resamples: int = 0,
    seed: int = 0,
    thresholds: Mapping[str, float] | None = None,
) -> Figure:
    """One ROC curve per entry ``name -> (labels, scores)``, with AUROC in the legend.

    Args:
        curves: ``name -> (labels, scores)``; entries with one class are skipped.
        title: axes title.
        size: figure width and height in inches.
        band_resamples: bootstrap resamples of a 95% band around each curve (0: none).
        seed: bootstrap seed.
        thresholds: ``name -> threshold`` of an operating point to mark on that curve.
    """
    return _plot("roc", curves, title, size, band_resamples, seed, thresholds)


def plot_pr(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]],
    title: str = "Precision-recall",
    size: float = 5.0,
    band_resamples: int = 0,
    seed: int = 0,
    thresholds: Mapping[str, float] | None = None,
) -> Figure:
    """One precision-recall curve per entry, with the trapezoidal AUPRC in the legend (see :func:`plot_roc`)."""
    return _plot("pr", curves, title, size, band_resamples, seed, thresholds)


def _finish(ax: Any, xlabel: str, ylabel: str, title: str, legend: str = "lower right") -> None:
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc=legend, fontsize="small")
    ax.figure.tight_layout()
