"""ROC and precision-recall curve figures (matplotlib; the caller picks the backend)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from mammogmic.evaluation.metrics import auprc, auroc, pr_curve, roc_curve

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_pr", "plot_roc"]


def _split(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    keep = np.isfinite(s)
    return y[keep], s[keep]


def plot_roc(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]], title: str = "ROC", size: float = 5.0
) -> Figure:
    """One ROC curve per entry ``name -> (labels, scores)``, with AUROC in the legend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size, size), dpi=150)
    ax = fig.add_subplot()
    for name, (labels, scores) in curves.items():
        y, s = _split(labels, scores)
        if y.size == 0 or y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    _finish(ax, "False positive rate (1 − specificity)", "True positive rate (sensitivity)", title)
    return fig


def plot_pr(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]], title: str = "Precision-recall", size: float = 5.0
) -> Figure:
    """One precision-recall curve per entry, with the trapezoidal AUPRC in the legend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size, size), dpi=150)
    ax = fig.add_subplot()
    for name, (labels, scores) in curves.items():
        y, s = _split(labels, scores)
        if y.size == 0 or y.all() or not y.any():
            continue
        recall, precision, _ = pr_curve(y, s)
        line = ax.plot(recall, precision, label=f"{name} (AUPRC {auprc(y, s):.3f})")
        ax.axhline(y.mean(), color=line[0].get_color(), linestyle=":", linewidth=0.8)
    _finish(ax, "Recall (sensitivity)", "Precision (PPV)", title)
    return fig


def _finish(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    ax.figure.tight_layout()
