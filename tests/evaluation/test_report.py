"""The exam report (report.html): content, hanging order, picture budget, overlays, and its CLI options."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mammogmic import __version__
from mammogmic.cli.main import main
from mammogmic.evaluation.table import OperatingPoint
from mammogmic.visualization.report import HANGING, MAX_IMAGE_BYTES, NOTICE, ViewData, write_exam_report

INPUT = (640, 416)  # model input of the hand-made views (H, W): the thumbnail keeps every noise pixel


def _view(image_id: str, view: str, seed: int, masks: bool = True) -> ViewData:
    """A view whose thumbnail is noise (JPEG cannot shrink it much) with one hot malignant cell."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=INPUT).astype(np.float32)
    saliency = np.full((2, 20, 13), 0.1, dtype=np.float32)
    saliency[1, 5, 3] = 0.95
    lesion = np.zeros((2, *INPUT), dtype=np.uint8)
    lesion[1, 300:420, 150:260] = 1
    return ViewData.from_arrays(
        image_id,
        view,
        image,
        saliency,
        patch_locations=[[100, 40], [600, 300]],
        patch_attention=[0.7, 0.3],
        crop_size=(128, 96),
        masks=lesion if masks else None,
        input_key=f"in-{image_id}",
        run_key="run-1",
    )


def _rows(specs: list[tuple[str, str, str, float, float | None]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "image_index": f"{exam}_{view}",
                "benign_pred": 0.2,
                "malignant_pred": score,
                "malignant_label": label,
                "image_id": f"{exam}_{view}",
                "exam_id": exam,
                "patient_id": patient,
                "laterality": view[0],
                "view": view[2:],
                "input_key": f"in-{exam}_{view}",
                "run_key": "run-1",
                "density": "A" if exam == "e1" else "C",
            }
            for exam, patient, view, score, label in specs
        ]
    )


