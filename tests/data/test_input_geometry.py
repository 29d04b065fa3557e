"""``InputGeometry``: the one map between model-input and source pixels (crop, mirroring, window, resize).

Checked against the pixels the data path really produces: a source whose values encode their own position
goes through ``load_source`` + ``window_sample``, and every input pixel must come from the source position
``to_source`` names (no resize), or match the ramp there (resize).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from mammogmic.data.preprocessing import model_input
from mammogmic.data.sample import (
    ImageItem,
    InputContract,
    InputGeometry,
    input_geometry,
    load_source,
    place_window,
    window_samples,
)

CONTRACT = InputContract(input_shape=(128, 96), crop_iterations=2, crop_buffer=3)


def _source_png(path: Path, side: str, shape: tuple[int, int] = (200, 150)) -> np.ndarray:
    """A breast (half ellipse on the chest-wall side) whose pixel values encode their position."""
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w]
    dist = cols if side == "L" else (w - 1 - cols)
    inside = ((rows - h / 2) / (0.45 * h)) ** 2 + (dist / (0.8 * w)) ** 2 <= 1
    values = np.where(inside, 1000 + rows * w + cols, 0).astype(np.uint16)
    Image.fromarray(values).save(path)
    return values


def _pixels(source, contract, window) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The un-standardised input the data path cuts for ``window`` (same call as ``window_sample``)."""
    return model_input(
        source.cropped,
        source.view,
        source.center,
        out_shape=contract.input_shape,
        horizontal_flip=source.horizontal_flip,
        window=window,
        standardize_image=False,
    )


@pytest.mark.parametrize(
    ("view", "flip"), [("L-CC", "NO"), ("R-CC", "NO"), ("L-MLO", "NO"), ("R-MLO", "NO"), ("L-CC", "YES")]
)
def test_input_pixels_come_from_where_to_source_says(tmp_path: Path, view: str, flip: str) -> None:
    side = view[0] if flip == "NO" else ("R" if view[0] == "L" else "L")
    raw = _source_png(tmp_path / "img.png", side).astype(np.float64)
    item = ImageItem("img", tmp_path / "img.png", view=view, horizontal_flip=flip)
    source = load_source(item, CONTRACT)
    geometry = input_geometry(source, CONTRACT)
    assert geometry is not None and geometry.mirrored == (side == "R")
    assert geometry.crop_box[1] - geometry.crop_box[0] == source.cropped.shape[0]
    x = _pixels(source, CONTRACT, place_window(source, CONTRACT))
    rows, cols = np.mgrid[0 : x.shape[0], 0 : x.shape[1]]
    centres = np.stack([rows + 0.5, cols + 0.5], axis=-1)
    src = np.floor(geometry.to_source(centres)).astype(int)
    inside = (
        (src[..., 0] >= 0) & (src[..., 0] < raw.shape[0]) & (src[..., 1] >= 0) & (src[..., 1] < raw.shape[1])
    )
    in_crop = (
        (src[..., 0] >= geometry.crop_box[0])
        & (src[..., 0] < geometry.crop_box[1])
        & (src[..., 1] >= geometry.crop_box[2])
        & (src[..., 1] < geometry.crop_box[3])
    )
    expected = np.zeros_like(x, dtype=np.float64)  # padding outside the crop is zero
    expected[inside & in_crop] = raw[src[..., 0][inside & in_crop], src[..., 1][inside & in_crop]]
    np.testing.assert_array_equal(x, expected)
    assert (x > 0).sum() > 0.3 * x.size  # the test looked at breast pixels, not only padding


def test_resized_window_maps_back_onto_the_ramp(tmp_path: Path) -> None:
    """Window 2x the input: input pixel centres land where the (linear) source ramp has the input's value."""
    contract = InputContract(input_shape=(64, 48), window_shape=(128, 96), crop_iterations=2, crop_buffer=3)
    raw = _source_png(tmp_path / "img.png", "R").astype(np.float64)
    source = load_source(ImageItem("img", tmp_path / "img.png", view="R-MLO"), contract)
    geometry = input_geometry(source, contract)
    assert geometry is not None and geometry.scale == (2.0, 2.0)
    x = _pixels(source, contract, place_window(source, contract))
    rows, cols = np.mgrid[0:64, 0:48]
    pos = geometry.to_source(np.stack([rows + 0.5, cols + 0.5], axis=-1))
    # Value of the ramp 1000 + row * w + col at the (continuous) position of each pixel centre.
    ramp = 1000 + (pos[..., 0] - 0.5) * raw.shape[1] + (pos[..., 1] - 0.5)
    r, c = np.floor(pos[..., 0]).astype(int), np.floor(pos[..., 1]).astype(int)
    # Cubic interpolation reproduces a ramp where its 4x4 neighbours are tissue and inside the window (the
    # resize replicates the window's border).
    top, bottom, left, right = geometry.box_to_source((0, 0), contract.input_shape)
    interior = (r >= top + 3) & (r < bottom - 3) & (c >= left + 3) & (c < right - 3)
    for dr in range(-3, 4):
        for dc in range(-3, 4):
            rr, cc = np.clip(r + dr, 0, raw.shape[0] - 1), np.clip(c + dc, 0, raw.shape[1] - 1)
            interior &= raw[rr, cc] > 0
    assert interior.sum() > 200
    np.testing.assert_allclose(x[interior], ramp[interior], rtol=0, atol=0.05)


