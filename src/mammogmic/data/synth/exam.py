"""One synthetic screening exam: four views, per-class lesion masks and metadata."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from mammogmic.data.synth import anatomy
from mammogmic.data.synth.config import DENSITY_LETTERS, SynthConfig
from mammogmic.data.synth.findings import Finding, place_finding, plan_findings, render_finding
from mammogmic.errors import ConfigError

VIEWS: tuple[str, ...] = ("L-CC", "R-CC", "L-MLO", "R-MLO")
CLASSES: tuple[str, ...] = ("benign", "malignant")
MIN_SIZE = 64
MAX_VALUE = 4095

ViewResult = tuple[str, np.ndarray, dict[str, np.ndarray], dict[str, Any]]


def check_size(size: Any) -> tuple[int, int]:
    """Validate an (H, W) image size; raises ConfigError naming ``size``."""
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ConfigError(f"size: expected (height, width) integers, got {size!r}") from None
    if h < MIN_SIZE or w < MIN_SIZE or h > 16384 or w > 16384:
        raise ConfigError(f"size: height and width must be in [{MIN_SIZE}, 16384], got {h}x{w}")
    return (h, w)


def exam_plan(seed: int, config: SynthConfig) -> dict[str, Any]:
    """Cheap, image-free description of an exam (density, findings per breast).

    Drawn from its own stream of ``seed`` so that it can be computed without rendering (used to
    stratify splits) and always equals what :func:`generate_exam` renders.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1]))
    letter = DENSITY_LETTERS[int(rng.choice(4, p=np.asarray(config.density_weights)))]
    findings = {side: plan_findings(rng, config) for side in ("L", "R")}
    return {"density": letter, "findings": findings}


def generate_exam(
    seed: int, size: tuple[int, int] = (736, 480), config: SynthConfig | None = None
) -> list[ViewResult]:
    """Render one four-view exam.

    Args:
        seed: exam seed; the same seed, size and config always give identical arrays.
        size: output (H, W) of every view.
        config: generator settings (default :class:`SynthConfig`).

    Returns:
        For each view in ``L-CC, R-CC, L-MLO, R-MLO`` order: ``(view, image, masks, meta)`` where
        ``image`` is uint16 (H, W) with 12-bit values (0 = background) in raw orientation (left views
        face right, right views face left), ``masks`` maps ``"benign"``/``"malignant"`` to uint8 (H, W)
        masks (255 = lesion, same orientation) and ``meta`` is a JSON-friendly dict (laterality, view,
        density, findings with boxes in that image's pixels).
    """
    config = config or SynthConfig()
    h, w = check_size(size)
    plan = exam_plan(seed, config)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
    lo, hi = anatomy.DENSE_FRACTION[plan["density"]]
    dense_fraction = float(rng.uniform(lo, hi))
    scale12 = float(rng.uniform(3500.0, 3950.0))
    thick = (float(rng.uniform(0.38, 0.52)), float(rng.uniform(6.0, 12.0)))
    out: dict[str, ViewResult] = {}
    for side in ("L", "R"):
        shapes = anatomy.random_shapes(rng)
        gland_bias = float(rng.uniform(-1, 1))
        side_dense = float(np.clip(dense_fraction + rng.normal(0, 0.02), 0.03, 0.9))
        findings: list[Finding] = plan["findings"][side]
        for view_name in ("CC", "MLO"):
            view_rng = np.random.default_rng(
                np.random.SeedSequence([int(seed), 3, ord(side), len(view_name)])
            )
            image, masks, meta = _render_view(
                view_rng, shapes[view_name], (h, w), config, side_dense, thick, gland_bias, findings, scale12
            )
            if side == "R":
                image = np.ascontiguousarray(image[:, ::-1])
                masks = {k: np.ascontiguousarray(v[:, ::-1]) for k, v in masks.items()}
                for f in meta["findings"]:
                    x0, y0, x1, y1 = f["box"]
                    f["box"] = [w - x1, y0, w - x0, y1]
                    f["center"] = [w - f["center"][0], f["center"][1]]
                meta["nipple"] = [w - meta["nipple"][0], meta["nipple"][1]]
            meta.update(
                {"laterality": side, "view": view_name, "density": plan["density"], "seed": int(seed)}
            )
            out[f"{side}-{view_name}"] = (f"{side}-{view_name}", image, masks, meta)
    return [out[v] for v in VIEWS]


