"""Synthetic findings: masses and calcification clusters, benign and malignant.

Benign and malignant findings are drawn from the same size and contrast ranges, so at low resolution
both look like a bright blob or a cluster of specks; the class lies in the fine detail:

* benign mass: round or oval, smooth circumscribed margin, sometimes a thin radiolucent halo;
* malignant mass: irregular outline, indistinct margin and thin spicules radiating from it;
* benign calcifications: few, coarse (round, rim-shaped or popcorn), scattered;
* malignant calcifications: many fine pleomorphic specks and short linear fragments along a
  branching duct that runs toward the nipple (segmental distribution).

Positions are given in breast coordinates (distance from the nipple toward the chest wall, offsets
across the breast), so a finding lands at a consistent place in the CC and the MLO view.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from mammogmic.data.synth.anatomy import BreastShape
from mammogmic.data.synth.config import SynthConfig


@dataclass(frozen=True)
class Finding:
    """One finding of one breast, independent of the view.

    Attributes:
        cls: ``"benign"`` or ``"malignant"``.
        kind: ``"mass"`` or ``"calcification"``.
        finding_id: short id unique within the exam side (``"malignant_mass"``...).
        depth: distance from the nipple toward the chest wall, as a fraction of the nipple's distance.
        across_cc: offset across the breast in the CC view (-1 lateral .. 1 medial).
        across_mlo: offset across the breast in the MLO view (-1 superior .. 1 inferior).
        size_mm: mass diameter, or calcification-cluster extent.
        contrast: peak density (masses, in fat-to-gland units) or brightness (calcifications, 0..1).
        seed: seed of the finding's shape (shared by both views).
    """

    cls: str
    kind: str
    finding_id: str
    depth: float
    across_cc: float
    across_mlo: float
    size_mm: float
    contrast: float
    seed: int


@dataclass
class RenderedFinding:
    """A finding drawn in one view: patches placed with their upper-left corner at ``origin``."""

    origin: tuple[int, int]  # (row, col) in the canonical frame
    density: np.ndarray  # float32, added density (fat-to-gland units, scaled by thickness)
    calcs: np.ndarray  # float32, added brightness (0..1 units)
    mask: np.ndarray  # bool, lesion extent


def plan_findings(rng: np.random.Generator, config: SynthConfig) -> list[Finding]:
    """Decide which findings one breast holds (at most one per class) and where."""
    out: list[Finding] = []
    for cls, rate in (("malignant", config.malignant_rate), ("benign", config.benign_rate)):
        if rng.random() >= rate:
            continue
        kind = "calcification" if rng.random() < config.calcification_fraction else "mass"
        for _ in range(30):  # keep two findings of one breast apart
            depth = float(rng.uniform(0.22, 0.72))
            across_cc = float(rng.uniform(-0.75, 0.75))
            across_mlo = float(np.clip(0.5 * across_cc + rng.uniform(-0.6, 0.6), -0.8, 0.8))
            if all(
                abs(depth - o.depth) > 0.28
                or (abs(across_cc - o.across_cc) > 0.75 and abs(across_mlo - o.across_mlo) > 0.75)
                for o in out
            ):
                break
        if kind == "mass":
            size = float(rng.uniform(*config.mass_diameter_mm))
            levels = config.mass_contrast
            if cls == "malignant" and config.malignant_mass_contrast is not None:
                levels = config.malignant_mass_contrast
            contrast = float(rng.uniform(*levels))
        else:
            size = float(rng.uniform(*config.calc_cluster_mm))
            contrast = float(rng.uniform(*config.calc_contrast))
        seed = int(rng.integers(0, 2**31 - 1))
        out.append(Finding(cls, kind, f"{cls}_{kind}", depth, across_cc, across_mlo, size, contrast, seed))
    return out


def place_finding(
    f: Finding,
    shape: BreastShape,
    size: tuple[int, int],
    inside: np.ndarray,
    edge_px: Callable[[int, int], float],
    ppm: float,
    avoid: list[tuple[float, float, float]] | None = None,
) -> tuple[float, float] | None:
    """Centre (row, col) of a finding in the canonical frame of one view, or None if it cannot fit.

    The column follows the finding's distance from the nipple; the row its offset across the breast.
    The point is pulled toward the breast's centre until the finding clears the skin by a few mm
    (and, in MLO views, the pectoral muscle) and the findings in ``avoid`` ((row, col, radius) of
    findings already placed in this view).
    """
    h, w = size
    nx = shape.nipple[1] * w
    radius = 0.5 * f.size_mm * ppm
    margin = radius + 4.0 * ppm
    depth = f.depth
    across = f.across_cc if shape.view == "CC" else f.across_mlo
    bumps = 0
    for _ in range(40):
        x = nx * (1.0 - depth)
        col = int(np.clip(round(x), 0, w - 1))
        rows = np.flatnonzero(inside[:, col])
        if rows.size:
            top, bottom = float(rows[0]), float(rows[-1])
            y = 0.5 * (top + bottom) + across * 0.62 * 0.5 * (bottom - top)
            if shape.view == "MLO":
                # stay clear of the pectoral muscle: move down along the column until outside
                mus_x = shape.muscle_edge(np.array([y / h]))[0] * w
                while mus_x > 0 and x - margin < mus_x and y < bottom:
                    y += 0.02 * h
                    mus_x = shape.muscle_edge(np.array([y / h]))[0] * w
            row = int(np.clip(round(y), 0, h - 1))
            clear = all(math.hypot(y - ay, x - ax) > radius + ar + 3.0 * ppm for ay, ax, ar in avoid or [])
            if inside[row, col] and edge_px(row, col) >= margin and clear:
                return (y, x)
            if not clear:  # try the other side of the breast, then another depth
                bumps += 1
                if bumps % 2:
                    across = -across if abs(across) > 0.2 else across + 0.5
                else:
                    depth = depth + 0.15 if depth < 0.5 else depth - 0.15
                continue
        depth = 0.85 * depth + 0.15 * 0.45
        across *= 0.85
    return None


def _supersampling(ppm: float) -> int:
    return 4 if ppm < 6 else 2 if ppm < 12 else 1


def _view_transform(f: Finding, view: str) -> tuple[float, float, float]:
    """Per-view rotation (rad), and scale along/across: the same lesion projected differently."""
    vr = np.random.default_rng(np.random.SeedSequence([f.seed, 7 if view == "CC" else 11]))
    return float(vr.uniform(-0.5, 0.5)), float(vr.uniform(0.92, 1.08)), float(vr.uniform(0.82, 1.0))


def render_finding(
    f: Finding, view: str, center: tuple[float, float], ppm: float, config: SynthConfig
) -> RenderedFinding:
    """Draw a finding around ``center`` (row, col) at ``ppm`` output pixels per mm."""
    if f.kind == "mass":
        return _render_mass(f, view, center, ppm, config)
    return _render_calcs(f, view, center, ppm, config)


def _grid(center: tuple[float, float], half: int, ss: int) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    cy, cx = center
    y0, x0 = int(math.floor(cy)) - half, int(math.floor(cx)) - half
    n = (2 * half + 1) * ss
    coords = (np.arange(n, dtype=np.float32) + 0.5) / ss
    yy = coords[:, None] + (y0 - cy)
    xx = coords[None, :] + (x0 - cx)
    return (y0, x0), np.broadcast_to(yy, (n, n)), np.broadcast_to(xx, (n, n))


def _down(a: np.ndarray, ss: int) -> np.ndarray:
    if ss == 1:
        return a.astype(np.float32)
    n = a.shape[0] // ss
    return cv2.resize(a.astype(np.float32), (n, n), interpolation=cv2.INTER_AREA)


def _render_mass(
    f: Finding, view: str, center: tuple[float, float], ppm: float, config: SynthConfig
) -> RenderedFinding:
    rng = np.random.default_rng(f.seed)
    rot, s_along, s_across = _view_transform(f, view)
    radius = 0.5 * f.size_mm * ppm * s_along
    malignant = f.cls == "malignant"
    reach = 2.9 if malignant else 1.35
    half = int(math.ceil(radius * reach + 3))
    ss = _supersampling(ppm)
    origin, yy, xx = _grid(center, half, ss)
    c, s = math.cos(rot), math.sin(rot)
    u = (c * xx + s * yy) / 1.0
    v = (-s * xx + c * yy) / 1.0
    r = np.hypot(u, v)
    phi = np.arctan2(v, u)
    min_px = config.min_detail_px
    if not malignant:
        ecc = float(rng.uniform(0.62, 1.0))  # oval .. round
        lob = (
            1.0
            + float(rng.normal(0, 0.03)) * np.cos(2 * phi + rng.uniform(0, 6.3))
            + float(rng.normal(0, 0.02)) * np.cos(3 * phi + rng.uniform(0, 6.3))
        )
        rho = np.hypot(u / radius, v / (radius * ecc * s_across)) / lob
        core = np.clip(1.0 - rho * rho, 0.0, 1.0) ** 0.35
        dens = core
        if rng.random() < 0.5:  # thin radiolucent halo: a fine-detail benign sign
            width = max(min_px, 0.5 * ppm) / radius
            halo = (rho >= 1.0) & (rho < 1.0 + width)
            dens = dens - 0.35 * halo
        inside = rho < 1.0
    else:
        # spiculated, or irregular with an indistinct microlobulated margin and few short spicules
        spiculated = rng.random() < config.spiculated_fraction
        macro, micro = (0.11, 0.035) if spiculated else (0.16, 0.055)
        lobes = np.ones_like(r)  # macro-lobulation (orders 2-7)
        fine = np.zeros_like(r)  # micro-lobulation (orders 8-20)
        for k in range(2, 21):
            if k <= 7:
                lobes = lobes + rng.normal(0, macro / math.sqrt(k)) * np.cos(
                    k * phi + rng.uniform(0, 2 * np.pi)
                )
            else:
                fine = fine + rng.normal(0, micro) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        ell = np.hypot(u / radius, v / (radius * s_across))
        rho = ell / np.clip(lobes + fine, 0.6, 1.45)
        # smooth dome inside; the (micro)lobulated outline only shapes the steep rim (a dome built on
        # rho itself would carry the outline's wiggles inward as streaks)
        smooth = ell / np.clip(lobes, 0.6, 1.45)
        core = np.clip(1.0 - smooth * smooth, 0.0, 1.0) ** 0.5 * np.clip(1.0 - rho**8, 0.0, 1.0) ** 0.5
        # indistinct margin: density fades over ~1 mm (irregular type: ~1.6 mm) beyond the lobulated
        # outline; measured against the smooth lobes so that the fade itself has no radial streaks
        fade_mm, fade_amp = (0.9, 0.35) if spiculated else (1.6, 0.5)
        fade = max(fade_mm * ppm, min_px)
        outside = np.maximum(ell / np.clip(lobes, 0.6, 1.45) - 1.0, 0.0)
        tail = fade_amp * np.exp(-outside * radius / fade)
        dens = np.maximum(core, tail)
        # spicules: thin tapering lines radiating from the margin
        canvas = np.zeros(yy.shape, np.uint8)
        n_sp = int(rng.integers(10, 21)) if spiculated else int(rng.integers(0, 5))
        sp_len = (0.8, 1.7) if spiculated else (0.3, 0.7)
        base_angles = np.sort(rng.uniform(0, 2 * np.pi, n_sp))
        w0_px = max(min_px, 0.6 * ppm)
        ctr = np.array([(center[1] - origin[1]) * ss, (center[0] - origin[0]) * ss])
        for ang in base_angles:
            length = radius * float(rng.uniform(*sp_len))
            width = w0_px * float(rng.uniform(1.0, 1.35))
            start = 0.6 * radius
            drift = float(rng.normal(0, 0.12))
            n_pts = 10
            t = np.linspace(0.0, 1.0, n_pts)
            theta = ang + rot + drift * t * t
            dist_c = start + length * t
            cx = ctr[0] + dist_c * np.cos(theta) * ss
            cy = ctr[1] + dist_c * np.sin(theta) * ss
            hw = 0.5 * width * ss * (1.0 - t) ** 0.8 + 0.15 * ss
            nx_, ny_ = -np.sin(theta), np.cos(theta)
            left = np.stack([cx + hw * nx_, cy + hw * ny_], 1)
            right = np.stack([cx - hw * nx_, cy - hw * ny_], 1)
            poly = np.concatenate([left, right[::-1]], 0)
            cv2.fillPoly(canvas, [np.round(poly * 16).astype(np.int32)], 255, lineType=cv2.LINE_8, shift=4)
        spic = canvas.astype(np.float32) * (float(rng.uniform(0.5, 0.7)) / 255.0)
        dens = np.maximum(dens, spic)
        inside = rho < 1.0
    density = _down(dens, ss) * f.contrast
    mask = _down(inside.astype(np.float32), ss) >= 0.5
    return RenderedFinding(origin, density.astype(np.float32), np.zeros_like(density), mask)


def _calc_shapes(f: Finding, rng: np.random.Generator, min_mm: float = 0.0) -> list[tuple[np.ndarray, float]]:
    """Calcifications as (polygon in mm around the cluster centre, relative brightness).

    ``min_mm`` is the smallest width drawn (the output's minimum detail size); it never changes
    which random numbers are drawn, so the cluster is the same at every image size.
    """
    shapes: list[tuple[np.ndarray, float]] = []
    ext = f.size_mm

    def poly_round(cx: float, cy: float, rad: float, n: int = 16, jitter: float = 0.05) -> np.ndarray:
        a = np.linspace(0, 2 * np.pi, n, endpoint=False)
        rr = rad * (1 + rng.uniform(-jitter, jitter, n))
        return np.stack([cx + rr * np.cos(a), cy + rr * np.sin(a)], 1)

    if f.cls == "malignant":
        # a duct running toward the nipple (+x) with side branches; calcs sit along it
        segments: list[tuple[np.ndarray, np.ndarray]] = []
        p = np.array([-0.5 * ext, rng.uniform(-0.15, 0.15) * ext])
        ang = rng.uniform(-0.35, 0.35)
        main: list[np.ndarray] = [p.copy()]
        step = ext / 8
        for _ in range(8):
            ang += rng.normal(0, 0.2)
            p = p + step * np.array([math.cos(ang), math.sin(ang)])
            main.append(p.copy())
        for i in range(len(main) - 1):
            segments.append((main[i], main[i + 1]))
        for _ in range(int(rng.integers(3, 6))):
            i = int(rng.integers(1, len(main) - 2))
            q = main[i].copy()
            b_ang = math.atan2(*(main[i + 1] - main[i])[::-1]) + rng.choice([-1, 1]) * rng.uniform(0.4, 0.9)
            for _ in range(int(rng.integers(2, 5))):
                b_ang += rng.normal(0, 0.2)
                q2 = q + step * 0.8 * np.array([math.cos(b_ang), math.sin(b_ang)])
                segments.append((q, q2))
                q = q2
        lengths = np.array([np.linalg.norm(b - a) for a, b in segments])
        n_calc = int(rng.integers(22, 46))
        picks = rng.choice(len(segments), size=n_calc, p=lengths / lengths.sum())
        for k in picks:
            a, b = segments[k]
            t = rng.uniform(0, 1)
            c = a + t * (b - a)
            d = (b - a) / (np.linalg.norm(b - a) + 1e-9)
            nrm = np.array([-d[1], d[0]])
            c = c + nrm * rng.normal(0, 0.12)
            bright = float(rng.uniform(0.7, 1.0))
            if rng.random() < 0.45:  # fine linear fragment along the duct
                ln, wd = rng.uniform(0.5, 1.3), max(rng.uniform(0.15, 0.3), min_mm)
                pts = np.array(
                    [
                        c - d * ln / 2 + nrm * wd / 2,
                        c + d * ln / 2 + nrm * wd / 2,
                        c + d * ln / 2 - nrm * wd / 2,
                        c - d * ln / 2 - nrm * wd / 2,
                    ]
                )
                shapes.append((pts, bright))
            else:  # fine pleomorphic: small irregular polygon
                nv = int(rng.integers(3, 7))
                rad = max(rng.uniform(0.12, 0.3), 0.5 * min_mm)
                shapes.append((poly_round(c[0], c[1], rad, n=nv, jitter=0.45), bright))
    else:
        if rng.random() < 0.25:  # popcorn: one or two coarse lumpy calcifications
            for _ in range(int(rng.integers(1, 3))):
                c0 = rng.uniform(-0.25, 0.25, 2) * ext
                for _ in range(int(rng.integers(4, 8))):
                    c = c0 + rng.normal(0, 0.6, 2)
                    shapes.append(
                        (poly_round(c[0], c[1], rng.uniform(0.5, 1.0)), float(rng.uniform(0.8, 1.0)))
                    )
        else:  # scattered coarse round / rim calcifications
            n_calc = int(rng.integers(3, 9))
            spots: list[np.ndarray] = []
            while len(spots) < n_calc:
                c = rng.uniform(-0.5, 0.5, 2) * ext
                if np.hypot(*c) <= 0.5 * ext and all(np.hypot(*(c - q)) > 1.8 for q in spots):
                    spots.append(c)
                if len(spots) == 0 and rng.random() < 0.01:
                    spots.append(np.zeros(2))
            for c in spots:
                rad = rng.uniform(0.35, 0.8)
                bright = float(rng.uniform(0.7, 1.0))
                shapes.append((poly_round(c[0], c[1], rad), bright))
                if rad > 0.5 and rng.random() < 0.35:  # rim ("eggshell"): lucent centre
                    shapes.append((poly_round(c[0], c[1], rad * 0.5), -0.6 * bright))
    return shapes


def _render_calcs(
    f: Finding, view: str, center: tuple[float, float], ppm: float, config: SynthConfig
) -> RenderedFinding:
    rng = np.random.default_rng(f.seed)
    rot, s_along, s_across = _view_transform(f, view)
    shapes = _calc_shapes(f, rng, config.min_detail_px / ppm)
    c, s = math.cos(rot), math.sin(rot)
    rotm = np.array([[c * s_along, -s * s_along], [s * s_across, c * s_across]])
    all_pts = np.concatenate([p for p, _ in shapes], 0) @ rotm.T
    margin_mm = 1.4
    half = int(math.ceil((np.abs(all_pts).max() + margin_mm + 1.0) * ppm + 2))
    ss = _supersampling(ppm)
    n = (2 * half + 1) * ss
    origin = (int(math.floor(center[0])) - half, int(math.floor(center[1])) - half)
    off = np.array([center[1] - origin[1], center[0] - origin[0]])
    canvas = np.zeros((n, n), np.float32)
    mask_canvas = np.zeros((2 * half + 1, 2 * half + 1), np.uint8)
    min_r_px = 0.5 * config.min_detail_px
    for poly_mm, bright in shapes:
        pts_mm = poly_mm @ rotm.T
        ctr = pts_mm.mean(0)
        # enforce a minimum size in pixels so fine calcifications survive at reduced resolution
        ext_px = np.abs(pts_mm - ctr).max() * ppm
        if ext_px < min_r_px:
            pts_mm = ctr + (pts_mm - ctr) * (min_r_px / max(ext_px, 1e-6))
        pts_px = (pts_mm * ppm + off) * ss
        if bright >= 0:
            cv2.fillPoly(canvas, [np.round(pts_px * 16).astype(np.int32)], float(bright), cv2.LINE_8, 4)
        else:  # lucent centre of a rim calcification
            tmp = np.zeros_like(canvas)
            cv2.fillPoly(tmp, [np.round(pts_px * 16).astype(np.int32)], 1.0, cv2.LINE_8, 4)
            canvas = np.where(tmp > 0, canvas * (1 + bright), canvas)
        if bright > 0:
            cpx = ctr * ppm + off
            rad = int(round((np.abs(pts_mm - ctr).max() + margin_mm) * ppm))
            cv2.circle(mask_canvas, (int(round(cpx[0])), int(round(cpx[1]))), max(rad, 1), 255, -1)
    k = max(3, int(round(2.5 * ppm)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    closed = cv2.morphologyEx(mask_canvas, cv2.MORPH_CLOSE, kernel)
    calcs = _down(canvas, ss) * f.contrast
    density = np.zeros_like(calcs)
    return RenderedFinding(origin, density, calcs.astype(np.float32), closed > 0)
