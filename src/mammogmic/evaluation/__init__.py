"""Evaluation: classification metrics with bootstrap CIs, aggregation to breasts/exams, localization Dice."""

from __future__ import annotations

from mammogmic.evaluation.aggregation import (
    breast_level,
    exam_level,
    infer_image_fields,
    metarepository_breast_table,
)
from mammogmic.evaluation.localization import DiceResult, dice_scores, upsample_nearest
from mammogmic.evaluation.metrics import (
    BootstrapResult,
    ColumnMetrics,
    EnsembleResult,
    PairedDifference,
    PairedTTest,
    auprc,
    auroc,
    average_precision,
    bootstrap_metric,
    column_metrics,
    fit_ensemble_weights,
    format_p_value,
    hybrid_auroc,
    paired_auroc_difference,
    paired_t_test,
    pr_curve,
    roc_curve,
    sensitivity_specificity,
)

__all__ = [
    "BootstrapResult",
    "ColumnMetrics",
    "DiceResult",
    "EnsembleResult",
    "PairedDifference",
    "PairedTTest",
    "auprc",
    "auroc",
    "average_precision",
    "bootstrap_metric",
    "breast_level",
    "column_metrics",
    "dice_scores",
    "exam_level",
    "fit_ensemble_weights",
    "format_p_value",
    "hybrid_auroc",
    "infer_image_fields",
    "metarepository_breast_table",
    "paired_auroc_difference",
    "paired_t_test",
    "pr_curve",
    "roc_curve",
    "sensitivity_specificity",
    "upsample_nearest",
]
