"""Pictures: the GMIC explanation figure, ROC/PR curves and the self-contained HTML report."""

from __future__ import annotations

from mammogmic.visualization.curves import plot_pr, plot_roc
from mammogmic.visualization.figure import gmic_figure, save_gmic_figure
from mammogmic.visualization.report import GalleryItem, metrics_tables_html, png_data_uri, write_html_report

__all__ = [
    "GalleryItem",
    "gmic_figure",
    "metrics_tables_html",
    "plot_pr",
    "plot_roc",
    "png_data_uri",
    "save_gmic_figure",
    "write_html_report",
]
