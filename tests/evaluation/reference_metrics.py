"""Reference computations for the metric tests, written independently of ``mammogmic.evaluation.metrics``."""

from __future__ import annotations

from typing import Any

import numpy as np


def independent_paired_bootstrap(
    sk_metrics: Any, y: np.ndarray, a: np.ndarray, b: np.ndarray, n_resamples: int, seed: int
) -> dict[str, Any]:
    """AUROC(a) - AUROC(b) on the rows ``numpy.random.default_rng(seed).integers(0, n, (B, n))`` draws.

    Single-class resamples are skipped; CI = sorted differences at int(0.025 k), int(0.975 k); two-sided
    p = 2 min(P(d <= 0), P(d >= 0)), at most 1.
    """
    y, a, b = np.asarray(y), np.asarray(a), np.asarray(b)
    idx = np.random.default_rng(seed).integers(0, y.size, size=(n_resamples, y.size))
    d = np.sort(
        [
            sk_metrics.roc_auc_score(y[i], a[i]) - sk_metrics.roc_auc_score(y[i], b[i])
            for i in idx
            if 0 < y[i].sum() < y.size
        ]
    )
    k = d.size
    return {
        "difference": sk_metrics.roc_auc_score(y, a) - sk_metrics.roc_auc_score(y, b),
        "ci": (d[int(0.025 * k)], d[int(0.975 * k)]),
        "p_value": min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))),
        "n_valid": k,
    }