@pytest.mark.parametrize("mirrored", [False, True])
def test_round_trip(mirrored: bool) -> None:
    geometry = InputGeometry(
        crop_box=(17, 317, 5, 205),
        mirrored=mirrored,
        pad_top=12,
        window=(3, 253, 0, 190),
        input_shape=(100, 76),
    )
    rng = np.random.default_rng(0)
    points = rng.uniform([-10, -10], [110, 86], size=(500, 2))
    np.testing.assert_allclose(geometry.to_input(geometry.to_source(points)), points, atol=1e-9)
    src = rng.uniform([0, 0], [400, 300], size=(500, 2))
    np.testing.assert_allclose(geometry.to_source(geometry.to_input(src)), src, atol=1e-9)
    # Corners of the input land on the window's corners in the source (mirroring swaps left and right).
    top, bottom, left, right = geometry.box_to_source((0, 0), (100, 76))
    assert (top, bottom) == (17 + 3 - 12, 17 + 253 - 12)
    crop_w = 200
    expected_lr = (5 + crop_w - 190, 5 + crop_w - 0) if mirrored else (5 + 0, 5 + 190)
    assert (left, right) == pytest.approx(expected_lr)


def test_tta_geometry_is_that_of_the_first_window(tmp_path: Path) -> None:
    """With TTA the explanations come from the first noisy window: the geometry must be that window's."""
    _source_png(tmp_path / "img.png", "L")
    item = ImageItem("img", tmp_path / "img.png", view="L-CC")
    contract = InputContract(
        input_shape=(128, 96),
        crop_iterations=2,
        crop_buffer=3,
        max_crop_noise=(10, 10),
        max_crop_size_noise=5,
    )
    source = load_source(item, contract)
    first = window_samples(source, contract, 3, 7, "img")[0][0, 0]  # first window, image channel
    geometry = input_geometry(source, contract, 3, 7, "img")
    deterministic = input_geometry(source, contract)
    assert geometry is not None and deterministic is not None and geometry != deterministic
    window = place_window(source, contract)
    rebuilt = _pixels(source, contract, window)
    assert not np.allclose((rebuilt - rebuilt.mean()) / rebuilt.std(), first, atol=1e-3)
    # The geometry's window rebuilds exactly the first TTA input.
    from mammogmic.data.preprocessing import Window

    w = Window(pad_top=geometry.pad_top, padded_shape=(0, 0), borders=geometry.window)
    x = _pixels(source, contract, w)
    standardised = (x - x.mean(dtype=np.float32)) / x.std(dtype=np.float32)
    np.testing.assert_allclose(standardised, first, atol=1e-5)


def test_maps_to_source_matches_upsampling_on_the_input(tmp_path: Path) -> None:
    """A map resampled to the source equals the map upsampled to the input (``cv2.resize``, bilinear) read at
    the input pixel each source pixel fell into; zero where the model saw no source pixel."""
    _source_png(tmp_path / "img.png", "R")
    source = load_source(ImageItem("img", tmp_path / "img.png", view="R-CC"), CONTRACT)
    geometry = input_geometry(source, CONTRACT)
    assert geometry is not None
    maps = np.random.default_rng(1).uniform(0, 1, size=(2, 4, 3)).astype(np.float32)
    out = geometry.maps_to_source(maps, (200, 150))
    assert out.shape == (2, 200, 150)
    upsampled = np.stack([cv2.resize(m, (96, 128), interpolation=cv2.INTER_LINEAR) for m in maps])
    rows, cols = np.mgrid[0:200, 0:150]
    pos = geometry.to_input(np.stack([rows + 0.5, cols + 0.5], axis=-1))
    r, c = np.floor(pos[..., 0]).astype(int), np.floor(pos[..., 1]).astype(int)
    top, bottom, left, right = geometry.crop_box
    seen = (r >= 0) & (r < 128) & (c >= 0) & (c < 96)
    seen &= (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    assert seen.sum() > 1000 and (~seen).sum() > 0
    for k in range(2):
        np.testing.assert_allclose(out[k][seen], upsampled[k][r[seen], c[seen]], atol=1e-5)
        assert (out[k][~seen] == 0).all()


def test_preprocess_cache_rows_keep_their_geometry(tmp_path: Path) -> None:
    """A manifest row with a preprocess cache (cropped .npy + best_center + window_location) places its input
    exactly where the raw file's does; a window_location that does not match the cache leaves it unknown."""
    _source_png(tmp_path / "img.png", "R")
    raw_item = ImageItem("img", tmp_path / "img.png", view="R-MLO")
    raw = load_source(raw_item, CONTRACT)
    np.save(tmp_path / "img.npy", raw.cropped)
    cached_item = ImageItem(
        "img",
        tmp_path / "img.png",
        view="R-MLO",
        cached_path=tmp_path / "img.npy",
        best_center=raw.center,
        window_location=raw.crop_box,
    )
    assert input_geometry(load_source(cached_item, CONTRACT), CONTRACT) == input_geometry(raw, CONTRACT)
    assert raw.crop_box is not None
    top, bottom, left, right = raw.crop_box
    cached_item.window_location = (top, bottom + 1, left, right)  # an edited cache: the crop no longer fits
    assert input_geometry(load_source(cached_item, CONTRACT), CONTRACT) is None
