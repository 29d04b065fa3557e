from __future__ import annotations

import numpy as np
import pytest

from mammogmic.data.synth import VIEWS, SynthConfig, generate_exam
from mammogmic.data.synth.config import DENSITY_LETTERS
from mammogmic.data.synth.findings import Finding, _calc_shapes, render_finding

SIZE = (256, 160)
ALWAYS = SynthConfig.demo(malignant_rate=1.0, benign_rate=1.0)


def test_views_dtypes_and_12_bit_range() -> None:
    exam = generate_exam(3, SIZE, SynthConfig.demo())
    assert [v[0] for v in exam] == list(VIEWS)
    for view, image, masks, meta in exam:
        assert image.dtype == np.uint16 and image.shape == SIZE
        assert int(image.max()) <= 4095
        assert (image == 0).mean() > 0.15, f"{view}: no background around the breast"
        assert (image > 0).mean() > 0.25, f"{view}: breast too small"
        assert set(masks) == {"benign", "malignant"}
        for m in masks.values():
            assert m.dtype == np.uint8 and m.shape == SIZE
            assert set(np.unique(m)) <= {0, 255}
            assert not (m.astype(bool) & (image == 0)).any(), "lesion mask outside the breast"
        assert meta["laterality"] == view[0] and meta["view"] == view[2:]
        assert meta["density"] in DENSITY_LETTERS


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_raw_orientation(seed: int) -> None:
    for view, image, _, _ in generate_exam(seed, SIZE, SynthConfig()):
        cols = (image > 0).sum(axis=0)
        half = SIZE[1] // 2
        left, right = cols[:half].sum(), cols[half:].sum()
        if view.startswith("L"):
            assert cols[0] > 0.3 * SIZE[0] and cols[-1] == 0, view  # chest wall at column 0
            assert left > 1.5 * right, view
        else:
            assert cols[-1] > 0.3 * SIZE[0] and cols[0] == 0, view  # chest wall at the right edge
            assert right > 1.5 * left, view


def test_mlo_has_brighter_pectoral_corner_than_cc() -> None:
    exam = {
        v: img for v, img, _, _ in generate_exam(4, (512, 320), SynthConfig(malignant_rate=0, benign_rate=0))
    }
    for side in "LR":
        mlo = exam[f"{side}-MLO"].astype(float)
        cc = exam[f"{side}-CC"].astype(float)
        corner = (slice(0, 40), slice(0, 30) if side == "L" else slice(-30, None))
        mlo_corner = mlo[corner][mlo[corner] > 0]
        assert mlo_corner.size > 0.8 * mlo[corner].size, "MLO tissue must reach the top chest-wall corner"
        assert mlo_corner.mean() > np.median(mlo[mlo > 0]), (
            "pectoral muscle should be brighter than the breast"
        )
        assert (cc[corner] == 0).mean() > 0.5, "CC views have no tissue in the top corner"


def test_deterministic_and_seed_dependent() -> None:
    a = generate_exam(7, SIZE, SynthConfig.demo())
    b = generate_exam(7, SIZE, SynthConfig.demo())
    c = generate_exam(8, SIZE, SynthConfig.demo())
    for (_, ia, ma, meta_a), (_, ib, mb, meta_b) in zip(a, b, strict=True):
        assert np.array_equal(ia, ib)
        assert all(np.array_equal(ma[k], mb[k]) for k in ma)
        assert meta_a == meta_b
    assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, c, strict=True))


def test_no_findings_gives_empty_masks() -> None:
    for _, _, masks, meta in generate_exam(5, SIZE, SynthConfig(malignant_rate=0.0, benign_rate=0.0)):
        assert not masks["benign"].any() and not masks["malignant"].any()
        assert meta["findings"] == []


