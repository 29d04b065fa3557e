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
