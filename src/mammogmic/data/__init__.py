"""Data: reading mammograms, the official GMIC preprocessing, manifests, datasets.

Public names::

    read_image(path) -> (uint16 array, ImageMeta)
    crop_breast(image, view, horizontal_flip="NO") -> CropInfo
    best_center(cropped, view, rightmost_points, bottommost_points) -> (row, col)
    model_input(cropped, view, best_center, rng=None, noise=None, out_shape=(2944, 1920)) -> float32 array

Heavier pieces (manifests, the torch Dataset) live in :mod:`mammogmic.data.manifest` and
:mod:`mammogmic.data.dataset` and are imported lazily so that importing this package stays light.
"""

from __future__ import annotations

from mammogmic.data.io import ImageMeta, read_image, read_mask
from mammogmic.data.preprocessing import (
    MODEL_INPUT_SHAPE,
    NO_NOISE,
    TRAIN_NOISE,
    VIEWS,
    CropInfo,
    CropNoise,
    best_center,
    cbis_ddsm_input,
    crop_breast,
    model_input,
    orient,
    parse_view,
)

__all__ = [
    "MODEL_INPUT_SHAPE",
    "NO_NOISE",
    "TRAIN_NOISE",
    "VIEWS",
    "CropInfo",
    "CropNoise",
    "ImageMeta",
    "best_center",
    "cbis_ddsm_input",
    "crop_breast",
    "model_input",
    "orient",
    "parse_view",
    "read_image",
    "read_mask",
]
