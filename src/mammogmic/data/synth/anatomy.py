"""Breast anatomy of the synthetic mammograms: outline, skin, thickness, pectoral muscle, parenchyma.

Everything here works in the *canonical frame*: a left view with the chest wall at column 0 and the
nipple toward +x. Right views are mirrored at the very end (see :mod:`.exam`).

Smooth, large-scale quantities (thickness fall-off, fibroglandular pattern, muscle) are computed on a
reduced working grid and upsampled; sharp ones (breast edge, skin line, findings) at output size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import cv2
import numpy as np

#: Reference full-field geometry: 3328 x 2560 pixels at 0.07 mm.
FULL_SIZE: tuple[int, int] = (3328, 2560)
FULL_PIXEL_MM: float = 0.07
#: Working-grid height for the smooth anatomy (output sizes below it are used as they are).
WORK_HEIGHT: int = 832
#: Area fraction of the breast with fibroglandular tissue, per BI-RADS density letter (min, max).
DENSE_FRACTION: dict[str, tuple[float, float]] = {
    "A": (0.06, 0.16),
    "B": (0.2, 0.34),
    "C": (0.42, 0.6),
    "D": (0.66, 0.82),
}
FAT_LEVEL = 0.30
GLAND_LEVEL = 0.72


def pixels_per_mm(size: tuple[int, int]) -> float:
    """Output pixels per millimetre for an image of ``size`` (H, W) showing a full-field detector."""
    h, w = size
    return math.sqrt((h * w) / (FULL_SIZE[0] * FULL_SIZE[1])) / FULL_PIXEL_MM


def smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Cubic 0->1 ramp between lo and hi (float32)."""
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def powerlaw_noise(
    rng: np.random.Generator, shape: tuple[int, int], beta: float, px_per_mm: float, f_min: float = 1 / 50
) -> np.ndarray:
    """Gaussian random field with power spectrum ~ 1/f^beta (f in cycles/mm), zero mean, unit std.

    ``f_min`` (cycles/mm) flattens the spectrum below it so that the field has no structure much
    larger than a breast.
    """
    h, w = shape
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None] * px_per_mm
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :] * px_per_mm
    amp = (fx * fx + fy * fy + f_min * f_min) ** (-beta / 4.0)
    spec = amp * (
        rng.standard_normal(amp.shape, dtype=np.float32)
        + 1j * rng.standard_normal(amp.shape, dtype=np.float32)
    )
    field = np.fft.irfft2(spec, s=shape).astype(np.float32)
    field -= field.mean()
    field /= float(field.std()) + 1e-12
    return field


@dataclass(frozen=True)
class BreastShape:
    """Outline of one view in the canonical frame, in normalised units (y / H, x / W).

    The breast is the set of points left of ``edge(y)`` between ``y_top`` and ``y_bottom``.
    """

    view: str  # "CC" or "MLO"
    y_top: float
    y_bottom: float
    nipple: tuple[float, float]  # (y, x) normalised
    params: tuple[float, ...]
    wiggle: tuple[tuple[float, float], ...]  # (amplitude, phase) of low-order outline harmonics
    muscle: tuple[float, float, float] | None  # MLO: (x at top, y at chest wall, curvature exponent)
    nipple_bump: tuple[float, float] = (0.0, 0.0)  # nipple in profile: (height / W, half-width / H)

    def edge(self, y: np.ndarray) -> np.ndarray:
        """Normalised x of the skin edge at normalised heights ``y`` (0 outside [y_top, y_bottom])."""
        y = np.asarray(y, dtype=np.float64)
        if self.view == "CC":
            yc, b, depth, p = self.params
            t = np.clip((y - yc) / b, -1.0, 1.0)
            x = depth * np.clip(1.0 - np.abs(t) ** p, 0.0, 1.0) ** (1.0 / p)
            u = (t + 1.0) / 2.0
        else:
            x_top, depth, y_n, y_bot, p = self.params
            upper = x_top + (depth - x_top) * np.sin(0.5 * np.pi * np.clip(y / y_n, 0.0, 1.0)) ** 0.8
            t = np.clip((y - y_n) / (y_bot - y_n), 0.0, 1.0)
            lower = depth * np.clip(1.0 - t**p, 0.0, 1.0) ** (1.0 / p)
            x = np.where(y <= y_n, upper, lower)
            u = np.clip(y / y_bot, 0.0, 1.0)
        mod = np.ones_like(x)
        for k, (a, ph) in enumerate(self.wiggle, start=1):
            mod += a * np.sin(k * np.pi * u + ph)
        x = x * mod
        bump_h, bump_w = self.nipple_bump
        if bump_h > 0:
            x = x + bump_h * np.exp(-(((y - self.nipple[0]) / bump_w) ** 2))
        inside = (y >= self.y_top) & (y <= self.y_bottom)
        return np.where(inside, np.maximum(x, 0.0), 0.0)

    def polygon(self, size: tuple[int, int], n: int = 400) -> np.ndarray:
        """Outline as an (n + 2, 2) float array of (x, y) pixel coordinates for an image of ``size``."""
        h, w = size
        ys = np.linspace(self.y_top, self.y_bottom, n)
        xs = self.edge(ys)
        if self.view == "MLO":  # the breast runs off the top of the image into the axilla
            ys[0] = -0.02
        pts = np.stack([xs * w, ys * h], axis=1)
        cw = np.array([[-2.0, ys[-1] * h], [-2.0, ys[0] * h]])
        return np.concatenate([pts, cw], axis=0)

    def muscle_edge(self, y: np.ndarray) -> np.ndarray:
        """Normalised x of the pectoral muscle's anterior edge at heights ``y`` (0 where absent)."""
        if self.muscle is None:
            return np.zeros_like(np.asarray(y, dtype=np.float64))
        x_top, y_cw, gamma = self.muscle
        t = np.clip(1.0 - np.asarray(y, dtype=np.float64) / y_cw, 0.0, 1.0)
        return x_top * t**gamma