def _figures(folder: Path, images: pd.DataFrame, masks: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in images.iterrows():
        _view(row["image_index"], f"{row['laterality']}-{row['view']}", int(i), masks).save(
            folder / f"{row['image_index']}.npz"
        )
        (folder / f"{row['image_index']}.png").write_bytes(b"figure")
    return folder


class _Page(HTMLParser):
    """Tags with attributes, the text of each figure, and the raw HTML of each figure element."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.figures: list[dict[str, Any]] = []
        self._figure: dict[str, Any] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "figure":
            self._figure = {"attrs": a, "text": "", "tags": []}
            self.figures.append(self._figure)
        elif self._figure is not None:
            self._figure["tags"].append((tag, a))

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._figure = None

    def handle_data(self, data: str) -> None:
        if self._figure is not None:
            self._figure["text"] += data


def _decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


RUN = {
    "models": [
        {
            "name": "gmic",
            "path": "models/gmic.safetensors",
            "sha256": "ab" * 32,
            "percent_t": 0.02,
            "input_contract": {"input_shape": list(INPUT), "window_shape": None},
        }
    ],
    "mammogmic_version": "9.9.9",
    "command": "mammogmic visualize --report ...",
    "run_key": "run-1",
    "complete": True,
}


def test_exam_report(tmp_path: Path) -> None:
    images = _rows(
        [
            ("e1", "P1", "R-CC", 0.8, 1),
            ("e1", "P1", "L-CC", 0.2, 0),
            ("e1", "P1", "R-MLO", 0.6, 1),
            ("e1", "P1", "L-MLO", 0.4, 0),
            ("e2", "P2", "L-CC", 0.3, 0),
            ("e2", "P2", "L-MLO", 0.1, 0),
        ]
    )
    figures = _figures(tmp_path / "figures", images)
    errors = pd.DataFrame(
        [
            {
                "image_id": "e2_R-CC",
                "path": "x.png",
                "stage": "read",
                "error": "x.png: not a PNG",
                "exam_id": "e2",
                "view": "R-CC",
            }
        ]
    )
    result = write_exam_report(
        tmp_path / "report.html",
        images,
        figures,
        run=RUN,
        errors=errors,
        operating_point=OperatingPoint.given(0.5),
        n_bootstrap=20,
    )
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    page = _Page(text)

    # Self-contained: no scripts or external resources; pictures inline; links to the full figures or anchors.
    assert not any(t in ("script", "link", "iframe", "object", "embed") for t, _ in page.tags)
    assert all((a.get("src") or "").startswith("data:image/") for t, a in page.tags if t == "img")
    hrefs = [a["href"] for t, a in page.tags if t == "a"]
    assert hrefs and all(
        h.startswith(("#exam-", "#errors")) or re.fullmatch(r"figures/e\d_[LR]-(CC|MLO)\.png", h)
        for h in hrefs
    )
    assert text.count(NOTICE) == 2  # top and bottom

    # Exams by exam score (e1: max(0.7, 0.3) = 0.7; e2: 0.2), four views each in hanging order.
    assert re.findall(r'<section class="exam" id="[^"]+" data-exam="([^"]+)"', text) == ["e1", "e2"]
    order = [v for row in HANGING for v in row]
    assert [f["attrs"]["data-view"] for f in page.figures] == order * 2
    e2 = {f["attrs"]["data-view"]: f for f in page.figures[4:]}
    assert "failed (read): x.png: not a PNG" in e2["R-CC"]["text"]
    assert "not in this run" in e2["R-MLO"]["text"]
    assert {"e2_L-CC", "e2_L-MLO"} == {f["attrs"].get("data-image") for f in page.figures[4:]} - {None}

    # Breast = mean of its views, exam = the higher breast; the call per breast at 0.5.
    section = text.split('data-exam="e1"')[1].split("</section>")[0]
    assert "<td>right (2 img)</td><td><b>0.700</b></td>" in section
    assert "<td>left (2 img)</td><td><b>0.300</b></td>" in section
    assert "Exam malignant score <b>0.700</b>" in section
    right, left = (
        section.split("right (2 img)")[1].split("</tr>")[0],
        section.split("left (2 img)")[1].split("</tr>")[0],
    )
    assert "positive" in right and "negative" in left

    # At most MAX_IMAGE_BYTES of HTML per image, although the noise thumbnail alone would not fit at JPEG 85.
    figures_html = re.findall(r"<figure .*?</figure>", text, flags=re.S)
    assert len(figures_html) == 8
    sizes = {
        f["attrs"].get("data-image"): len(h.encode()) for f, h in zip(page.figures, figures_html, strict=True)
    }
    assert all(size <= MAX_IMAGE_BYTES for size in sizes.values()), sizes
    assert result["image_bytes"] == {k: v for k, v in sizes.items() if k}
    thumb = ViewData.load(figures / "e1_R-CC.npz").thumb
    plain = io.BytesIO()
    Image.fromarray(thumb).save(plain, format="JPEG", quality=85)
    assert len(base64.b64encode(plain.getvalue())) > MAX_IMAGE_BYTES  # the budget had to act

    # Right views are mirrored back for hanging, left ones are not; the patch boxes follow.
    def base_of(view: str) -> np.ndarray:
        figure = next(f for f in page.figures if f["attrs"]["data-view"] == view)
        return _decode(
            next(a["src"] for t, a in figure["tags"] if t == "img" and "base" in (a.get("class") or ""))
        )

    for view, mirrored in (("R-CC", True), ("L-CC", False)):
        shown = base_of(view).astype(np.float32)
        original = np.asarray(
            Image.fromarray(ViewData.load(figures / f"e1_{view}.npz").thumb).resize(shown.shape[::-1])
        ).astype(np.float32)
        same = np.corrcoef(shown.ravel(), original.ravel())[0, 1]
        flipped = np.corrcoef(shown.ravel(), original[:, ::-1].ravel())[0, 1]
        assert (flipped > 0.5 > same) if mirrored else (same > 0.5 > flipped), (view, same, flipped)
    r_cc = section.split('data-view="R-CC"')[1].split("</figure>")[0]
    l_cc = section.split('data-view="L-CC"')[1].split("</figure>")[0]
    assert '<rect x="40" y="100" width="96" height="128"' in l_cc
    assert f'<rect x="{INPUT[1] - 40 - 96}" y="100" width="96" height="128"' in r_cc
    assert ">1</text>" in r_cc and "patch 1: attention 0.700" in r_cc

    # The malignant overlay is transparent where the map is low (0.1) and drawn at the hot cell.
    figure = next(f for f in page.figures if f["attrs"]["data-view"] == "L-CC")
    overlay = _decode(next(a["src"] for t, a in figure["tags"] if "ov-malignant" in (a.get("class") or "")))
    alpha = overlay[..., 3]
    assert overlay.shape[2] == 4 and (alpha == 0).mean() > 0.9 and alpha.max() > 150
    hot_row, hot_col = np.unravel_index(int(alpha.argmax()), alpha.shape)
    assert abs(hot_row / alpha.shape[0] - 5 / 20) < 0.06 and abs(hot_col / alpha.shape[1] - 3 / 13) < 0.08
    assert any("truth" in (a.get("class") or "") for t, a in figure["tags"])  # lesion outlines with masks

    # Cohort: labels known → metrics, curves, the operating point, subgroups; provenance; failures counted.
    cohort = text.split('<section id="cohort">')[1].split("</section>")[0]
    assert "Discrimination" in cohort and cohort.count("<img ") == 2
    assert "<td>breasts</td><td>1.000</td><td>1.000</td><td>1</td><td>0</td><td>2</td><td>0</td>" in cohort
    assert 'data-subgroup="density"' in cohort
    assert "ab" * 32 in text and "mammogmic visualize --report ..." in text and "9.9.9" in text
    assert "1 image(s) failed" in text and "Failed images: 1" in text


def test_exam_report_without_labels_pictures_or_run(tmp_path: Path) -> None:
    images = _rows([("e1", "P1", "L-CC", 0.4, None), ("e1", "P1", "L-MLO", 0.6, None)])
    images = images.drop(columns=["malignant_label", "density"])
    figures = tmp_path / "figures"
    figures.mkdir()
    _view("e1_L-CC", "L-CC", 0, masks=False).save(figures / "e1_L-CC.npz")
    stale = _view("e1_L-MLO", "L-MLO", 1, masks=False)
    stale.input_key = "another input"
    stale.save(figures / "e1_L-MLO.npz")
    write_exam_report(tmp_path / "report.html", images, figures, n_bootstrap=0)
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    page = _Page(text)
    views = {f["attrs"]["data-view"]: f for f in page.figures}
    assert "picture of an earlier prediction" in views["L-MLO"]["text"]  # never a picture of other inputs
    assert "malignant 0.600" in views["L-MLO"]["text"]  # its scores are still shown
    assert not any(
        t == "a" and (a.get("href") or "").startswith("figures/") for t, a in page.tags
    )  # no figure files
    assert not any("truth" in (a.get("class") or "") for t, a in page.tags)
    assert "Malignant labels are not known" in text
    assert "<th>call</th>" not in text and "call-pos" not in text.split("</style>")[1]  # no operating point
    assert "No run.json was found" in text and "none failed" in text


def test_view_data_round_trip(tmp_path: Path) -> None:
    data = _view("a/b", "R-MLO", 3)
    data.save(tmp_path / "v.npz")
    back = ViewData.load(tmp_path / "v.npz")
    assert (back.image_id, back.view, back.input_shape, back.crop_size) == ("a/b", "R-MLO", INPUT, (128, 96))
    assert back.thumb.shape == (640, 416) and back.masks is not None and back.masks.shape == (2, 640, 416)
    np.testing.assert_array_equal(back.patch_locations, [[100, 40], [600, 300]])
    np.testing.assert_allclose(back.saliency, data.saliency, atol=1e-3)  # stored as float16
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a report picture file"):
        ViewData.load(tmp_path / "bad.npz")


def _manifest(folder: Path, breast_png: Any, exams: dict[str, list[str]], labels: bool = True) -> Path:
    rows = []
    for e, (exam, views) in enumerate(exams.items()):
        for v, view in enumerate(views):
            image_id = f"{exam}_{view}"
            if view.endswith("broken"):
                (folder / f"{image_id}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
                view = view.split("-broken")[0]
            else:
                breast_png(folder / f"{image_id}.png", view[0], 10 * e + v)
            row = {
                "image_id": image_id,
                "image_path": f"{image_id}.png",
                "patient_id": f"p{e}",
                "exam_id": exam,
                "laterality": view[0],
                "view": view[2:],
                "density": "ABCD"[e % 4],
                "age": str(45 + 10 * e),
            }
            if labels:
                row["malignant_label"] = int(view[0] == ("R" if e % 2 else "L"))
                row["benign_label"] = 0
            rows.append(row)
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_predict_report_with_a_fitted_operating_point(
    tmp_path: Path, tiny_model: Path, breast_png: Any, size_args: list[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    val = _manifest(data, breast_png, {"v0": ["L-CC", "R-CC"]})
    test = tmp_path / "test"
    test.mkdir()
    manifest = _manifest(test, breast_png, {"t0": ["L-CC", "R-CC", "L-MLO", "R-MLO-broken"]})
    common = ["--model", str(tiny_model), *size_args]
    assert main(["predict", "--manifest", str(val), "--out", str(tmp_path / "val"), *common]) == 0
    out = tmp_path / "out"
    table = tmp_path / "val" / "image_predictions.csv"
    args = ["predict", "--manifest", str(manifest), "--out", str(out), *common, "--dpi", "30"]
    rc = main([*args, "--report", "--operating-point", "sensitivity=1", "--operating-table", str(table)])
    assert rc == 1  # the broken image failed; everything else is written
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "fitted on " + str(table) in text and "sensitivity 1 fitted" in text
    assert "1 image(s) failed" in text
    t0 = text.split('data-exam="t0"')[1].split("</section>")[0]
    assert re.search(r'data-view="R-MLO"><div class="placeholder"><b>R-MLO</b><br>failed \(read\)', t0)
    assert 'data-subgroup="density"' in text and 'data-subgroup="age band"' in text
    run = json.loads((out / "run.json").read_text())
    assert run["command"].startswith("mammogmic predict --manifest")
    # The package version, with the commit when the tests run from a git checkout (as they do here).
    assert re.fullmatch(
        re.escape(__version__) + r"(\+git\.[0-9a-f]{4,}(\.dirty)?)?", run["mammogmic_version"]
    )
    assert run["mammogmic_version"] in text
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(
        f"t0_{view}.{ext}" for view in ("L-CC", "R-CC", "L-MLO") for ext in ("npz", "png")
    )
    # A rerun without --report keeps the predictions and removes the report that showed the earlier state.
    assert main(args) == 1
    assert not (out / "report.html").exists()


def test_report_options_are_checked_before_anything_is_written(
    tmp_path: Path,
    tiny_model: Path,
    breast_png: Any,
    size_args: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    manifest = _manifest(data, breast_png, {"e0": ["L-CC"]}, labels=False)
    out = tmp_path / "out"
    base = ["predict", "--manifest", str(manifest), "--model", str(tiny_model), "--out", str(out), *size_args]
    cases = [
        (["--threshold", "0.3"], "only apply to the report: add --report"),
        (["--report", "--operating-point", "sensitivity=0.9"], "give --operating-table"),
        (["--report", "--operating-table", str(manifest)], "give --operating-point too"),
        (["--report", "--threshold", "1.5"], "--threshold"),
        (
            ["--report", "--operating-point", "specificity=0.9", "--operating-table", str(manifest)],
            "no label column 'malignant_label'",
        ),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err
        assert not out.exists()
    with pytest.raises(SystemExit):
        main([*base, "--report", "--operating-point", "ppv=0.9"])
    assert "expected sensitivity=S or specificity=P" in capsys.readouterr().err


# Measures the first exam as a reader sees it after clicking it in the exam list (the section scrolled to the
# top, under the sticky tool bar), then switches the overlay to benign with the tool bar's radio button.
_PROBE = """<script>
window.addEventListener('load', () => {
  const sec = document.querySelector('section.exam');
  sec.scrollIntoView();
  const out = {vh: innerHeight, vw: innerWidth, bar: document.querySelector('nav.toolbar').getBoundingClientRect().bottom,
               views: {}};
  for (const f of sec.querySelectorAll('.hanging figure.view')) {
    const r = f.querySelector('.frame').getBoundingClientRect();
    const img = f.querySelector('img.base');
    out.views[f.dataset.view] = {left: r.left, top: r.top, right: r.right, bottom: r.bottom,
      loaded: img.complete && img.naturalWidth > 0,
      shown: [...f.querySelectorAll('.ov')].filter(e => getComputedStyle(e).display !== 'none').map(e => e.className)};
  }
  document.getElementById('ov-benign').checked = true;
  out.benign = [...sec.querySelectorAll('.ov')].filter(e => getComputedStyle(e).display !== 'none').length;
  document.body.setAttribute('data-layout', JSON.stringify(out));
});
</script>"""


@pytest.mark.parametrize("window", [(1280, 900), (1366, 768)])
def test_report_layout_in_headless_chromium(
    tmp_path: Path, chromium: str, tiny_model: Path, size_args: list[str], window: tuple[int, int]
) -> None:
    import html as html_lib
    import subprocess

    from mammogmic.data.synth import SynthConfig, generate_dataset

    manifest = generate_dataset(tmp_path / "synth", 1, (256, 160), 7, SynthConfig.demo(), 1)
    out = tmp_path / "out"
    args = ["visualize", "--manifest", str(manifest), "--model", str(tiny_model), "--out", str(out)]
    assert main([*args, "--report", "--threshold", "0.5", "--dpi", "30", *size_args]) == 0
    text = (out / "report.html").read_text(encoding="utf-8")
    assert all(
        len(f.encode()) <= MAX_IMAGE_BYTES for f in re.findall(r"<figure .*?</figure>", text, flags=re.S)
    )
    probe = out / "probe.html"
    probe.write_text(text.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--window-size={window[0]},{window[1]}",
        "--dump-dom",
        probe.as_uri(),
    ]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'data-layout="([^"]*)"', dom)
    assert found, dom[-2000:]
    layout = json.loads(html_lib.unescape(found.group(1)))
    views = layout["views"]
    assert list(views) == ["R-CC", "L-CC", "R-MLO", "L-MLO"]
    for name, v in views.items():
        assert v["loaded"], name
        # All four at once: below the tool bar, above the window's bottom edge, inside its width.
        assert v["top"] >= layout["bar"] - 1 and v["bottom"] <= layout["vh"] + 1, (name, v, layout["vh"])
        assert v["left"] >= 0 and v["right"] <= layout["vw"], (name, v)
        assert v["bottom"] - v["top"] > 150, (name, v)  # large enough to read
        assert v["shown"] == ["layer ov ov-malignant"], (name, v["shown"])  # the default overlay only
    for top, bottom in (("R-CC", "R-MLO"), ("L-CC", "L-MLO")):
        assert views[bottom]["top"] >= views[top]["bottom"] - 1  # CC above MLO
    for right, left in (("R-CC", "L-CC"), ("R-MLO", "L-MLO")):
        assert abs(views[right]["top"] - views[left]["top"]) < 2  # one row
        assert 0 <= views[left]["left"] - views[right]["right"] < 12  # right breast on the left, back to back
    assert layout["benign"] == 4  # the tool bar switched every view to the benign map


def test_exam_report_when_every_image_failed(tmp_path: Path) -> None:
    images = pd.DataFrame(columns=["image_index", "benign_pred", "malignant_pred"])  # what predict leaves
    errors = pd.DataFrame(
        [
            {
                "image_id": "a",
                "path": "a.png",
                "stage": "read",
                "error": "a.png: <empty>",
                "exam_id": None,
                "view": None,
            }
        ]
    )
    result = write_exam_report(
        tmp_path / "report.html", images, tmp_path / "figures", errors=errors, n_bootstrap=0
    )
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert result["n_exams"] == 0 and "0 exam(s), 0 image(s) predicted" in text
    assert "Failed images: 1" in text and "a.png: &lt;empty&gt;" in text  # reasons are escaped


def test_max_figures_is_a_deprecated_spelling_of_max_exams(caplog: pytest.LogCaptureFixture) -> None:
    import argparse

    from mammogmic.cli.eval_cmds import _report_settings

    args = argparse.Namespace(
        max_figures=10, max_exams=100, report=True, threshold=None, operating_point=None, operating_table=None
    )
    with caplog.at_level("WARNING"):
        assert _report_settings(args) is None
    assert args.max_exams == 3  # 10 figures: the exams of 4 views that hold them
    assert "--max-figures is deprecated" in caplog.text