def _render_view(
    rng: np.random.Generator,
    shape: anatomy.BreastShape,
    size: tuple[int, int],
    config: SynthConfig,
    dense_fraction: float,
    thick: tuple[float, float],
    gland_bias: float,
    findings: list[Finding],
    scale12: float,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    h, w = size
    ppm = anatomy.pixels_per_mm(size)
    par = anatomy.parenchyma(
        rng, shape, size, dense_fraction, config.texture_beta, thick, gland_bias, vessels=config.vessels
    )
    if par.tissue.shape != (h, w):
        # band-limit before enlarging so that the working grid's pixels do not show as blocks
        sigma = 0.35 * h / par.tissue.shape[0]
        soft = cv2.GaussianBlur(par.tissue, (0, 0), sigmaX=min(sigma, 1.0), borderType=cv2.BORDER_REPLICATE)
        img: np.ndarray = cv2.resize(soft, (w, h), interpolation=cv2.INTER_CUBIC)
    else:
        img = par.tissue.copy()
    alpha_u8 = anatomy.fill_mask(shape, size, antialias=True)
    inside = alpha_u8 > 127

    # skin line: a thin band of slightly higher attenuation along the edge. A box blur of the mask
    # rises linearly with the distance d inside a straight edge (255 * (0.5 + d / k)), so a 256-entry
    # table turns it into the skin profile; far cheaper at full size than a distance transform.
    skin_px = max(1.2 * ppm, 1.0)
    k = 2 * int(math.ceil(2.0 * skin_px)) + 1
    d = (np.arange(256, dtype=np.float32) / 255.0 - 0.5) * k
    table = np.where(d > 0, 0.09 * np.exp(-(((d - 0.5 * skin_px) / (0.6 * skin_px)) ** 2)), 0.0)
    img += cv2.LUT(cv2.blur(alpha_u8, (k, k)), table.astype(np.float32).reshape(1, 256))

    lo_h = par.edge_mm.shape[0]
    lo_w = par.edge_mm.shape[1]

    def edge_px(row: int, col: int) -> float:
        r = min(int(row * lo_h / h), lo_h - 1)
        c = min(int(col * lo_w / w), lo_w - 1)
        return float(par.edge_mm[r, c]) * ppm

    masks = {c: np.zeros((h, w), np.uint8) for c in CLASSES}
    metas: list[dict[str, Any]] = []
    avoid: list[tuple[float, float, float]] = []
    t0, lam = thick
    for f in findings:
        pos = place_finding(f, shape, size, inside, edge_px, ppm, avoid)
        if pos is None:
            continue
        avoid.append((pos[0], pos[1], 0.5 * f.size_mm * ppm))
        rendered = render_finding(f, shape.view, pos, ppm, config)
        y0, x0 = rendered.origin
        ph, pw = rendered.density.shape
        ya, yb, xa, xb = max(y0, 0), min(y0 + ph, h), max(x0, 0), min(x0 + pw, w)
        if ya >= yb or xa >= xb:
            continue
        sl = (slice(ya, yb), slice(xa, xb))
        psl = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
        # compressed thickness at the finding's centre (it varies little across a finding)
        t = t0 + (1.0 - t0) * (1.0 - math.exp(-edge_px(int(pos[0]), int(pos[1])) / ppm / lam))
        inside_patch = inside[sl]
        img[sl] += inside_patch * (
            t * (anatomy.GLAND_LEVEL - anatomy.FAT_LEVEL) * rendered.density[psl] + rendered.calcs[psl]
        )
        m = rendered.mask[psl] & inside_patch
        if not m.any():
            continue
        masks[f.cls][sl] |= m.astype(np.uint8) * 255
        yy, xx = np.nonzero(m)
        box = [int(xx.min() + xa), int(yy.min() + ya), int(xx.max() + xa + 1), int(yy.max() + ya + 1)]
        metas.append(
            {
                "label": f.cls,
                "kind": f.kind,
                "finding_id": f.finding_id,
                "box": box,
                "center": [round(float(pos[1]), 1), round(float(pos[0]), 1)],
                "size_mm": round(f.size_mm, 2),
            }
        )

    img *= scale12
    if config.noise > 0:
        # quantum (Poisson-like, variance ~ signal) + electronic noise, computed in place. OpenCV's
        # generator (seeded from the view's stream) is ~4x faster than numpy's at full size.
        k2 = config.noise**2
        sd = img * np.float32(0.12 * k2)
        sd += np.float32(16.0 * k2)
        cv2.sqrt(sd, dst=sd)
        white = np.empty((h, w), np.float32)
        cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))
        cv2.randn(white, np.zeros(1), np.ones(1))
        sd *= white
        img += sd
        del sd, white
    np.clip(img, 1.0, float(MAX_VALUE), out=img)  # inside the breast is never background ...
    cv2.multiply(img, alpha_u8.astype(np.float32), dst=img, scale=1.0 / 255.0)  # ... outside it is 0
    img += 0.5
    image = img.astype(np.uint16)
    meta: dict[str, Any] = {
        "findings": metas,
        "pixels_per_mm": round(ppm, 5),
        "nipple": [round(shape.nipple[1] * w, 1), round(shape.nipple[0] * h, 1)],
    }
    return image, masks, meta