def random_shapes(rng: np.random.Generator) -> dict[str, BreastShape]:
    """Draw the CC and MLO outlines of one breast (the two views share the breast's size)."""
    size_factor = rng.uniform(0.0, 1.0)  # small .. large breast
    depth_cc = 0.56 + 0.24 * size_factor + rng.normal(0, 0.02)
    wig_cc = tuple((float(rng.normal(0, 0.025 / k)), float(rng.uniform(0, 2 * np.pi))) for k in range(1, 5))
    yc = 0.5 + rng.uniform(-0.05, 0.05)
    b = 0.35 + 0.09 * size_factor + rng.uniform(-0.02, 0.02)
    cc = BreastShape(
        view="CC",
        y_top=yc - b,
        y_bottom=yc + b,
        nipple=(yc, depth_cc),
        params=(yc, b, depth_cc, rng.uniform(1.6, 2.1)),
        wiggle=wig_cc,
        muscle=None,
    )
    depth_mlo = depth_cc * rng.uniform(1.0, 1.08)
    x_top = rng.uniform(0.24, 0.38)
    y_n = rng.uniform(0.5, 0.62)
    y_bot = rng.uniform(0.86, 0.96)
    wig_mlo = tuple((float(rng.normal(0, 0.02 / k)), float(rng.uniform(0, 2 * np.pi))) for k in range(1, 5))
    mlo = BreastShape(
        view="MLO",
        y_top=0.0,
        y_bottom=y_bot,
        nipple=(y_n, depth_mlo),
        params=(x_top, depth_mlo, y_n, y_bot, rng.uniform(1.7, 2.3)),
        wiggle=wig_mlo,
        muscle=(x_top * rng.uniform(0.75, 0.98), rng.uniform(0.36, 0.58), rng.uniform(0.7, 1.05)),
    )
    # the nipple is where the outline reaches furthest from the chest wall; it shows in profile as a
    # small bump (~3-6 mm high, ~8-12 mm wide on a full-field image)
    bump = (float(rng.uniform(0.012, 0.028)), float(rng.uniform(0.017, 0.026)))
    out: dict[str, BreastShape] = {}
    for name, shape in (("CC", cc), ("MLO", mlo)):
        ys = np.linspace(shape.y_top, shape.y_bottom, 801)
        xs = shape.edge(ys)
        i = int(np.argmax(xs))
        out[name] = dataclasses.replace(
            shape, nipple=(float(ys[i]), float(xs[i]) + bump[0]), nipple_bump=bump
        )
    return out


def fill_mask(shape: BreastShape, size: tuple[int, int], antialias: bool) -> np.ndarray:
    """Breast mask as uint8 (0..255, anti-aliased edge when ``antialias``)."""
    h, w = size
    mask = np.zeros((h, w), np.uint8)
    shift = 4
    pts = np.round(shape.polygon(size) * (1 << shift)).astype(np.int32)
    cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_AA if antialias else cv2.LINE_8, shift=shift)
    return mask


