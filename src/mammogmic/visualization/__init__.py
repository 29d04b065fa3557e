"""Pictures: the GMIC explanation figure, ROC/PR curves and the self-contained exam report."""

from __future__ import annotations

from mammogmic.visualization.curves import plot_pr, plot_roc
from mammogmic.visualization.figure import gmic_figure, save_gmic_figure
from mammogmic.visualization.report import (
    MAX_IMAGE_BYTES,
    ViewData,
    png_data_uri,
    write_exam_report,
)

__all__ = [
    "MAX_IMAGE_BYTES",
    "ViewData",
    "gmic_figure",
    "plot_pr",
    "plot_roc",
    "png_data_uri",
    "save_gmic_figure",
    "write_exam_report",
]
