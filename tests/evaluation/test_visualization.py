"""The explanation figure, curves and the self-contained HTML report (structure + headless Chromium)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mammogmic.visualization import (
    GalleryItem,
    gmic_figure,
    plot_pr,
    plot_roc,
    save_gmic_figure,
    write_html_report,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


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


def _png(fig) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    return buf.getvalue()


def _report(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40)
    s = y * 0.5 + rng.random(40)
    result = {
        "label": "malignant_label",
        "group": "image",
        "n_rows": 40,
        "bootstrap": 10,
        "seed": 0,
        "metrics": {
            "malignant_pred": {
                "auroc": 0.8,
                "auroc_ci": [0.7, 0.9],
                "auprc": 0.75,
                "auprc_ci": [0.6, 0.85],
                "average_precision": 0.76,
                "average_precision_ci": [None, None],
                "n": 40,
                "n_positive": int(y.sum()),
                "operating_points": [],
            }
        },
    }
    curves = [("ROC", _png(plot_roc({"m": (y, s)}))), ("PR", _png(plot_pr({"m": (y, s)})))]
    fig_png = _png(gmic_figure(**_figure_inputs()))
    gallery = [
        GalleryItem("low<&>", fig_png, malignant=0.2, benign=0.5),
        GalleryItem("high", fig_png, malignant=0.9, labels="malignant 1"),
    ]
    return write_html_report(
        tmp_path / "report.html", "Test report", [("Image level", result)], curves, gallery
    )


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_report_structure(tmp_path: Path) -> None:
    path = _report(tmp_path)
    parser = _Collector()
    parser.feed(path.read_text(encoding="utf-8"))
    imgs = [a for t, a in parser.tags if t == "img"]
    assert len(imgs) == 4  # 2 curves + 2 gallery figures
    assert all((a["src"] or "").startswith("data:image/png;base64,") for a in imgs)
    # Self-contained: nothing fetched from elsewhere, no scripts.
    assert not any(t in ("script", "link", "iframe") for t, _ in parser.tags)
    figures = [a for t, a in parser.tags if t == "figure"]
    assert [f["data-image"] for f in figures] == ["high", "low<&>"]  # sorted by malignant score
    assert [t for t, _ in parser.tags].count("table") == 1


# Skipped when chromium is missing, unless MAMMOGMIC_REQUIRE_CHROMIUM=1 (set it where chromium is installed,
# e.g. CI after `apt-get install -y chromium`), which turns a missing browser into a failure.
@pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("MAMMOGMIC_REQUIRE_CHROMIUM") != "1",
    reason="chromium not installed (Debian: apt-get install -y chromium)",
)
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    assert CHROMIUM is not None, (
        "MAMMOGMIC_REQUIRE_CHROMIUM=1 but chromium is missing (apt-get install -y chromium)"
    )
    path = _report(tmp_path)
    profile = tmp_path / "profile"
    shot = tmp_path / "shot.png"
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "<h1>Test report</h1>" in dom
    assert dom.count('<figure data-image="') == 2
    assert 'id="gallery"' in dom and 'class="metrics"' in dom
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,900", path.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (900, 1200)
    assert img.std() > 10  # the page drew text/images, not a blank page
