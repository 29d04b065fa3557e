"""Preprocessing on small synthetic images: morphology equivalence, orientation, windows, errors."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import synthetic_breast
from scipy import ndimage

from mammogmic.data import NO_NOISE, CropNoise, best_center, cbis_ddsm_input, crop_breast, model_input
from mammogmic.data.preprocessing import (
    _dilate,
    _erode,
    _largest_component,
    chest_wall_side,
    expected_chest_wall_side,
    needs_flip,
    parse_view,
    sample_window,
)
from mammogmic.errors import PreprocessingError


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("iterations", [1, 3, 7])
def test_distance_transform_morphology_equals_scipy(seed: int, iterations: int) -> None:
    rng = np.random.default_rng(seed)
    # Blobs touching the border, thin lines and isolated pixels exercise the border behaviour.
    mask = ndimage.binary_dilation(rng.random((61, 47)) > 0.93, iterations=2)
    mask[:, :3] = True
    mask[30, :] = True
    np.testing.assert_array_equal(
        _erode(mask, iterations), ndimage.binary_erosion(mask, iterations=iterations)
    )
    np.testing.assert_array_equal(
        _dilate(mask, iterations), ndimage.binary_dilation(mask, iterations=iterations)
    )


@pytest.mark.parametrize("seed", range(12))
def test_largest_component_equals_scipy_label(seed: int) -> None:
    """OpenCV's labelling replaces scipy's: same component, ties to the first in raster order (scipy's lowest
    label), also for shapes (a U opening upwards) whose OpenCV label order could differ from scipy's."""
    rng = np.random.default_rng(seed)
    mask = rng.random((40, 33)) > (0.72 if seed % 2 else 0.6)  # many small components, some tied
    if seed == 0:
        mask[:] = False
        mask[5:20, 2] = mask[5:20, 8] = mask[19, 2:9] = True  # a U of 35 pixels: arms meet at the bottom
        mask[3:8, 20:27] = True  # 35 pixels too, starting earlier in raster order: wins the tie
        mask[25:35, 12:15] = True  # 30 pixels
    labels, _ = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    np.testing.assert_array_equal(_largest_component(mask), labels == np.argmax(sizes))


def test_parse_view_accepts_spellings_and_rejects_unknown() -> None:
    assert parse_view("L-CC") == ("L", "CC")
    assert parse_view("r_mlo") == ("R", "MLO")
    assert parse_view("RCC") == ("R", "CC")
    with pytest.raises(PreprocessingError, match="unknown view 'L-ML'"):
        parse_view("L-ML")
    with pytest.raises(PreprocessingError, match="unknown view"):
        crop_breast(synthetic_breast(), "X-CC")


def test_orientation_convention() -> None:
    assert not needs_flip("L-CC") and needs_flip("R-MLO")
    assert needs_flip("L-CC", "YES") and not needs_flip("R-CC", "YES")
    assert chest_wall_side(synthetic_breast(side="L")) == "left" == expected_chest_wall_side("L-CC")
    assert chest_wall_side(synthetic_breast(side="R")) == "right" == expected_chest_wall_side("R-CC")
    with pytest.raises(PreprocessingError, match="horizontal_flip"):
        needs_flip("L-CC", "MAYBE")


def test_left_and_mirrored_right_crops_agree() -> None:
    left = np.zeros((160, 120), np.uint16)
    left[20:140, :70] = synthetic_breast((120, 70), "L")
    left[5, 100:118] = 900  # a thin label line that erosion must remove
    right = left[:, ::-1].copy()
    a = crop_breast(left, "L-CC", iterations=3, buffer_size=5)
    b = crop_breast(right, "R-CC", iterations=3, buffer_size=5)
    # Mirrored views report column c of the unmirrored crop as ``width - c`` (official quirk): one more.
    assert b.rightmost_points == (a.rightmost_points[0], a.rightmost_points[1] + 1)
    assert b.bottommost_points[0] == a.bottommost_points[0]
    assert b.bottommost_points[1] == (a.bottommost_points[1][0] + 1, a.bottommost_points[1][1] + 1)
    np.testing.assert_array_equal(a.oriented, b.oriented)
    top, bottom, left_col, right_col = a.window_location
    rows = np.flatnonzero(left[:, :90].any(axis=1))
    cols = np.flatnonzero(left[20:].any(axis=0))
    # The thin line is dropped by the erosion; 5-pixel buffers at top, bottom and the nipple side only.
    assert (top, bottom, left_col, right_col) == (rows[0] - 5, rows[-1] + 1 + 5, 0, cols[-1] + 1 + 5)
    np.testing.assert_array_equal(a.cropped, left[top:bottom, left_col:right_col])
    row_a, col_a = best_center(a, window_shape=(64, 48))
    assert best_center(b, window_shape=(64, 48)) == (row_a, col_a + 1)