def muscle_mask(shape: BreastShape, size: tuple[int, int], px_per_mm: float) -> np.ndarray:
    """Soft (0..1 float32) pectoral-muscle mask; zeros for CC views."""
    h, w = size
    if shape.muscle is None:
        return np.zeros((h, w), np.float32)
    ys = (np.arange(h, dtype=np.float64) + 0.5) / h
    edge_px = shape.muscle_edge(ys) * w
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    # horizontal distance to the edge, converted to approx. normal distance using the edge slope
    x_top, y_cw, _ = shape.muscle
    slope = (x_top * w) / max(y_cw * h, 1.0)
    d = (edge_px[:, None].astype(np.float32) - xs) / math.sqrt(1.0 + slope * slope)
    soft = 0.6 * px_per_mm  # ~0.6 mm edge
    m = np.clip(d / soft + 0.5, 0.0, 1.0).astype(np.float32)
    m[edge_px <= 0] = 0.0
    return m


def draw_vessels(
    rng: np.random.Generator, mask: np.ndarray, nipple: tuple[float, float], ppm: float, count: int
) -> np.ndarray:
    """Blood vessels: ``count`` faint tortuous tubes, 0.8-1.6 mm wide, from the chest-wall side toward the nipple.

    Returns the added intensity (float32, same shape as ``mask``).
    """
    h, w = mask.shape
    canvas = np.zeros((h, w), np.float32)
    yn, xn = nipple
    for _ in range(count):
        width = float(rng.uniform(0.8, 1.6)) * ppm
        x, y = float(rng.uniform(0.03, 0.25)) * xn, yn + float(rng.uniform(-0.35, 0.35)) * h
        target_y = yn + float(rng.uniform(-0.12, 0.12)) * h
        pts = [(x, y)]
        step = 3.0 * ppm
        angle = math.atan2(target_y - y, xn - x)
        while x < 0.85 * xn and len(pts) < 400:
            want = math.atan2(target_y - y, xn - x)
            angle += 0.25 * (want - angle) + float(rng.normal(0, 0.18))
            x += step * math.cos(angle)
            y += step * math.sin(angle)
            pts.append((x, y))
        contrast = float(rng.uniform(0.05, 0.09))
        poly = np.round(np.array(pts) * 16).astype(np.int32)
        cv2.polylines(
            canvas, [poly], False, contrast, thickness=max(1, round(width)), lineType=cv2.LINE_8, shift=4
        )
    sigma = max(0.25 * float(np.mean([0.8, 1.6])) * ppm, 0.5)
    blurred: np.ndarray = cv2.GaussianBlur(canvas, (0, 0), sigma)
    return blurred * (mask > 0)


@dataclass
class Parenchyma:
    """Smooth anatomy of one view on the working grid."""

    tissue: np.ndarray  # float32 (h, w), intensity in 0..1 (before skin, findings, noise)
    thickness: np.ndarray  # float32 (h, w), relative compressed thickness 0..1
    density_map: np.ndarray  # float32 (h, w), fibroglandular fraction 0..1
    muscle: np.ndarray  # float32 (h, w) soft muscle mask
    edge_mm: np.ndarray  # float32 (h, w), distance to the skin edge in mm (0 outside)


def work_size(size: tuple[int, int]) -> tuple[int, int]:
    """Working-grid size for an output size (H, W)."""
    h, w = size
    if h <= WORK_HEIGHT:
        return (h, w)
    return (WORK_HEIGHT, max(8, round(w * WORK_HEIGHT / h)))


