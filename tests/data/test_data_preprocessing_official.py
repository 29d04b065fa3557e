"""The re-implemented preprocessing equals the official pipeline's recorded outputs on real images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mammogmic.data import best_center, crop_breast, model_input, read_image

NAMES = ["0_L-CC", "0_R-CC", "0_L-MLO", "0_R-MLO", "1_R_CC", "2_L_CC"]


def _assert_statistics(x: np.ndarray, mean: Any, std: Any, total: Any = None) -> None:
    """Float64 statistics of the whole input. Measured equal to the recorded ones (difference 0); the tiny
    tolerance only allows another numpy build to sum the 5.7 million values in another order."""
    x64 = x.astype(np.float64)
    assert abs(x64.mean() - float(mean)) <= 1e-12
    assert abs(x64.std() - float(std)) <= 1e-12
    if total is not None:
        assert abs(x64.sum() - float(total)) <= 1e-6


@pytest.fixture(scope="module")
def crops(fixtures_dir: Path, official_metadata: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name in NAMES:
        entry = official_metadata["images"][name]
        image, _ = read_image(fixtures_dir / entry["original_png"])
        out[name] = (entry, crop_breast(image, entry["view"], entry["horizontal_flip"]))
    return out


@pytest.mark.fixtures
@pytest.mark.parametrize("name", NAMES)
def test_crop_fields_equal_official(name: str, crops: dict[str, Any], fixtures_dir: Path) -> None:
    entry, info = crops[name]
    assert list(info.window_location) == entry["window_location"]
    (r0, r1), rc = info.rightmost_points
    assert [[r0, r1], rc] == entry["rightmost_points"]
    br, (b0, b1) = info.bottommost_points
    assert [br, [b0, b1]] == entry["bottommost_points"]
    assert info.distance_from_starting_side == entry["distance_from_starting_side"]
    reference, _ = read_image(fixtures_dir / entry["cropped_png"])
    np.testing.assert_array_equal(info.cropped, reference)


@pytest.mark.fixtures
@pytest.mark.parametrize("name", NAMES)
def test_best_center_equals_official(name: str, crops: dict[str, Any], fixtures_dir: Path) -> None:
    entry, info = crops[name]
    assert list(best_center(info)) == entry["best_center"]
    # The same from the official cropped PNG and the recorded points (the stage-2 inputs).
    cropped, _ = read_image(fixtures_dir / entry["cropped_png"])
    centre = best_center(
        cropped,
        entry["view"],
        entry["rightmost_points"],
        entry["bottommost_points"],
        horizontal_flip=entry["horizontal_flip"],
    )
    assert list(centre) == entry["best_center"]


@pytest.mark.fixtures
@pytest.mark.parametrize("name", NAMES)
def test_model_input_matches_official(name: str, crops: dict[str, Any], fixtures_dir: Path) -> None:
    entry, info = crops[name]
    expected = np.load(fixtures_dir / entry["expected_npz"])
    x = model_input(
        info.cropped, entry["view"], entry["best_center"], horizontal_flip=entry["horizontal_flip"]
    )
    assert x.dtype == np.float32
    assert list(x.shape) == list(expected["input_shape"][2:])
    # Bit-identical (scripts/conformance_report.py measures 0 for every value).
    np.testing.assert_array_equal(x[::16, ::16], expected["input_sub16"])
    rows, cols = expected["input_probe_positions"].T
    np.testing.assert_array_equal(x[rows, cols], expected["input_probe_values"])
    assert float(x.min()) == float(expected["input_min"]) and float(x.max()) == float(expected["input_max"])
    _assert_statistics(x, expected["input_mean"], expected["input_std"], expected["input_sum_f64"])


@pytest.mark.fixtures
def test_process_image_large_matches_official(fixtures_dir: Path) -> None:
    expected = np.load(fixtures_dir / "expected" / "process_image_large.npz")
    image, _ = read_image(fixtures_dir / "images" / "original" / "2_L_CC.png")
    rows, cols = expected["probe_positions"].T
    for i, view in enumerate(expected["views"]):
        for j, centre in enumerate(expected["centers"]):
            x = model_input(image, str(view), (int(centre[0]), int(centre[1])))
            assert list(x.shape) == list(expected["shape"][i, j])
            np.testing.assert_array_equal(x[::16, ::16], expected["sub16"][i, j])
            np.testing.assert_array_equal(x[rows, cols], expected["probe_values"][i, j])
            _assert_statistics(x, expected["mean"][i, j], expected["std"][i, j])