def test_crop_errors() -> None:
    with pytest.raises(PreprocessingError, match="no breast found"):
        crop_breast(np.zeros((300, 200), np.uint16), "L-CC")
    speckle = np.zeros((300, 200), np.uint16)
    speckle[::7, ::7] = 1000
    with pytest.raises(PreprocessingError, match="nothing is left after erosion"):
        crop_breast(speckle, "L-CC", iterations=2)
    bad = synthetic_breast().astype(np.float32)
    bad[3, 4] = np.nan
    with pytest.raises(PreprocessingError, match="NaN or infinite"):
        crop_breast(bad, "L-CC")
    bad[3, 4] = np.inf
    with pytest.raises(PreprocessingError, match="NaN or infinite"):
        model_input(bad, "L-CC", (60, 40), out_shape=(64, 48))


def test_model_input_small_image_is_padded_per_view() -> None:
    image = np.full((40, 30), 7, np.uint16)
    cc = model_input(image, "L-CC", (20, 15), out_shape=(64, 48), standardize_image=False)
    mlo = model_input(image, "L-MLO", (20, 15), out_shape=(64, 48), standardize_image=False)
    # CC: centred vertically (12 rows above), MLO: at the top; both at the left.
    assert np.argwhere(cc > 0)[0].tolist() == [12, 0] and np.argwhere(cc > 0)[-1].tolist() == [51, 29]
    assert np.argwhere(mlo > 0)[0].tolist() == [0, 0] and np.argwhere(mlo > 0)[-1].tolist() == [39, 29]
    standardised = model_input(image, "L-CC", (20, 15), out_shape=(64, 48))
    assert abs(float(standardised.mean())) < 1e-5 and abs(float(standardised.std()) - 1) < 1e-4


@pytest.mark.parametrize("view", ["L-CC", "L-MLO"])
def test_window_geometry_by_hand(view: str) -> None:
    """Without noise and with an image larger than the window: rows centre - h // 2 .. + h, columns
    centre - w // 2 .. + w, shifted back inside at the borders; no padding. The same for CC and MLO."""
    shape = (400, 300)
    assert sample_window(shape, view, (200, 150), window_shape=(100, 80)).borders == (150, 250, 110, 190)
    assert sample_window(shape, view, (200, 150), window_shape=(101, 81)).borders == (150, 251, 110, 191)
    corner = sample_window(shape, view, (20, 290), window_shape=(100, 80))  # past the top and the right
    assert corner.borders == (0, 100, 220, 300) and corner.padded_shape == shape and corner.pad_top == 0
    image = np.arange(400 * 300, dtype=np.uint32).reshape(shape) % 4093 + 1
    x = model_input(image, view, (200, 150), out_shape=(100, 80), standardize_image=False)
    np.testing.assert_array_equal(x, image[150:250, 110:190].astype(np.float32))