def parenchyma(
    rng: np.random.Generator,
    shape: BreastShape,
    out_size: tuple[int, int],
    dense_fraction: float,
    beta: float,
    thickness_params: tuple[float, float],
    gland_bias: float,
    vessels: int = 0,
) -> Parenchyma:
    """Thickness fall-off, fibroglandular pattern and pectoral muscle on the working grid.

    Args:
        rng: random generator (consumed).
        shape: the view's outline.
        out_size: output image size (H, W); the working grid keeps its aspect ratio.
        dense_fraction: target area fraction of fibroglandular tissue.
        beta: power-law exponent of the texture.
        thickness_params: (relative thickness at the skin edge, fall-off length in mm).
        gland_bias: per-breast offset in [-1, 1] shifting where the glandular tissue concentrates.
        vessels: at most this many blood vessels (thin tortuous lines toward the nipple) are drawn.
    """
    h, w = work_size(out_size)
    ppm = pixels_per_mm(out_size) * h / out_size[0]
    mask = fill_mask(shape, (h, w), antialias=False)
    dist = cv2.distanceTransform((mask > 0).astype(np.uint8), cv2.DIST_L2, 5)
    d_mm = dist / ppm
    t0, lam = thickness_params
    thickness = (t0 + (1.0 - t0) * (1.0 - np.exp(-d_mm / lam))).astype(np.float32)

    ny, nx = shape.nipple
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yn, xn = ny * h, nx * w
    # where the glandular tissue concentrates: a cone behind the nipple
    if shape.view == "CC":
        yc, b = shape.params[0] * h, shape.params[1] * h
        across = (yy - yc - gland_bias * 0.15 * b) / (
            b * (0.25 + 0.75 * np.clip(1 - xx / (xn + 1e-6), 0, 1) ** 0.5)
        )
        cone = np.exp(-(across**2) / 0.5)
    else:
        # glands sit in the lower-central part of the MLO, along the line from the axilla to the nipple
        axis_y = yn * (0.45 + 0.55 * np.clip(xx / (xn + 1e-6), 0, 1)) + gland_bias * 0.06 * h
        half = 0.28 * h * (0.3 + 0.7 * np.clip(1 - xx / (xn + 1e-6), 0, 1) ** 0.5)
        cone = np.exp(-(((yy - axis_y) / half) ** 2) / 0.6)
    sub = smoothstep(d_mm, 1.5, 9.0)  # subcutaneous fat layer
    cw = smoothstep(xx / ppm, 4.0, 22.0)  # retromammary fat
    musc = muscle_mask(shape, (h, w), ppm)
    if shape.muscle is not None:
        # keep glands a few mm off the muscle
        mus_d = cv2.distanceTransform((musc < 0.5).astype(np.uint8), cv2.DIST_L2, 5) / ppm
        cw = cw * smoothstep(mus_d, 2.0, 14.0)
    envelope = sub * cw * (0.35 + 0.65 * cone)

    # texture: isotropic power-law noise + noise stretched along rays to the nipple (ducts/ligaments)
    iso = powerlaw_noise(rng, (h, w), beta, ppm)
    r = np.hypot(xx - xn, yy - yn)
    phi = np.arctan2(yy - yn, xn - xx)  # 0 along the nipple axis
    stretch = 3.0
    r0 = 0.35 * w
    nh = int(math.ceil(2 * math.pi * r0)) + 4
    nw = int(math.ceil(float(r.max()) / stretch)) + 4
    radial_src = powerlaw_noise(rng, (nh, nw), beta, ppm)
    map_x = (r / stretch).astype(np.float32)
    map_y = ((phi + math.pi) * r0).astype(np.float32)
    radial = cv2.remap(radial_src, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    # the rays converge at the nipple: fade the stretched noise out close to it
    w_rad = smoothstep(r / ppm, 6.0, 40.0)
    texture = 0.8 * iso + 0.45 * radial * w_rad
    texture /= float(texture.std()) + 1e-6
    field = texture + 3.0 * (envelope - 1.0)
    inside = mask > 0
    q = float(np.quantile(field[inside], 1.0 - dense_fraction)) if inside.any() else 0.0
    gland = 1.0 / (1.0 + np.exp(-(field - q) / 0.55))
    # fine structure inside the dense tissue and faint trabecular structure in the fat
    fine = powerlaw_noise(rng, (h, w), beta, ppm, f_min=1 / 8)
    lobules = powerlaw_noise(rng, (h, w), beta - 0.6, ppm, f_min=1 / 5)
    gland = gland * (0.86 + 0.14 * np.tanh(fine))
    fat_structure = (0.05 * lobules + 0.04 * radial * w_rad) * (1.0 - gland) * sub
    gland = np.clip(gland + fat_structure, 0.0, 1.0).astype(np.float32)

    tissue = FAT_LEVEL + (GLAND_LEVEL - FAT_LEVEL) * gland
    if vessels > 0:
        # vessels show less against dense tissue
        vess = draw_vessels(rng, mask, (yn, xn), ppm, int(rng.integers(1, vessels + 1)))
        tissue = tissue + vess * sub * (1.0 - 0.7 * gland)
    if shape.muscle is not None:
        # pectoral muscle: bright, brightest toward the axilla corner, with a few fibre streaks
        level = rng.uniform(0.52, 0.64)
        corner = np.clip(1.0 - np.hypot(xx / (shape.muscle[0] * w + 1), yy / (shape.muscle[1] * h + 1)), 0, 1)
        mval = level * (0.8 + 0.3 * corner) + 0.02 * iso
        tissue = (1.0 - musc) * tissue + musc * np.maximum(mval, tissue)
    tissue = (tissue * thickness).astype(np.float32)
    return Parenchyma(tissue=tissue, thickness=thickness, density_map=gland, muscle=musc, edge_mm=d_mm)
