"""The exam report: one self-contained HTML page per prediction run, readable by a radiologist.

Layout of ``report.html``:

* a "research use only" notice and a sticky tool bar: which saliency map is drawn (malignant, benign or none),
  patch outlines and lesion outlines on or off (pure CSS, no scripts), and the colour bar of the map;
* the exam list: every exam with its breast and exam scores (and the call per breast when an operating point
  is given), sorted by exam malignant score, highest first;
* one section per exam (the ``max_exams`` highest): the four views hung as a reader hangs them, R-CC L-CC over
  R-MLO L-MLO, back to back (right views mirrored back from the model's orientation), each with its saliency
  overlay, the K patches outlined and numbered with their attention, and a link to the full-size explanation
  figure; a missing or failed view is a placeholder that says why; the breast scores beside them;
* the cohort (when labels are known): metric tables with bootstrap CIs at image, breast and exam level, ROC and
  PR curves with 95% bootstrap bands and the operating point marked, sensitivity/specificity at it, and the same
  per subgroup (density, vendor, site, dataset, age band: the columns the manifest has);
* provenance (models and their SHA-256, t, input contracts, run settings, code version, command line: the run's
  ``run.json``) and the images that failed (``errors.csv``).

Breast and exam scores come from :mod:`mammogmic.evaluation.aggregation` (breast = mean over its views of each
view's mean, exam = maximum over its breasts) and the metrics from :mod:`mammogmic.evaluation.table`, the same
numbers ``breast_predictions.csv`` and ``mammogmic evaluate`` give.

Per image the report reads ``figures/<stem>.npz`` (:class:`ViewData`, written by predict/visualize as each image
is predicted): a greyscale thumbnail, the saliency maps and the patches. Pictures are embedded as base64
``data:`` URIs, at most :data:`MAX_IMAGE_BYTES` per image (a smaller JPEG is chosen when one is too large), so the
page opens from disk, can be archived or e-mailed, and fetches nothing.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from mammogmic._outdir import atomic_write_bytes, atomic_write_text
from mammogmic.evaluation.aggregation import breast_level, exam_level
from mammogmic.evaluation.localization import upsample_aligned
from mammogmic.evaluation.outputs import file_stem
from mammogmic.evaluation.table import (
    OperatingPoint,
    evaluate_table,
    subgroup_columns,
    subgroup_metrics,
)
from mammogmic.visualization.overlay import (
    BENIGN_COLOR,
    CLASSES,
    MALIGNANT_COLOR,
    PATCH_COLORS,
    SALIENCY_LOW,
    display_scale,
    hanging_mirror,
    mask_outline,
    saliency_alpha,
    saliency_colormap,
    saliency_rgba,
)

__all__ = [
    "HANGING",
    "MAX_IMAGE_BYTES",
    "NOTICE",
    "ViewData",
    "png_data_uri",
    "write_exam_report",
]

#: Most bytes of HTML one image (its thumbnail, overlays, outlines and caption) may take in the report.
MAX_IMAGE_BYTES = 200_000
#: The hanging order: rows of (viewer's left, viewer's right).
HANGING = (("R-CC", "L-CC"), ("R-MLO", "L-MLO"))
#: Height in pixels of the thumbnails kept per image (shown at about 38% of the window height).
THUMB_HEIGHT = 640
NOTICE = (
    "Research use only. Not for clinical diagnosis: these are outputs of research software that no regulator "
    "has cleared, and must not guide the care of a patient."
)
_TEXT_BUDGET = 12_000  # bytes kept for a view's caption, patch outlines and markup within MAX_IMAGE_BYTES


@dataclass
class ViewData:
    """What the report draws of one image; saved as ``figures/<stem>.npz`` while predicting.

    Every array is as the model saw the image (right views mirrored to face right); the report mirrors
    right views back when it hangs them.

    Attributes:
        image_id: the image's id (``image_index`` in the prediction tables).
        view: ``R-CC``, ``L-MLO``...
        thumb: ``(th, tw)`` uint8 greyscale thumbnail of the model input (percentile-scaled).
        input_shape: ``(H, W)`` of the model input: the coordinate frame of the patches and saliency maps.
        saliency: ``(2, h, w)`` benign/malignant saliency in [0, 1].
        patch_locations: ``(K, 2)`` upper-left ``(row, col)`` of each patch in input pixels, in retrieval order.
        patch_attention: ``(K,)`` attention weight of each patch.
        crop_size: ``(crop_h, crop_w)`` of the patches.
        masks: ``(2, th, tw)`` benign/malignant lesion masks at thumbnail size, when the manifest had masks.
        input_key: the ``input_key`` of the prediction row it belongs to.
        run_key: the ``run_key`` of that row.
    """

    image_id: str
    view: str
    thumb: NDArray[np.uint8]
    input_shape: tuple[int, int]
    saliency: NDArray[np.float32]
    patch_locations: NDArray[np.int64]
    patch_attention: NDArray[np.float32]
    crop_size: tuple[int, int]
    masks: NDArray[np.bool_] | None = None
    input_key: str | None = None
    run_key: str | None = None

    @classmethod
    def from_arrays(
        cls,
        image_id: str,
        view: str,
        image: Any,
        saliency: Any,
        patch_locations: Any,
        patch_attention: Any,
        crop_size: Sequence[int],
        masks: Any = None,
        input_key: str | None = None,
        run_key: str | None = None,
        height: int = THUMB_HEIGHT,
    ) -> ViewData:
        """From the model input ``(H, W)`` and the model's outputs for it (see the attributes)."""
        from PIL import Image

        img = np.asarray(image, dtype=np.float32)
        if img.ndim != 2:
            raise ValueError(f"{image_id}: image must be (H, W), got shape {img.shape}")
        sal = np.asarray(saliency, dtype=np.float32)
        if sal.ndim != 3 or sal.shape[0] != 2:
            raise ValueError(f"{image_id}: saliency must be (2, h, w), got shape {sal.shape}")
        big_h, big_w = img.shape
        th = max(1, min(height, big_h))
        tw = max(1, round(big_w * th / big_h))
        gray = Image.fromarray(np.round(display_scale(img) * 255).astype(np.uint8))
        thumb = np.asarray(gray.resize((tw, th), Image.Resampling.BOX))
        small_masks = None
        if masks is not None:
            m = np.asarray(masks)
            if m.shape != (2, big_h, big_w):
                raise ValueError(f"{image_id}: masks must be (2, {big_h}, {big_w}), got {m.shape}")
            small_masks = np.stack(
                [
                    np.asarray(
                        Image.fromarray(((c != 0) * 255).astype(np.uint8)).resize(
                            (tw, th), Image.Resampling.BOX
                        )
                    )
                    >= 64
                    for c in m
                ]
            )
        locations = np.asarray(patch_locations, dtype=np.int64).reshape(-1, 2)
        attention = np.asarray(patch_attention, dtype=np.float32).reshape(-1)
        if locations.shape[0] != attention.shape[0]:
            raise ValueError(
                f"{image_id}: {locations.shape[0]} patches but {attention.shape[0]} attention weights"
            )
        return cls(
            image_id=image_id,
            view=view,
            thumb=thumb,
            input_shape=(int(big_h), int(big_w)),
            saliency=sal,
            patch_locations=locations,
            patch_attention=attention,
            crop_size=(int(crop_size[0]), int(crop_size[1])),
            masks=small_masks,
            input_key=input_key,
            run_key=run_key,
        )

    def save(self, path: Path) -> None:
        """Write as a compressed ``.npz`` (atomically; no pickles)."""
        arrays: dict[str, Any] = {
            "image_id": np.array(self.image_id),
            "view": np.array(self.view),
            "thumb": self.thumb,
            "input_shape": np.asarray(self.input_shape, dtype=np.int64),
            "saliency": self.saliency.astype(np.float16),
            "patch_locations": self.patch_locations,
            "patch_attention": self.patch_attention,
            "crop_size": np.asarray(self.crop_size, dtype=np.int64),
            "input_key": np.array(self.input_key or ""),
            "run_key": np.array(self.run_key or ""),
        }
        if self.masks is not None:
            arrays["masks"] = self.masks
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> ViewData:
        """Read a file written by :meth:`save` (``allow_pickle=False``: the file is data).

        Raises:
            ValueError: the file is not such a file.
        """
        try:
            with np.load(path, allow_pickle=False) as f:
                return cls(
                    image_id=str(f["image_id"]),
                    view=str(f["view"]),
                    thumb=f["thumb"].astype(np.uint8),
                    input_shape=(int(f["input_shape"][0]), int(f["input_shape"][1])),
                    saliency=f["saliency"].astype(np.float32),
                    patch_locations=f["patch_locations"].astype(np.int64).reshape(-1, 2),
                    patch_attention=f["patch_attention"].astype(np.float32).reshape(-1),
                    crop_size=(int(f["crop_size"][0]), int(f["crop_size"][1])),
                    masks=f["masks"].astype(bool) if "masks" in f.files else None,
                    input_key=str(f["input_key"]) or None,
                    run_key=str(f["run_key"]) or None,
                )
        except (OSError, KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"{path}: not a report picture file ({exc})") from None


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` URI of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _jpeg_data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _png(array: NDArray[np.uint8]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


@dataclass
class _Pictures:
    """The embedded pictures of one view, in display orientation."""

    base: str
    overlays: dict[str, str]
    truth: str | None
    width: int
    height: int

    @property
    def n_bytes(self) -> int:
        return len(self.base) + sum(len(v) for v in self.overlays.values()) + len(self.truth or "")


def _breast_weight(gray: NDArray[np.uint8]) -> NDArray[np.float32] | None:
    """Opacity factor that keeps the overlay off the background (dark pixels); ``None`` when unclear."""
    weight = np.clip((gray.astype(np.float32) / 255.0 - 0.03) / 0.05, 0.0, 1.0)
    if float((weight > 0.5).mean()) < 0.05:
        return None  # (nearly) no tissue found: draw the map everywhere rather than nowhere
    return weight


def _pictures(data: ViewData, mirror: bool, budget: int) -> _Pictures:
    """Encode the thumbnail (JPEG), both saliency overlays and the lesion outlines (PNG) within ``budget``
    bytes of data URIs: the JPEG quality drops first, then the size."""
    from PIL import Image

    full_h, full_w = data.thumb.shape
    scale, quality = 1.0, 85
    while True:
        th, tw = max(16, round(full_h * scale)), max(8, round(full_w * scale))
        gray = data.thumb
        if (th, tw) != gray.shape:
            gray = np.asarray(Image.fromarray(gray).resize((tw, th), Image.Resampling.BOX))
        shown = gray[:, ::-1] if mirror else gray
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(shown)).save(
            buffer, format="JPEG", quality=quality, optimize=True
        )
        base = _jpeg_data_uri(buffer.getvalue())
        # Overlays at half the thumbnail's size (the browser scales them smoothly): saliency varies over ~64
        # input pixels, several thumbnail pixels.
        oh, ow = max(4, th // 2), max(4, tw // 2)
        small = np.asarray(Image.fromarray(gray).resize((ow, oh), Image.Resampling.BOX))
        weight = _breast_weight(small)
        overlays = {}
        for index, name in enumerate(CLASSES):
            # Cells at their receptive-field centres (the project's aligned upsampling).
            rgba = saliency_rgba(upsample_aligned(data.saliency[index], (oh, ow)), name, weight)
            overlays[name] = png_data_uri(_png(np.ascontiguousarray(rgba[:, ::-1] if mirror else rgba)))
        truth = None
        if data.masks is not None and data.masks.any():
            layer = np.zeros((th, tw, 4), dtype=np.uint8)
            for index, color in ((0, BENIGN_COLOR), (1, MALIGNANT_COLOR)):
                mask = np.asarray(
                    Image.fromarray(data.masks[index].astype(np.uint8) * 255).resize(
                        (tw, th), Image.Resampling.NEAREST
                    )
                )
                edge = mask_outline(mask)
                edge[1:] |= edge[:-1]  # two pixels wide, readable at the shown size
                edge[:, 1:] |= edge[:, :-1]
                layer[edge] = (*_rgb(color), 255)
            truth = png_data_uri(_png(np.ascontiguousarray(layer[:, ::-1] if mirror else layer)))
        pictures = _Pictures(base, overlays, truth, tw, th)
        if pictures.n_bytes <= budget or th <= 64:
            return pictures
        if quality > 55:
            quality -= 15
        else:
            scale *= 0.8


def _rgb(color: str) -> tuple[int, int, int]:
    value = color.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def _num(value: Any, ci: Any = None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    text = f"{value:.{digits}f}"
    if ci and ci[0] is not None and not (isinstance(ci[0], float) and math.isnan(ci[0])):
        text += f" ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})"
    return text


_CSS = """
:root { --frame-h: max(180px, min(calc((100vh - 15em) / 2), 640px)); }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1b1b1b;
       background: #f4f4f4; }
.notice { background: #fff1c2; border-bottom: 2px solid #a87a00; padding: .45em 1em; font-weight: 600; }
input.toggle { position: absolute; opacity: 0; pointer-events: none; }
nav.toolbar { position: sticky; top: 0; z-index: 5; background: #fff; border-bottom: 1px solid #bbb;
              padding: .3em 1em; display: flex; flex-wrap: wrap; gap: .4em 1.4em; align-items: center;
              font-size: .9em; }
nav .group { display: flex; gap: .3em; align-items: center; }
nav label { cursor: pointer; padding: .05em .55em; border: 1px solid #888; border-radius: 3px; background: #fff; }
#ov-malignant:checked ~ nav label[for=ov-malignant], #ov-benign:checked ~ nav label[for=ov-benign],
#ov-none:checked ~ nav label[for=ov-none], #show-patches:checked ~ nav label[for=show-patches],
#show-truth:checked ~ nav label[for=show-truth] { background: #222; color: #fff; border-color: #222; }
.cbar { display: none; align-items: center; gap: .4em; }
#ov-malignant:checked ~ nav .cbar-malignant, #ov-benign:checked ~ nav .cbar-benign { display: flex; }
.cbar .ramp { position: relative; width: 220px; height: 12px; border: 1px solid #555; }
.cbar .ticks { position: relative; width: 220px; height: 1.1em; font-size: .75em; }
.cbar .ticks span { position: absolute; transform: translateX(-50%); }
main { padding: 0 1em 2em; max-width: 1900px; margin: 0 auto; }
h1 { font-size: 1.5em; margin: .6em 0 .2em; } h2 { font-size: 1.2em; margin: .2em 0; }
h3 { font-size: 1.05em; margin: 1em 0 .3em; }
.meta { color: #555; font-size: .88em; }
table { border-collapse: collapse; margin: .4em 0; font-size: .88em; background: #fff; }
th, td { border: 1px solid #ccc; padding: .2em .55em; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
section.exam { background: #fff; border: 1px solid #ccc; border-radius: 4px; margin: 1em 0; padding: .4em .8em .7em;
               scroll-margin-top: 2.6em; }
.exam-body { display: flex; flex-wrap: wrap; gap: .8em 1.2em; align-items: flex-start; }
.hanging { display: grid; grid-template-columns: minmax(21em, max-content) minmax(21em, max-content); gap: .35em .25em; background: #000; padding: .35em;
           border-radius: 3px; }
figure.view { margin: 0; color: #e8e8e8; }
figure.view.right { justify-self: end; text-align: right; } figure.view.left { justify-self: start; }
.frame { position: relative; display: inline-block; line-height: 0; }
.frame img.base { height: var(--frame-h); width: auto; display: block; }
.frame .layer { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
.ov { display: none; }
#ov-malignant:checked ~ main .ov-malignant, #ov-benign:checked ~ main .ov-benign { display: block; }
#show-patches:not(:checked) ~ main svg.patches { display: none; }
#show-truth:not(:checked) ~ main .truth { display: none; }
svg.patches text { font-family: system-ui, sans-serif; font-weight: 700; fill: #fff; stroke: #000;
                   paint-order: stroke; }
.placeholder { height: var(--frame-h); aspect-ratio: 1920 / 2944; display: flex; align-items: center; justify-content: center;
               border: 1px dashed #777; color: #bbb; text-align: center; padding: 0 .8em; font-size: .85em;
               line-height: 1.4; }
figcaption { font-size: .8em; line-height: 1.3; padding: .15em .1em 0; }
figcaption b.score { font-size: 1.15em; color: #fff; }
.badge { display: inline-block; min-width: 1.3em; text-align: center; border: 2px solid; border-radius: 3px;
         margin-right: .15em; font-weight: 700; line-height: 1.1; }
aside { flex: 1 1 280px; min-width: 260px; font-size: .92em; }
.call-pos { color: #fff; background: #b00020; padding: 0 .4em; border-radius: 3px; font-weight: 700; }
.call-neg { color: #1d5e20; font-weight: 600; }
.curves img { width: 460px; max-width: 48%; margin-right: 1em; background: #fff; }
details { margin: .4em 0; } pre { white-space: pre-wrap; font-size: .82em; background: #fff; padding: .5em;
                                   border: 1px solid #ddd; }
"""


def _colour_bar(name: str) -> str:
    """The colour bar of class ``name`` as a CSS gradient: each value's colour and opacity over mid grey."""
    cmap = saliency_colormap(name)
    stops = []
    for value in np.linspace(0.0, 1.0, 21):
        r, g, b, _ = cmap(value)
        a = float(saliency_alpha(value))
        mix = [round(255 * (c * a + 0.5 * (1 - a))) for c in (r, g, b)]
        stops.append(f"rgb({mix[0]},{mix[1]},{mix[2]}) {value * 100:.0f}%")
    ticks = "".join(f'<span style="left:{t * 100:.0f}%">{t:g}</span>' for t in (0, 0.2, 0.4, 0.6, 0.8, 1.0))
    return (
        f'<span class="cbar cbar-{name}" title="saliency = the model\'s probability of a {name} finding at that '
        f'location; transparent at or below {SALIENCY_LOW:g}">{name} saliency '
        f'<span><span class="ramp" style="display:block;background:linear-gradient(to right,{",".join(stops)})">'
        f'</span><span class="ticks" style="display:block">{ticks}</span></span></span>'
    )


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def _patches_svg(data: ViewData, mirror: bool) -> str:
    big_h, big_w = data.input_shape
    crop_h, crop_w = data.crop_size
    font = 0.05 * big_w
    parts = [
        f'<svg class="layer patches" viewBox="0 0 {big_w} {big_h}" preserveAspectRatio="none" '
        'xmlns="http://www.w3.org/2000/svg" aria-label="patches">'
    ]
    for i, ((row, col), att) in enumerate(zip(data.patch_locations, data.patch_attention, strict=True)):
        x = big_w - int(col) - crop_w if mirror else int(col)
        color = PATCH_COLORS[i % len(PATCH_COLORS)]
        parts.append(
            f"<g><title>patch {i + 1}: attention {float(att):.3f}</title>"
            f'<rect x="{x}" y="{int(row)}" width="{crop_w}" height="{crop_h}" fill="none" stroke="{color}" '
            'stroke-width="2.5" vector-effect="non-scaling-stroke"/>'
            f'<text x="{x + 0.03 * big_w:.0f}" y="{int(row) + 1.05 * font:.0f}" font-size="{font:.0f}" '
            f'stroke-width="{0.16 * font:.0f}">{i + 1}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _text(value: Any) -> str | None:
    """A table cell as text; ``None`` for empty cells (NaN, None, "")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value) or None


def _label_text(row: Mapping[str, Any], prefix: str = "") -> str | None:
    """``malignant``/``benign``/``no finding`` from 0/1 labels; ``None`` when unknown."""

    def value(kind: str) -> float:
        v = row.get(f"{prefix}{kind}_label")
        try:
            return float(v) if v is not None else math.nan
        except (TypeError, ValueError):
            return math.nan

    malignant, benign = value("malignant"), value("benign")
    if malignant == 1:
        return "malignant" + (" + benign" if benign == 1 else "")
    if benign == 1:
        return "benign"
    if malignant == 0 and (benign == 0 or math.isnan(benign)):
        return "no malignancy" if math.isnan(benign) else "no finding"
    return None


def _view_figure(
    slot: str,
    side: str,
    row: Mapping[str, Any] | None,
    data: ViewData | None,
    figure_href: str | None,
    problem: str | None,
    budget: int,
) -> tuple[str, int]:
    """One view of the hanging grid (or its placeholder); returns the HTML and the bytes of its pictures."""
    esc = html.escape
    image_id = str(row["image_index"]) if row is not None else ""
    attrs = f'class="view {side}" data-view="{esc(slot)}"' + (
        f' data-image="{esc(image_id)}" title="{esc(image_id)}"' if row else ""
    )
    if row is None or data is None:
        reason = problem or "not in this run"
        what = f"<b>{esc(slot)}</b><br>{esc(reason)}"
        if row is not None:
            what += (
                f"<br>malignant {_num(row.get('malignant_pred'))} · benign {_num(row.get('benign_pred'))}"
                f"<br>{esc(image_id)}"
            )
        return f'<figure {attrs}><div class="placeholder">{what}</div></figure>', 0
    mirror = hanging_mirror(slot)
    pictures = _pictures(data, mirror, budget)
    layers = [
        f'<img class="base" src="{pictures.base}" width="{pictures.width}" height="{pictures.height}" '
        f'alt="{esc(slot)} ({esc(image_id)})">'
    ]
    for name in ("malignant", "benign"):
        layers.append(f'<img class="layer ov ov-{name}" src="{pictures.overlays[name]}" alt="">')
    if pictures.truth:
        layers.append(f'<img class="layer truth" src="{pictures.truth}" alt="lesion outlines">')
    layers.append(_patches_svg(data, mirror))
    inner = "".join(layers)
    frame = (
        f'<a class="frame" href="{esc(figure_href)}" title="open the full-size explanation figure">{inner}</a>'
        if figure_href
        else f'<div class="frame">{inner}</div>'
    )
    badges = " ".join(
        f'<span class="badge" style="border-color:{PATCH_COLORS[i % len(PATCH_COLORS)]}">{i + 1}</span>'
        f"{float(a):.2f}"
        for i, a in enumerate(data.patch_attention)
    )
    truth = _label_text(row)
    caption = (
        f'<b>{esc(slot)}</b> malignant <b class="score">{_num(row.get("malignant_pred"))}</b> · '
        f"benign {_num(row.get('benign_pred'))}"
        + (f" · truth: {esc(truth)}" if truth else "")
        + f'<br><span title="patch number: attention weight">attention</span> {badges}'
    )
    return f"<figure {attrs}>{frame}<figcaption>{caption}</figcaption></figure>", pictures.n_bytes


def _call(score: Any, point: OperatingPoint | None) -> str:
    if point is None or score is None or (isinstance(score, float) and math.isnan(score)):
        return ""
    if float(score) >= point.threshold:
        return '<span class="call-pos">positive</span>'
    return '<span class="call-neg">negative</span>'


@dataclass(frozen=True)
class _Failure:
    image_id: str
    stage: str
    error: str


def _failures_by_slot(errors: pd.DataFrame) -> dict[tuple[str, str], list[_Failure]]:
    out: dict[tuple[str, str], list[_Failure]] = {}
    if errors.empty or not {"exam_id", "view"}.issubset(errors.columns):
        return out
    for _, e in errors.iterrows():
        if pd.isna(e.get("exam_id")) or pd.isna(e.get("view")) or not str(e["view"]):
            continue
        out.setdefault((str(e["exam_id"]), str(e["view"])), []).append(
            _Failure(str(e.get("image_id", "")), str(e.get("stage", "") or ""), str(e.get("error", "") or ""))
        )
    return out


def _exam_section(
    exam_id: str,
    exam_row: Mapping[str, Any],
    breasts: pd.DataFrame,
    images: pd.DataFrame,
    out_dir: Path,
    figures_dir: Path,
    point: OperatingPoint | None,
    failures: Mapping[tuple[str, str], list[_Failure]],
    budget: int,
    sizes: dict[str, int],
) -> str:
    """One exam: the hanging grid and the breast scores."""
    esc = html.escape
    slots: dict[str, list[Mapping[str, Any]]] = {}
    for _, r in images.iterrows():
        slots.setdefault(f"{str(r['laterality']).upper()}-{str(r['view']).upper()}", []).append(r.to_dict())

    def view_html(slot: str, side: str, r: Mapping[str, Any] | None) -> str:
        problem = None
        data = None
        href = None
        if r is None:
            failed = failures.get((exam_id, slot))
            if failed:
                f = failed[0]
                problem = f"failed ({f.stage}): {f.error[:160]}" if f.stage else f"failed: {f.error[:160]}"
        else:
            stem = file_stem(str(r["image_index"]))
            npz, png = figures_dir / f"{stem}.npz", figures_dir / f"{stem}.png"
            if npz.is_file():
                try:
                    data = ViewData.load(npz)
                except ValueError as exc:
                    problem = f"picture unreadable: {exc}"
                if data is not None and any(
                    _text(r.get(key)) is not None and mine is not None and mine != _text(r.get(key))
                    for key, mine in (("run_key", data.run_key), ("input_key", data.input_key))
                ):
                    data, problem = None, "picture of an earlier prediction; predict again to draw it"
            else:
                problem = "no picture (predicted by an earlier run without --report)"
            href = _rel(png, out_dir) if png.is_file() else None
        text, n_bytes = _view_figure(slot, side, r, data, href, problem, budget)
        if r is not None:
            sizes[str(r["image_index"])] = len(text.encode("utf-8"))
        return text

    cells = []
    shown: set[int] = set()
    for row_slots in HANGING:
        for slot, side in zip(row_slots, ("right", "left"), strict=True):
            # Right-breast views stand on the viewer's left, aligned to the middle ("right" edge).
            entries = slots.get(slot, [])
            first = entries[0] if entries else None
            if first is not None:
                shown.add(id(first))
            cells.append(view_html(slot, side, first))
    extra = [
        view_html(slot, "right" if slot.startswith("R") else "left", r)
        for slot, entries in slots.items()
        for r in entries
        if id(r) not in shown
    ]
    grid = '<div class="hanging">' + "".join(cells) + "</div>"
    if extra:
        grid += '<div class="hanging extra" title="more images of these views">' + "".join(extra) + "</div>"

    has_labels = any(c in breasts.columns for c in ("malignant_label", "benign_label"))
    head = "<tr><th>breast</th><th>malignant</th><th>benign</th>"
    head += "<th>call</th>" if point else ""
    head += "<th>truth</th>" if has_labels else ""
    rows = []
    for side_letter, side_name in (("R", "right"), ("L", "left")):
        part = breasts[breasts["laterality"].astype(str).str.upper() == side_letter]
        if part.empty:
            rows.append(
                f'<tr><td>{side_name}</td><td colspan="{2 + bool(point) + has_labels}">no image</td></tr>'
            )
            continue
        b = part.iloc[0].to_dict()
        cells_b = f"<tr><td>{side_name} ({int(b['n_images'])} img)</td><td><b>{_num(b.get('malignant_pred'))}</b></td>"
        cells_b += f"<td>{_num(b.get('benign_pred'))}</td>"
        if point:
            cells_b += f"<td>{_call(b.get('malignant_pred'), point)}</td>"
        if has_labels:
            cells_b += f"<td>{esc(_label_text(b) or '—')}</td>"
        rows.append(cells_b + "</tr>")
    exam_call = _call(exam_row.get("malignant_pred"), point)
    patient = _text(exam_row.get("patient_id"))
    title = f"Exam {esc(exam_id)}" + (f' <span class="meta">patient {esc(patient)}</span>' if patient else "")
    aside = (
        f"<aside><p>Exam malignant score <b>{_num(exam_row.get('malignant_pred'))}</b>"
        f" · benign {_num(exam_row.get('benign_pred'))}"
        + (f" · call {exam_call}" if exam_call else "")
        + "</p>"
        + f'<table class="breast-scores">{head}</tr>{"".join(rows)}</table>'
        + '<p class="meta">Breast = mean of its views (each view the mean of its images); exam = the higher '
        "breast. Click a view for its full-size figure (as the model saw it: right views mirrored).</p></aside>"
    )
    return (
        f'<section class="exam" id="exam-{esc(_anchor(exam_id))}" data-exam="{esc(exam_id)}">'
        f'<h2>{title}</h2><div class="exam-body">{grid}{aside}</div></section>'
    )


def _anchor(exam_id: str) -> str:
    """A safe, unique fragment for an exam id (the id itself when plain, else cleaned + a short hash)."""
    return file_stem(exam_id)


def _figure_png(fig: Any, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _cohort_section(
    images: pd.DataFrame,
    breasts: pd.DataFrame,
    point: OperatingPoint | None,
    n_bootstrap: int,
    seed: int,
) -> str:
    """Metrics, curves with bands, the operating point and subgroups; or why there are none."""
    from mammogmic.visualization.curves import plot_pr, plot_roc

    esc = html.escape
    parts = ['<section id="cohort"><h2>Cohort</h2>']
    n_exams = images["exam_id"].nunique()
    parts.append(
        f"<p>{len(images)} image(s), {len(breasts)} breast(s), {n_exams} exam(s) with predictions.</p>"
    )
    labels = (
        pd.to_numeric(breasts["malignant_label"], errors="coerce") if "malignant_label" in breasts else None
    )
    if labels is None or labels.dropna().nunique() < 2:
        parts.append(
            "<p>Malignant labels are not known for both classes here: no metrics, curves or subgroup tables. "
            "Give a manifest with <code>malignant_label</code> (or <code>breast_malignant_label</code>) to get them.</p>"
        )
        if point is not None:
            called = int((pd.to_numeric(breasts["malignant_pred"], errors="coerce") >= point.threshold).sum())
            parts.append(
                f"<p>{called} of {len(breasts)} breast(s) are called positive at the operating point.</p>"
            )
        parts.append("</section>")
        return "\n".join(parts)

    thresholds = [point.threshold] if point else []
    grouped: dict[str, pd.DataFrame] = {}
    at_point: dict[str, dict[str, Any]] = {}
    discrimination: list[str] = []
    for kind in ("malignant", "benign"):
        label = f"{kind}_label"
        if label not in images.columns and f"breast_{label}" not in images.columns:
            continue
        for level in ("image", "breast", "exam"):
            try:
                result, table = evaluate_table(
                    images,
                    label=label,
                    scores=[f"{kind}_pred"],
                    group=level,
                    n_bootstrap=n_bootstrap,
                    seed=seed,
                    thresholds=thresholds if kind == "malignant" else (),
                    source="predictions",
                )
            except ValueError as exc:
                parts.append(f'<p class="meta">No {level}-level {kind} metrics: {esc(str(exc))}</p>')
                continue
            m = result["metrics"][f"{kind}_pred"]
            if result["n_rows"] == 0 or m["n_positive"] in (0, result["n_rows"]):
                continue
            discrimination.append(
                f"<tr><td>{kind}</td><td>{level}s</td><td>{m['n']}</td><td>{m['n_positive']}</td>"
                f"<td><b>{_num(m['auroc'], m['auroc_ci'])}</b></td><td>{_num(m['auprc'], m['auprc_ci'])}</td>"
                f"<td>{_num(m['average_precision'], m['average_precision_ci'])}</td></tr>"
            )
            if kind == "malignant":
                grouped[level] = table
                if point is not None:
                    at_point[level] = result["metrics"]["malignant_pred"]["operating_points"][0]

    if discrimination:
        parts.append(
            '<h3>Discrimination</h3><table class="metrics"><tr><th>finding</th><th>level</th><th>n</th>'
            "<th>positive</th><th>AUROC (95% CI)</th><th>AUPRC (95% CI)</th><th>average precision (95% CI)</th>"
            "</tr>" + "".join(discrimination) + "</table>"
            f'<p class="meta">95% CIs: percentile bootstrap, {n_bootstrap} resamples (seed {seed}); none below 8 '
            "rows. AUPRC: trapezoidal (as the NYU meta-repository); average precision: step-wise. Breast and exam "
            "labels: the breast label when the manifest has one, else the highest image label.</p>"
        )
    curves = {
        f"{level}s": (t["malignant_label"].astype(int).to_numpy(), t["malignant_pred"].to_numpy(dtype=float))
        for level, t in grouped.items()
        if level in ("breast", "exam")
    }
    if curves:
        marks = {name: point.threshold for name in curves} if point else None
        pngs = [
            ("ROC, malignant", plot_roc(curves, "ROC — malignant", 4.6, n_bootstrap, seed, marks)),
            (
                "Precision-recall, malignant",
                plot_pr(curves, "Precision-recall — malignant", 4.6, n_bootstrap, seed, marks),
            ),
        ]
        parts.append('<h3>Curves</h3><div class="curves">')
        for caption, fig in pngs:
            parts.append(
                f'<img src="{png_data_uri(_figure_png(fig))}" alt="{esc(caption)}" title="{esc(caption)}">'
            )
        parts.append(
            f'</div><p class="meta">Shaded: pointwise 95% bootstrap bands ({n_bootstrap} resamples, seed {seed}). '
            "Dotted lines on the PR plot: the prevalence."
            + (" Circles: the operating point." if point else "")
            + "</p>"
        )
    if point is not None:
        parts.append(f"<h3>Operating point</h3><p>{esc(point.description)}.</p>")
        rows = []
        for level in ("image", "breast", "exam"):
            if level not in at_point:
                continue
            op = at_point[level]
            rows.append(
                f"<tr><td>{level}s</td><td>{_num(op['sensitivity'])}</td><td>{_num(op['specificity'])}</td>"
                f"<td>{op['tp']}</td><td>{op['fp']}</td><td>{op['tn']}</td><td>{op['fn']}</td></tr>"
            )
        parts.append(
            '<table class="operating"><tr><th>level</th><th>sensitivity</th><th>specificity</th><th>TP</th>'
            "<th>FP</th><th>TN</th><th>FN</th></tr>" + "".join(rows) + "</table>"
            '<p class="meta">An exam is positive when one of its breasts is (exam score = the higher breast).</p>'
        )
    groups = subgroup_columns(breasts)
    if groups:
        parts.append("<h3>Subgroups (breast level, malignant)</h3>")
        for name, column in groups.items():
            rows_sg = subgroup_metrics(
                breasts,
                column,
                "malignant_label",
                "malignant_pred",
                threshold=point.threshold if point else None,
                n_bootstrap=n_bootstrap,
                seed=seed,
                bands=name == "age band",
            )
            head = f"<tr><th>{esc(name)} (<code>{esc(column)}</code>)</th><th>breasts</th><th>malignant</th><th>AUROC (95% CI)</th>"
            head += "<th>sensitivity</th><th>specificity</th>" if point else ""
            body = []
            for r in rows_sg:
                cells = (
                    f"<tr><td>{esc(str(r['value']))}</td><td>{r['n']}</td><td>{r['n_positive']}</td>"
                    f"<td>{_num(r['auroc'], r['auroc_ci'])}</td>"
                )
                if point:
                    op = r["operating_point"]
                    cells += f"<td>{_num(op['sensitivity'])}</td><td>{_num(op['specificity'])}</td>"
                body.append(cells + "</tr>")
            parts.append(
                f'<table class="subgroup" data-subgroup="{esc(name)}">{head}</tr>{"".join(body)}</table>'
            )
        parts.append('<p class="meta">n/a: one class only in that subgroup; no CI below 8 breasts.</p>')
    parts.append("</section>")
    return "\n".join(parts)


def _provenance_section(run: Mapping[str, Any] | None, generated: str) -> str:
    esc = html.escape
    parts = ['<section id="provenance"><h2>Provenance</h2>']
    if not run:
        parts.append(
            "<p>No run.json was found: the models and settings behind these predictions are unknown.</p>"
        )
        parts.append("</section>")
        return "\n".join(parts)
    models = run.get("models") or []
    parts.append(
        '<table class="models"><tr><th>model</th><th>file</th><th>SHA-256</th><th>t</th><th>input</th>'
        "<th>window</th></tr>"
    )
    for m in models:
        contract = m.get("input_contract") or {}
        shape = contract.get("input_shape")
        window = contract.get("window_shape") or shape
        parts.append(
            f"<tr><td>{esc(str(m.get('name', '')))}</td><td>{esc(str(m.get('path', '')))}</td>"
            f"<td><code>{esc(str(m.get('sha256', '')))}</code></td><td>{_num(m.get('percent_t'), digits=3)}</td>"
            f"<td>{esc('×'.join(map(str, shape)) if shape else '')}</td>"
            f"<td>{esc('×'.join(map(str, window)) if window else '')}</td></tr>"
        )
    parts.append("</table>")
    facts = [
        ("mammogmic version", run.get("mammogmic_version")),
        ("command", run.get("command")),
        ("run key", run.get("run_key")),
        ("run complete", run.get("complete")),
        ("device, precision", f"{run.get('device', '?')}, {run.get('dtype', '?')}"),
        ("TTA windows (seed)", f"{run.get('tta', '?')} ({run.get('seed', '?')})"),
        (
            "inputs, predicted, failed",
            f"{run.get('n_inputs', '?')}, {run.get('n_predicted', '?')}, {run.get('n_errors', '?')}",
        ),
        ("report written", generated),
    ]
    parts.append('<table class="run">')
    for key, value in facts:
        if value is None:
            continue
        shown = f"<code>{esc(str(value))}</code>" if key in ("command", "run key") else esc(str(value))
        parts.append(f'<tr><th>{esc(key)}</th><td style="text-align:left">{shown}</td></tr>')
    parts.append("</table>")
    contracts = {str(m.get("name", i)): m.get("input_contract") for i, m in enumerate(models)}
    parts.append(
        "<details><summary>Input contracts (how each model's inputs are made)</summary><pre>"
        + esc(json.dumps(contracts, indent=1, default=str))
        + "</pre></details></section>"
    )
    return "\n".join(parts)


def _errors_section(errors: pd.DataFrame, limit: int = 50) -> str:
    esc = html.escape
    n = len(errors)
    if n == 0:
        return '<section id="errors"><h2>Failed images</h2><p>None: every image was predicted.</p></section>'
    rows = "".join(
        f"<tr><td>{esc(str(e.get('image_id', '')))}</td><td>{esc(str(e.get('stage', '') or ''))}</td>"
        f'<td style="text-align:left">{esc(str(e.get("error", "") or ""))}</td></tr>'
        for _, e in errors.head(limit).iterrows()
    )
    more = f'<p class="meta">The first {limit} of {n}; all in errors.csv.</p>' if n > limit else ""
    return (
        f'<section id="errors"><h2>Failed images: {n}</h2><p>These images could not be predicted and are in no '
        "score above (see <code>errors.csv</code>).</p>"
        f"<table><tr><th>image</th><th>stage</th><th>reason</th></tr>{rows}</table>{more}</section>"
    )


def write_exam_report(
    path: Path,
    images: pd.DataFrame,
    figures_dir: Path,
    run: Mapping[str, Any] | None = None,
    errors: pd.DataFrame | None = None,
    operating_point: OperatingPoint | None = None,
    max_exams: int = 100,
    n_bootstrap: int = 2000,
    seed: int = 0,
    title: str = "GMIC exam report",
) -> dict[str, Any]:
    """Write ``report.html`` (see the module docstring).

    Args:
        path: the ``.html`` file to write (atomically).
        images: the image table (``image_predictions.csv``'s rows: ``image_index``, ``benign_pred``,
            ``malignant_pred``, ``exam_id``, ``laterality``, ``view``, labels when known), plus any subgroup
            columns (:data:`mammogmic.evaluation.table.SUBGROUPS`).
        figures_dir: folder of ``<stem>.npz`` (:class:`ViewData`) and ``<stem>.png`` (full-size figures).
        run: the run's ``run.json`` content (provenance).
        errors: failed images (``errors.csv`` columns, optionally with ``exam_id`` and ``view`` so that
            their view shows why it is missing).
        operating_point: the threshold of the call per breast.
        max_exams: exam sections drawn (the highest exam malignant scores); every exam is in the exam list.
        n_bootstrap: bootstrap resamples of CIs and curve bands.
        seed: bootstrap seed.
        title: page title.

    Returns:
        ``{"path", "n_exams", "n_shown", "image_bytes": {image_id: bytes of its figure element}}``.
    """
    esc = html.escape
    errors = errors if errors is not None else pd.DataFrame(columns=["image_id", "path", "stage", "error"])
    needed = ["image_index", "benign_pred", "malignant_pred", "exam_id", "laterality", "view"]
    if all(c in images.columns for c in needed):
        table = images.dropna(subset=["laterality", "view"]).copy()
    else:  # nothing predicted (every image failed), or not an image table we can hang
        table = pd.DataFrame(columns=needed)
    table["exam_id"] = table["exam_id"].astype(str)
    labels = [
        c for c in ("benign_label", "malignant_label") if c in table.columns or f"breast_{c}" in table.columns
    ]
    for label in labels:  # breast labels only: image-level metrics are left out, breast and exam ones are not
        if label not in table.columns:
            table[label] = np.nan
    keep = sorted(set(subgroup_columns(table).values()))
    scores = ["benign_pred", "malignant_pred"]
    if len(table):
        breasts = breast_level(table, score_columns=scores, label_columns=labels, keep_columns=keep)
        exams = exam_level(breasts, score_columns=scores, label_columns=labels)
    else:
        breasts = pd.DataFrame(columns=["breast_id", "exam_id", "laterality", "n_images", "n_views", *scores])
        exams = pd.DataFrame(columns=["exam_id", "n_breasts", *scores])
    if len(exams):
        exams = exams.sort_values(["malignant_pred", "exam_id"], ascending=[False, True], kind="mergesort")
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    shown_ids = list(exams["exam_id"].astype(str))[: max(0, max_exams)] if len(exams) else []

    # Exam list: every exam, its breasts, the call.
    index_rows = []
    by_exam = (
        {e: part for e, part in breasts.groupby(breasts["exam_id"].astype(str), sort=False)}
        if len(breasts)
        else {}
    )
    for _, e in exams.iterrows():
        exam_id = str(e["exam_id"])
        part = by_exam.get(exam_id, breasts.iloc[0:0])
        side = {str(b["laterality"]).upper(): b for _, b in part.iterrows()}
        link = (
            f'<a href="#exam-{esc(_anchor(exam_id))}">{esc(exam_id)}</a>'
            if exam_id in shown_ids
            else esc(exam_id)
        )
        cells = f"<tr><td>{link}</td><td>{esc(_text(e.get('patient_id')) or '')}</td>"
        for s in ("R", "L"):
            cells += f"<td>{_num(side[s]['malignant_pred']) if s in side else '—'}</td>"
        cells += f"<td><b>{_num(e.get('malignant_pred'))}</b></td><td>{_num(e.get('benign_pred'))}</td>"
        if operating_point:
            cells += f"<td>{_call(e.get('malignant_pred'), operating_point)}</td>"
        if labels:
            cells += f"<td>{esc(_label_text(e.to_dict()) or '—')}</td>"
        index_rows.append(cells + "</tr>")
    index_head = (
        "<tr><th>exam</th><th>patient</th><th>right malignant</th><th>left malignant</th><th>exam malignant</th>"
        "<th>exam benign</th>"
        + ("<th>call</th>" if operating_point else "")
        + ("<th>truth</th>" if labels else "")
        + "</tr>"
    )

    failures = _failures_by_slot(errors)
    sizes: dict[str, int] = {}
    budget = MAX_IMAGE_BYTES - _TEXT_BUDGET
    sections = []
    images_by_exam = {e: part for e, part in table.groupby("exam_id", sort=False)}
    for exam_id in shown_ids:
        exam_row = exams[exams["exam_id"].astype(str) == exam_id].iloc[0].to_dict()
        sections.append(
            _exam_section(
                exam_id,
                exam_row,
                by_exam.get(exam_id, breasts.iloc[0:0]),
                images_by_exam.get(exam_id, table.iloc[0:0]),
                path.parent,
                figures_dir,
                operating_point,
                failures,
                budget,
                sizes,
            )
        )

    toolbar = (
        '<input class="toggle" type="radio" name="overlay" id="ov-malignant" checked>'
        '<input class="toggle" type="radio" name="overlay" id="ov-benign">'
        '<input class="toggle" type="radio" name="overlay" id="ov-none">'
        '<input class="toggle" type="checkbox" id="show-patches" checked>'
        '<input class="toggle" type="checkbox" id="show-truth" checked>'
        '<nav class="toolbar"><span class="group">Saliency <label for="ov-malignant">malignant</label>'
        '<label for="ov-benign">benign</label><label for="ov-none">none</label></span>'
        '<span class="group"><label for="show-patches">patches</label>'
        '<label for="show-truth">lesion outlines</label></span>'
        + _colour_bar("malignant")
        + _colour_bar("benign")
        + "</nav>"
    )
    point_text = (
        f"<p>Operating point: {esc(operating_point.description)}; a breast is called positive at or above it.</p>"
        if operating_point
        else '<p class="meta">No operating point given (<code>--threshold</code> or <code>--operating-point</code>): '
        "scores only, no calls.</p>"
    )
    n_err = len(errors)
    intro = (
        f"<h1>{esc(title)}</h1>"
        f'<p class="meta">{len(exams)} exam(s), {len(table)} image(s) predicted'
        + (f', <a href="#errors"><b>{n_err} image(s) failed</b></a>' if n_err else ", none failed")
        + f". Written {generated}.</p>"
        + point_text
        + '<p class="meta">Views are hung as read: R-CC and L-CC above R-MLO and L-MLO, back to back (the model '
        "sees every view facing right; right views are mirrored back here). Saliency is the model's probability "
        f"of a finding at each location, drawn over the breast only and transparent at or below {SALIENCY_LOW:g}; "
        "numbered boxes are the K patches the model looked at, with their attention weights below each view. "
        "Scores are probabilities averaged over the models and test-time windows of the run.</p>"
    )
    exam_list = (
        f'<section id="exams"><h2>Exams</h2><p class="meta">Sorted by exam malignant score. '
        f"{len(shown_ids)} of {len(exams)} drawn below"
        + (" (the highest scores; raise --max-exams for more)" if len(shown_ids) < len(exams) else "")
        + ".</p>"
        f'<table class="exam-list">{index_head}{"".join(index_rows)}</table></section>'
    )
    cohort = _cohort_section(table, breasts, operating_point, n_bootstrap, seed) if len(table) else ""
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f'<div class="notice" role="note">{esc(NOTICE)}</div>\n'
        + toolbar
        + "\n<main>\n"
        + intro
        + exam_list
        + "\n".join(sections)
        + cohort
        + _provenance_section(run, generated)
        + _errors_section(errors)
        + f'<p class="notice">{esc(NOTICE)}</p>'
        + "\n</main>\n</body></html>\n"
    )
    atomic_write_text(path, page)
    return {"path": path, "n_exams": len(exams), "n_shown": len(shown_ids), "image_bytes": sizes}
