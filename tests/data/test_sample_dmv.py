"""DMV-CNN inputs through the one sample path: per-view windows, heat-map channels, the official TTA draw order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mammogmic.data.preprocessing import model_input
from mammogmic.data.sample import (
    DMV_CONTRACTS,
    SampleError,
    Source,
    dmv_contract,
    dmv_exam_windows,
    read_heatmaps,
    window_sample,
)

VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")


def _source(view: str, seed: int, heat: bool = False) -> Source:
    rng = np.random.default_rng(seed)
    cropped = rng.integers(1, 4000, size=(300, 200)).astype(np.uint16)
    source = Source(cropped=cropped, view=view, horizontal_flip="NO", center=(150, 90))
    if heat:
        source.heatmaps = np.stack([cropped / 4000.0, cropped / 8000.0]).astype(np.float32)
    return source


def test_dmv_contracts_per_view_angle() -> None:
    assert dmv_contract("L-CC").input_shape == (2677, 1942)
    assert dmv_contract("R-MLO").input_shape == (2974, 1748)
    assert dmv_contract("R_CC") is DMV_CONTRACTS["CC"]
    assert dmv_contract("L-CC").noise.max_crop_noise == (100, 100)
    assert dmv_contract("L-CC").noise.max_crop_size_noise == 100


@pytest.mark.parametrize("noisy", [False, True])
def test_heatmap_channels_follow_the_image_unstandardised(noisy: bool) -> None:
    source = _source("R-CC", 0, heat=True)
    contract = dmv_contract("R-CC")
    rng = (lambda: np.random.RandomState(3)) if noisy else (lambda: None)
    x, _ = window_sample(source, contract, rng=rng())
    assert x.shape == (3, 2677, 1942) and x.dtype == np.float32
    image_only, _ = window_sample(Source(source.cropped, "R-CC", "NO", source.center), contract, rng=rng())
    assert image_only.shape == (1, 2677, 1942)
    np.testing.assert_array_equal(x[0], image_only[0])  # the image channel is the same with or without maps
    assert abs(float(x[0].mean())) < 1e-4 and abs(float(x[0].std()) - 1) < 1e-4
    raw = model_input(
        source.cropped,
        "R-CC",
        source.center,
        rng=rng(),
        noise=contract.noise if noisy else None,
        out_shape=contract.input_shape,
        standardize_image=False,
    )
    np.testing.assert_allclose(x[1], raw / 4000.0, rtol=1e-5, atol=1e-6)  # same geometry (R view mirrored)
    np.testing.assert_allclose(x[2], raw / 8000.0, rtol=1e-5, atol=1e-6)


def test_exam_windows_draw_pass_by_pass() -> None:
    sources = {v: _source(v, i) for i, v in enumerate(VIEWS)}
    windows = dmv_exam_windows(sources, tta=2, rng=np.random.RandomState(7))
    assert {v: w.shape[:2] for v, w in windows.items()} == dict.fromkeys(VIEWS, (2, 1))
    rng = np.random.RandomState(7)
    for t in range(2):
        for view in VIEWS:  # the official order: pass, then L-CC, R-CC, L-MLO, R-MLO
            expected, _ = window_sample(sources[view], dmv_contract(view), rng=rng)
            np.testing.assert_array_equal(windows[view][t], expected)
    single = dmv_exam_windows(sources)
    assert single["L-MLO"].shape == (1, 1, 2974, 1748)
    with pytest.raises(ValueError, match="missing R-MLO"):
        dmv_exam_windows({v: s for v, s in sources.items() if v != "R-MLO"})
    with pytest.raises(ValueError, match="random generator"):
        dmv_exam_windows(sources, tta=2)


def test_read_heatmaps_checks_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, benign=np.zeros((4, 3), np.float32), malignant=np.ones((4, 3), np.float32))
    maps = read_heatmaps(good, (4, 3))
    assert maps.shape == (2, 4, 3) and maps.dtype == np.float32 and maps[1].sum() == 12
    cases = {
        "shape": ((4, 4), good, r"heat maps of shape \(4, 3\), but the cropped image is \(4, 4\)"),
        "absent": ((4, 3), tmp_path / "absent.npz", "unreadable heat-map file"),
    }
    only = tmp_path / "only.npz"
    np.savez(only, benign=np.zeros((4, 3), np.float32))
    cases["arrays"] = ((4, 3), only, r"without array\(s\) malignant")
    nan = tmp_path / "nan.npz"
    np.savez(nan, benign=np.full((4, 3), np.nan, np.float32), malignant=np.zeros((4, 3), np.float32))
    cases["nan"] = ((4, 3), nan, "NaN")
    text = tmp_path / "text.npz"
    text.write_text("not a zip")
    cases["text"] = ((4, 3), text, "unreadable heat-map file")
    for shape, path, message in cases.values():
        with pytest.raises(SampleError, match=message) as info:
            read_heatmaps(path, shape)
        assert str(path) in str(info.value) and info.value.stage == "heatmaps"
