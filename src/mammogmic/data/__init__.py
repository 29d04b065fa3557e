"""Data: reading mammograms, the official GMIC preprocessing, manifests, datasets.

Public names::

    read_image(path) -> (uint16 array, ImageMeta)
    crop_breast(image, view, horizontal_flip="NO") -> CropInfo
    best_center(cropped, view, rightmost_points, bottommost_points) -> (row, col)
    model_input(cropped, view, best_center, rng=None, noise=None, out_shape=(2944, 1920)) -> float32 array

Also available (imported on first use, so that importing this package does not load torch):
``Manifest``, ``ManifestRow``, ``load_manifest``, ``save_manifest`` (:mod:`mammogmic.data.manifest`),
``MammogramDataset``, ``seed_worker`` (:mod:`mammogmic.data.dataset`), ``preprocess_manifest``
(:mod:`mammogmic.data.cache`) and ``prepare`` (:mod:`mammogmic.data.adapters`).
"""

from __future__ import annotations

import importlib
from typing import Any

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

_LAZY = {
    "Manifest": "mammogmic.data.manifest",
    "ManifestRow": "mammogmic.data.manifest",
    "load_manifest": "mammogmic.data.manifest",
    "save_manifest": "mammogmic.data.manifest",
    "MammogramDataset": "mammogmic.data.dataset",
    "seed_worker": "mammogmic.data.dataset",
    "preprocess_manifest": "mammogmic.data.cache",
    "prepare": "mammogmic.data.adapters",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mammogmic.data' has no attribute {name!r}")


__all__ = [
    *_LAZY,
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
