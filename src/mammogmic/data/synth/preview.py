"""Small 8-bit contact sheets of synthetic exams (for docs and a quick look at a generated set)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

#: BGR outline colours of the mask classes in previews.
OUTLINE_BGR: dict[str, tuple[int, int, int]] = {"benign": (60, 200, 60), "malignant": (40, 40, 230)}


def view_to_8bit(image: np.ndarray, height: int, masks: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Window a 12-bit view to 8-bit BGR at ``height`` rows, optionally outlining the masks."""
    h, w = image.shape
    width = max(1, round(w * height / h))
    img = image.astype(np.float32)
    fg = img[img > 0]
    lo, hi = (float(np.percentile(fg, 0.5)), float(np.percentile(fg, 99.9))) if fg.size else (0.0, 1.0)
    lo = min(lo * 0.6, lo)
    out = np.clip((img - lo) / max(hi - lo, 1.0), 0, 1) * 255
    out[image == 0] = 0
    small = cv2.resize(out, (width, height), interpolation=cv2.INTER_AREA).astype(np.uint8)
    bgr = cv2.cvtColor(small, cv2.COLOR_GRAY2BGR)
    for cls, m in (masks or {}).items():
        if not m.any():
            continue
        ms = cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours((ms > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        grown = [cv2.convexHull(c) for c in contours]
        for c in grown:
            x, y, bw, bh = cv2.boundingRect(c)
            pad = 4
            cv2.rectangle(
                bgr, (x - pad, y - pad), (x + bw + pad, y + bh + pad), OUTLINE_BGR.get(cls, (0, 200, 200)), 1
            )
    return bgr


def contact_sheet(
    exams: Sequence[Sequence[tuple[str, np.ndarray, dict[str, np.ndarray], dict[str, Any]]]],
    height: int = 320,
    outline: bool = False,
) -> np.ndarray:
    """One row per exam, four views per row (R-CC, L-CC, R-MLO, L-MLO: the reading layout)."""
    order = ("R-CC", "L-CC", "R-MLO", "L-MLO")
    rows = []
    for exam in exams:
        by = {v[0]: v for v in exam}
        tiles = [view_to_8bit(by[k][1], height, by[k][2] if outline else None) for k in order if k in by]
        sep = np.full((height, 4, 3), 40, np.uint8)
        parts: list[np.ndarray] = []
        for t in tiles:
            parts += [t, sep]
        rows.append(np.concatenate(parts[:-1], 1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=40) for r in rows]
    return np.concatenate(rows, 0)[:-4]


def _crop(image: np.ndarray, center: tuple[float, float], half: int) -> np.ndarray:
    cx, cy = (round(c) for c in center)
    h, w = image.shape
    y0, x0 = min(max(cy - half, 0), h - 2 * half), min(max(cx - half, 0), w - 2 * half)
    return image[y0 : y0 + 2 * half, x0 : x0 + 2 * half].astype(np.float32)


def finding_gallery(size: tuple[int, int] = (736, 480), seed: int = 0, tile: int = 180) -> np.ndarray:
    """Crops of the four finding types at full resolution (top row) and after 4x downsampling (bottom).

    Shows that benign and malignant findings look alike at low resolution (a blob, a cluster) and
    differ in fine detail (margin, spicules, calcification shape).
    """
    from mammogmic.data.synth.config import SynthConfig
    from mammogmic.data.synth.exam import generate_exam

    half = max(8, round(42 * size[0] / 736))
    wanted = [
        ("benign", "mass"),
        ("malignant", "mass"),
        ("benign", "calcification"),
        ("malignant", "calcification"),
    ]
    crops: dict[tuple[str, str], np.ndarray] = {}
    s = seed
    while len(crops) < len(wanted) and s < seed + 200:
        frac = 1.0 if len(crops) >= 2 else 0.0
        cfg = SynthConfig.demo(
            malignant_rate=1.0, benign_rate=1.0, calcification_fraction=frac, density_weights=(1, 1, 0, 0)
        )
        for _, image, _, meta in generate_exam(s, size, cfg)[:1]:
            for f in meta["findings"]:
                key = (f["label"], f["kind"])
                if key in wanted and key not in crops:
                    crops[key] = _crop(image, f["center"], half)
        s += 1
    tiles_hi, tiles_lo = [], []
    for key in wanted:
        c = crops[key]
        lo, hi = float(np.percentile(c[c > 0], 1)), float(c.max())
        c8 = (np.clip((c - lo) / max(hi - lo, 1.0), 0, 1) * 255).astype(np.uint8)
        big = cv2.resize(c8, (tile, tile), interpolation=cv2.INTER_NEAREST)
        small = cv2.resize(c8, (c8.shape[1] // 4, c8.shape[0] // 4), interpolation=cv2.INTER_AREA)
        small_big = cv2.resize(small, (tile, tile), interpolation=cv2.INTER_NEAREST)
        name = "mass" if key[1] == "mass" else "calcs"
        for t, label in ((big, f"{key[0]} {name}"), (small_big, "same, 1/4 resolution")):
            cv2.putText(t, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.42, 255, 1, cv2.LINE_AA)
        tiles_hi.append(big)
        tiles_lo.append(small_big)
    sep = np.full((tile, 4), 40, np.uint8)

    def row(ts: list[np.ndarray]) -> np.ndarray:
        parts: list[np.ndarray] = []
        for t in ts:
            parts += [t, sep]
        return np.concatenate(parts[:-1], 1)

    grid = np.concatenate(
        [row(tiles_hi), np.full((4, row(tiles_hi).shape[1]), 40, np.uint8), row(tiles_lo)], 0
    )
    return cv2.cvtColor(grid, cv2.COLOR_GRAY2BGR)


def docs_figure(path: str, size: tuple[int, int] = (736, 480)) -> None:
    """Write the docs picture: one exam with its findings outlined, and the finding gallery."""
    from mammogmic.data.synth.config import SynthConfig
    from mammogmic.data.synth.exam import generate_exam

    for seed in range(300):  # an exam that shows both classes, in a scattered-density breast
        exam = generate_exam(seed, size, SynthConfig.demo())
        labels = {f["label"] for _, _, _, meta in exam for f in meta["findings"]}
        if labels == {"benign", "malignant"} and exam[0][3]["density"] == "B":
            break
    sheet = contact_sheet([exam], height=300, outline=True)
    gallery = finding_gallery(size)
    width = max(sheet.shape[1], gallery.shape[1])
    pad = [np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=40) for a in (sheet, gallery)]
    figure = np.concatenate([pad[0], np.full((6, width, 3), 40, np.uint8), pad[1]], 0)
    from PIL import Image

    rgb = Image.fromarray(cv2.cvtColor(figure, cv2.COLOR_BGR2RGB))
    rgb.quantize(colors=128, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


if __name__ == "__main__":  # python -m mammogmic.data.synth.preview docs/img/synth_example.png
    import sys

    docs_figure(sys.argv[1] if len(sys.argv) > 1 else "synth_example.png")
