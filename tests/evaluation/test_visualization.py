"""The explanation figure and the ROC/PR curves (the exam report: test_report.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mammogmic.visualization import gmic_figure, plot_pr, plot_roc, save_gmic_figure


def _figure_inputs(h: int = 256, w: int = 160, k: int = 3) -> dict:
    rng = np.random.default_rng(0)
    malignant = np.zeros((h, w), dtype=np.uint8)
    malignant[100:140, 40:90] = 255
    return {
        "image": rng.normal(size=(h, w)).astype(np.float32),
        "saliency": rng.random((2, h // 32, w // 32)).astype(np.float32),
        "patch_locations": np.array([[10, 10], [100, 40], [200, 100]])[:k],
        "crop_size": (32, 48),
        "patch_attention": np.array([0.5, 0.3, 0.2])[:k],
        "malignant_mask": malignant,
        "scores": {"benign": 0.1, "malignant": 0.9},
        "title": "img-1",
    }


def test_figure_png_size(tmp_path: Path) -> None:
    path = save_gmic_figure(tmp_path / "f.png", dpi=100, panel_width=2.0, **_figure_inputs())
    img = Image.open(path)
    # 4 panels of 2 in at 100 dpi → 800 px wide; height = panel (2·256/160 in) + patch row + title.
    assert img.size[0] == 800
    expected_h = round((2.0 * 256 / 160 + 8.0 / 4 * 1.25 + 0.6) * 100)
    assert abs(img.size[1] - expected_h) <= 2


def test_figure_panels_and_titles() -> None:
    fig = gmic_figure(**_figure_inputs())
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "input" and titles[1].startswith("patch map")
    assert any("attention 0.500" in t for t in titles)
    assert len(fig.axes) == 4 + 2 + 3  # panels, a colour bar per saliency panel, patches
    # Patch map has one rectangle per patch, at (col, row) of each location.
    rects = fig.axes[1].patches
    assert [(r.get_x(), r.get_y()) for r in rects] == [(10, 10), (40, 100), (100, 200)]
    # The lesion outline is on every top panel, not only the input.
    for ax in fig.axes[:4]:
        assert ax.collections, f"no lesion outline on {ax.get_title()!r}"
    # Colour bars span the saliency probability scale.
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2 and all(bar.get_ylim() == (0.0, 1.0) for bar in bars)
    # Saliency cells are centred on their receptive-field centres: the map's extent is shifted by half a cell.
    extent = fig.axes[3].images[-1].get_extent()
    assert extent == [-16.0, 160 - 16.0, 256 - 16.0, -16.0]
    mirrored = gmic_figure(**_figure_inputs(), mirrored=True)
    assert "mirrored" in mirrored.axes[0].get_title()


def test_figure_rejects_mismatched_inputs() -> None:
    bad = _figure_inputs()
    bad["patch_attention"] = np.array([1.0])
    with pytest.raises(ValueError, match="attention"):
        gmic_figure(**bad)
    bad = _figure_inputs()
    bad["malignant_mask"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match="mask has shape"):
        gmic_figure(**bad)


def test_curves_with_bands_and_operating_point() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    s = y * 0.5 + rng.random(60)
    roc = plot_roc({"breasts": (y, s)}, band_resamples=50, thresholds={"breasts": 0.6})
    ax = roc.axes[0]
    assert len(ax.collections) == 2  # the band, and the legend's band entry
    marker = [line for line in ax.lines if line.get_marker() == "o"]
    assert len(marker) == 1
    tp, fp = int(((s >= 0.6) & (y == 1)).sum()), int(((s >= 0.6) & (y == 0)).sum())
    x, value = marker[0].get_xdata()[0], marker[0].get_ydata()[0]
    assert (x, value) == pytest.approx((fp / (y == 0).sum(), tp / (y == 1).sum()))  # (1 - spec, sens)
    pr = plot_pr({"breasts": (y, s)}, thresholds={"breasts": 0.6})
    marker = [line for line in pr.axes[0].lines if line.get_marker() == "o"]
    assert (marker[0].get_xdata()[0], marker[0].get_ydata()[0]) == pytest.approx(
        (tp / (y == 1).sum(), tp / (tp + fp))  # (recall, precision)
    )
    assert not pr.axes[0].collections  # no band asked for