@pytest.mark.parametrize("view", ["L-CC", "R-MLO"])
def test_noisy_windows_stay_inside_and_masks_follow(view: str) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(1, 1000, size=(300, 200)).astype(np.uint16)
    mask = np.zeros_like(image, dtype=bool)
    mask[130:160, 90:110] = True  # inside every shifted window
    noise = CropNoise((20, 20), 10)
    seen = set()
    for _ in range(20):
        window = sample_window((300, 200), view, (150, 100), rng=rng, noise=noise, window_shape=(128, 96))
        top, bottom, left, right = window.borders
        assert 0 <= top < bottom <= window.padded_shape[0] and 0 <= left < right <= window.padded_shape[1]
        seen.add(window.borders)
    assert len(seen) > 10  # the noise really moves the window
    # Without size noise no resize happens: the window is an exact copy, so the mask marks the same pixels.
    x, masks = model_input(
        image,
        view,
        (150, 100),
        rng=rng,
        noise=CropNoise((20, 20), 0),
        out_shape=(128, 96),
        masks=[mask],
        standardize_image=False,
    )
    oriented = image[:, ::-1] if view.startswith("R") else image
    oriented_mask = mask[:, ::-1] if view.startswith("R") else mask
    expected_values = np.sort(oriented[oriented_mask])
    assert masks.shape == (1, 128, 96) and masks.dtype == np.uint8
    np.testing.assert_array_equal(np.sort(x[masks[0] > 0]), expected_values.astype(np.float32))


def test_zero_noise_is_deterministic_and_generator_agnostic() -> None:
    image = synthetic_breast((200, 150))
    a = model_input(
        image, "L-CC", (100, 40), rng=np.random.default_rng(1), noise=NO_NOISE, out_shape=(128, 96)
    )
    b = model_input(image, "L-CC", (100, 40), rng=np.random.RandomState(2), out_shape=(128, 96))
    np.testing.assert_array_equal(a, b)


def test_reduced_out_shape_resizes_the_full_window() -> None:
    image = synthetic_breast((400, 300))
    x = model_input(image, "L-MLO", (150, 60), out_shape=(92, 60), window_shape=(368, 240))
    assert x.shape == (92, 60) and x.dtype == np.float32


def test_cbis_ddsm_variant() -> None:
    raw = np.zeros((260, 200), np.uint16)
    raw[30:230, 100:200] = synthetic_breast((200, 100), "R")
    out = cbis_ddsm_input(raw, "R-MLO", out_shape=(64, 48), iterations=2)
    assert out.shape == (64, 48) and out.dtype == np.float32
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    # Oriented to face right: the chest-wall side (column 0) is brighter on average.
    assert out[:, :8].mean() > out[:, -8:].mean()


def _scipy_reference_mask(image: np.ndarray, iterations: int) -> np.ndarray:
    """The official crop mask written with scipy's iterated morphology and labelling (reference only)."""
    eroded = ndimage.binary_erosion(image > 0, iterations=iterations)
    labels, _ = ndimage.label(eroded)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_dilation(labels == np.argmax(sizes), iterations=iterations)


@pytest.mark.parametrize("seed", range(6))
def test_crop_equals_scipy_reference_on_random_blobs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = np.zeros((90, 70), np.uint16)
    for _ in range(rng.integers(2, 6)):  # blobs of random size, some touching the border, some tied
        r, c = rng.integers(0, 90), rng.integers(0, 70)
        h, w = rng.integers(5, 40), rng.integers(5, 40)
        image[max(r - h // 2, 0) : r + h // 2, max(c - w // 2, 0) : c + w // 2] = 500
    if seed == 0:  # two equal squares: the first in raster order must win
        image[:] = 0
        image[50:70, 5:25] = 300
        image[10:30, 40:60] = 300
    reference = _scipy_reference_mask(image, 2)
    rows, cols = np.flatnonzero(reference.any(axis=1)), np.flatnonzero(reference.any(axis=0))
    info = crop_breast(image, "L-CC", iterations=2, buffer_size=3)
    top, bottom, left, right = info.window_location
    assert (top, bottom, left) == (max(rows[0] - 3, 0), min(rows[-1] + 4, 90), cols[0])
    assert right == min(cols[-1] + 4, 70)
    assert info.bottommost_points[0] == rows[-1] - top


def test_chest_wall_side_with_noisy_background() -> None:
    rng = np.random.default_rng(0)
    image = synthetic_breast((120, 80), "L") + rng.integers(1, 40, size=(120, 80)).astype(np.uint16)
    assert (image > 0).all()  # no zero background at all
    assert chest_wall_side(image) == "left" and chest_wall_side(image[:, ::-1]) == "right"
