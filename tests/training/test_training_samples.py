"""A right view whose manifest row has ``window_location`` but no ``cached_path`` gets the on-the-fly input.

The old code cropped such a row's raw mask *after* mirroring the image with the raw-image ``window_location``, so
the mask of a right view landed on the wrong side. Now ``window_location`` describes a preprocess cache and is
read only with one (``cached_path`` + ``best_center``); without it the image is cropped on the fly and the raw
mask is cropped with that crop's box in raw coordinates, before the image and mask are mirrored together.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from training_helpers import tiny_config

from mammogmic.data.cache import PreprocessSettings, preprocess_manifest
from mammogmic.data.manifest import load_manifest
from mammogmic.data.preprocessing import crop_breast
from mammogmic.training.data import SeededSamples, split_dataset

ITERATIONS, BUFFER = 3, 5


def _right_view(folder: Path) -> tuple[Path, Path, tuple[int, int, int, int]]:
    """A raw right CC view (chest wall on the right, breast off-centre), a lesion near the nipple, its mask."""
    rows, cols = np.mgrid[0:200, 0:150]
    inside = ((rows - 95) / 80) ** 2 + ((cols - 149) / 110) ** 2 <= 1.0
    image = np.where(inside, 1500 + (rows * 3) % 400, 0).astype(np.uint16)
    mask = np.zeros(image.shape, np.uint8)
    mask[80:96, 50:66] = 255  # well inside the breast, far from the chest wall
    image[mask > 0] = 4000
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "r_cc.png")
    Image.fromarray(mask).save(folder / "r_cc_mask.png")
    box = crop_breast(image, "R-CC", iterations=ITERATIONS, buffer_size=BUFFER).window_location
    assert box[2] > 0 and box[3] == 150  # the crop is not the whole image: its offset matters
    return folder / "r_cc.png", folder / "r_cc_mask.png", box


def _manifest(path: Path, image: Path, mask: Path, window: Any) -> Path:
    row = {
        "image_id": "r_cc",
        "image_path": str(image),
        "patient_id": "p",
        "exam_id": "e",
        "laterality": "R",
        "view": "CC",
        "benign_label": 0,
        "malignant_label": 1,
        "malignant_mask_path": str(mask),
        "split": "train",
    }
    if window is not None:
        row["window_location"] = json.dumps(list(window))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    return path


def _sample(manifest: Path) -> dict[str, Any]:
    cfg = tiny_config(
        **{
            "data.manifest": str(manifest),
            "data.crop_iterations": ITERATIONS,
            "data.crop_buffer": BUFFER,
            "data.window_shape": [160, 120],
        }
    )
    return SeededSamples(split_dataset(cfg, "train", masks=True), augment=False)[0]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_right_view_with_window_location_and_no_cache_equals_on_the_fly_crop(tmp_path: Path) -> None:
    image, mask, box = _right_view(tmp_path / "raw")
    plain = _sample(_manifest(tmp_path / "raw" / "plain.csv", image, mask, None))
    with_box = _sample(_manifest(tmp_path / "raw" / "with_box.csv", image, mask, box))
    np.testing.assert_array_equal(with_box["image"].numpy(), plain["image"].numpy())
    np.testing.assert_array_equal(with_box["masks"].numpy(), plain["masks"].numpy())

    # A stale or wrong window_location without a cache is not read at all.
    top, bottom, left, right = box
    shifted = _sample(
        _manifest(tmp_path / "raw" / "shifted.csv", image, mask, (top, bottom, left - 20, right - 20))
    )
    np.testing.assert_array_equal(shifted["masks"].numpy(), plain["masks"].numpy())

    # The mask sits on the lesion in the model input (mirrored with the image), not beside it.
    x, malignant = plain["image"][0].numpy(), plain["masks"][1].numpy().astype(bool)
    bright = x > (x.max() + np.median(x)) / 2  # the lesion is the brightest region
    assert _iou(malignant, bright) > 0.8
    assert _iou(malignant[:, ::-1], bright) == 0.0  # control: a mask left unmirrored misses it

    # And the preprocess cache of the same row (crop and mask cut in raw coordinates) gives the same input.
    settings = PreprocessSettings(iterations=ITERATIONS, buffer_size=BUFFER, window_shape=(160, 120))
    preprocess_manifest(load_manifest(tmp_path / "raw" / "plain.csv"), tmp_path / "cache", settings=settings)
    cached_manifest = tmp_path / "cache" / "manifest.csv"
    assert load_manifest(cached_manifest).rows[0].window_location == list(box)
    cached = _sample(cached_manifest)
    np.testing.assert_array_equal(cached["image"].numpy(), plain["image"].numpy())
    np.testing.assert_array_equal(cached["masks"].numpy(), plain["masks"].numpy())