@pytest.mark.parametrize("seed", range(6))
def test_finding_in_both_views_at_consistent_depth(seed: int) -> None:
    exam = {v: (img, masks, meta) for v, img, masks, meta in generate_exam(seed, SIZE, ALWAYS)}
    for side in "LR":
        depth: dict[str, dict[str, float]] = {}
        for view in ("CC", "MLO"):
            img, masks, meta = exam[f"{side}-{view}"]
            for cls in ("benign", "malignant"):
                assert masks[cls].any(), f"{side}-{view}: {cls} finding missing"
                assert (masks[cls] > 0).mean() < 0.06, "findings must be small relative to the image"
            nipple_x = meta["nipple"][0]
            chest_x = 0.0 if side == "L" else float(SIZE[1])
            for f in meta["findings"]:
                frac = abs(nipple_x - f["center"][0]) / abs(nipple_x - chest_x)
                depth.setdefault(f["finding_id"], {})[view] = frac
                x0, y0, x1, y1 = f["box"]
                assert masks[f["label"]][y0:y1, x0:x1].any()
        assert len(depth) == 2
        for fid, d in depth.items():
            assert set(d) == {"CC", "MLO"}, fid
            assert abs(d["CC"] - d["MLO"]) < 0.2, (fid, d)


def _rendered(cls: str, kind: str, seed: int, ppm: float) -> tuple[np.ndarray, np.ndarray]:
    f = Finding(cls, kind, f"{cls}_{kind}", 0.5, 0.0, 0.0, 12.0, 0.6, seed)
    r = render_finding(f, "CC", (200.0, 200.0), ppm, SynthConfig.demo())
    return (r.density if kind == "mass" else r.calcs), r.mask


def test_malignant_masses_have_spicules_beyond_their_outline_benign_do_not() -> None:
    ppm = 3.16  # the demo's 736x480 scale
    for seed in range(5):
        for cls in ("benign", "malignant"):
            dens, mask = _rendered(cls, "mass", seed, ppm)
            yy, xx = np.nonzero(mask)
            cy, cx = yy.mean(), xx.mean()
            radius = np.sqrt(mask.sum() / np.pi)
            gy, gx = np.mgrid[0 : dens.shape[0], 0 : dens.shape[1]]
            far = np.hypot(gy - cy, gx - cx) > 1.6 * radius
            if cls == "malignant":
                assert (dens[far] > 0.1).sum() >= 20, "malignant mass without spicules"
            else:
                assert (dens[far] > 0.01).sum() == 0, "benign mass must be circumscribed"


def _polygon_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def test_calcification_morphology_differs_in_fine_detail() -> None:
    count: dict[str, list[int]] = {"benign": [], "malignant": []}
    area: dict[str, list[float]] = {"benign": [], "malignant": []}
    for seed in range(8):
        for cls in count:
            f = Finding(cls, "calcification", "c", 0.5, 0.0, 0.0, 12.0, 0.4, seed)
            shapes = [p for p, b in _calc_shapes(f, np.random.default_rng(seed)) if b > 0]
            count[cls].append(len(shapes))
            area[cls].extend(_polygon_area(p) for p in shapes)
            calcs, mask = _rendered(cls, "calcification", seed, 3.16)
            assert calcs.max() > 0.2, "calcifications must stand out"
            assert mask[calcs > 0.05].all(), "every calcification lies inside the cluster mask"
            assert mask.mean() < 0.5
    # malignant: many fine specks; benign: few coarse ones (area in mm^2)
    assert min(count["malignant"]) > max(count["benign"])
    assert np.median(area["benign"]) > 5 * np.median(area["malignant"])


def _solidity(mask: np.ndarray) -> float:
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    c = max(contours, key=cv2.contourArea)
    return float(cv2.contourArea(c) / cv2.contourArea(cv2.convexHull(c)))


def test_non_spiculated_malignant_masses_have_irregular_outlines() -> None:
    cfg = SynthConfig.demo(spiculated_fraction=0.0)
    for seed in range(6):
        solidity = {}
        for cls in ("benign", "malignant"):
            f = Finding(cls, "mass", "m", 0.5, 0.0, 0.0, 12.0, 0.6, seed)
            solidity[cls] = _solidity(render_finding(f, "CC", (100.0, 100.0), 3.16, cfg).mask)
        assert solidity["benign"] > 0.95, solidity
        assert solidity["malignant"] < 0.9, solidity
