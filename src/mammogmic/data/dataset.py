"""A torch ``Dataset`` of model inputs over a (preprocessed) manifest.

Usage::

    from mammogmic.data.dataset import MammogramDataset, seed_worker

    train = MammogramDataset("prep/manifest.csv", split="train", mode="train", seed=0)
    loader = DataLoader(train, batch_size=4, shuffle=True, num_workers=8, worker_init_fn=seed_worker)
    for epoch in range(epochs):
        train.set_epoch(epoch)          # new random windows every epoch, reproducible from (seed, epoch, index)
        for batch in loader:
            batch["image"]   # (N, 1, H, W) float32, standardised per image
            batch["labels"]  # (N, 2) float32 [benign, malignant], NaN = unknown
            batch["masks"]   # (N, 2, H, W) uint8 [benign, malignant] (only with masks=True)
            batch["image_id"], batch["index"]

Modes:

* ``"train"``: random window per call (official crop-position and crop-size noise, ``TRAIN_NOISE``
  scaled to the window size),
  optional vertical flips (the only flip that keeps the "faces right" convention). The random generator
  is ``numpy.random.default_rng([seed, epoch, index])``, so a sample does not depend on which worker
  loads it; with ``seed=None`` each worker uses its own generator seeded by :func:`seed_worker`.
* ``"eval"``: the deterministic official window (no noise); reproduces the official model input.
* ``"tta"``: ``tta`` noisy windows per image (the paper's 10-crop test-time augmentation), stacked as
  ``image`` ``(T, 1, H, W)``; fixed per (seed, index).

Rows with ``cached_path`` + ``best_center`` (written by ``mammogmic preprocess``) load the memory-mapped
crop; other rows are read and preprocessed on the fly (slow: run ``mammogmic preprocess`` for training).

``out_shape`` is the model-input size; ``window_shape`` (default ``out_shape``) is the window size in
source pixels. For full-size mammograms and a reduced model input, pass ``window_shape=(2944, 1920)``.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mammogmic.data.io import read_image, read_mask
from mammogmic.data.manifest import Manifest, ManifestRow, load_manifest
from mammogmic.data.preprocessing import (
    MODEL_INPUT_SHAPE,
    CropNoise,
    best_center,
    crop_breast,
    model_input,
    scaled_train_noise,
)
from mammogmic.errors import PreprocessingError

logger = logging.getLogger(__name__)

__all__ = ["MammogramDataset", "seed_worker"]

_MODES = ("train", "eval", "tta")


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=seed_worker)``: seed numpy, ``random`` and the dataset's worker RNG.

    Also limits OpenCV to one thread per worker (many workers x many OpenCV threads oversubscribe the CPU).
    Uses ``torch.initial_seed()`` of the worker, which the DataLoader derives from its own generator, so
    runs are reproducible given ``torch.manual_seed`` or ``DataLoader(generator=...)``.
    """
    import cv2

    cv2.setNumThreads(1)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002 - seeds third-party code that uses the legacy global RNG
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, MammogramDataset):
        info.dataset._worker_rng = np.random.default_rng(seed)


class MammogramDataset(Dataset[dict[str, Any]]):
    """Model inputs, labels and masks for the rows of a manifest (see the module docstring).

    Args:
        manifest: A :class:`~mammogmic.data.manifest.Manifest` or a manifest CSV path.
        split: Keep only rows of this split (``None``: all rows).
        mode: ``"train"``, ``"eval"`` or ``"tta"``.
        out_shape: Model-input ``(height, width)``.
        window_shape: Window in source pixels (default ``out_shape``).
        noise: Window noise for ``train``/``tta`` (default the official ``TRAIN_NOISE``, 100 pixels, scaled
            to ``window_shape`` when that is not 2944x1920).
        tta: Windows per image in ``tta`` mode.
        label_level: ``"image"`` (default) or ``"breast"`` labels.
        masks: Also return ``masks`` ``(2, H, W)`` uint8 (zeros where a class has no mask).
        vflip_prob: Probability of a vertical flip in ``train`` mode (default 0: the official recipe).
        seed: Base seed (``None``: per-worker generators, see :func:`seed_worker`).
        crop_iterations: Erosion iterations for rows preprocessed on the fly.
        crop_buffer_size: Crop buffer for rows preprocessed on the fly.
    """

    def __init__(
        self,
        manifest: Manifest | str | os.PathLike[str],
        *,
        split: str | None = None,
        mode: str = "train",
        out_shape: tuple[int, int] = MODEL_INPUT_SHAPE,
        window_shape: tuple[int, int] | None = None,
        noise: CropNoise | None = None,
        tta: int = 10,
        label_level: str = "image",
        masks: bool = False,
        vflip_prob: float = 0.0,
        seed: int | None = 0,
        crop_iterations: int = 100,
        crop_buffer_size: int = 50,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
        if label_level not in ("image", "breast"):
            raise ValueError(f"label_level must be 'image' or 'breast', got {label_level!r}")
        if not 0.0 <= vflip_prob <= 1.0:
            raise ValueError(f"vflip_prob must be in [0, 1], got {vflip_prob}")
        if tta < 1:
            raise ValueError(f"tta must be at least 1, got {tta}")
        table = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        if split is not None:
            table = table.filter(split=split)
        self.manifest = table
        self.rows: list[ManifestRow] = table.rows
        self.mode = mode
        self.out_shape = (int(out_shape[0]), int(out_shape[1]))
        self.window_shape = tuple(int(v) for v in (window_shape or out_shape))
        self.noise = noise if noise is not None else scaled_train_noise(self.window_shape)
        self.tta = int(tta)
        self.label_level = label_level
        self.with_masks = masks
        self.vflip_prob = float(vflip_prob)
        self.seed = seed
        self.crop_iterations = crop_iterations
        self.crop_buffer_size = crop_buffer_size
        self.epoch = 0
        self._worker_rng: np.random.Generator | None = None
        self.labels = np.array(
            [[np.nan if v is None else float(v) for v in row.labels(label_level)] for row in self.rows],
            dtype=np.float32,
        ).reshape(-1, 2)
        self.image_ids = [row.image_id for row in self.rows]
        uncached = sum(not row.preprocessed for row in self.rows)
        if uncached:
            logger.warning(
                "%d of %d rows are not preprocessed; they are cropped on the fly (run `mammogmic preprocess`)",
                uncached,
                len(self.rows),
            )

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random windows ``train`` mode draws (call before each epoch)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        if self.mode == "tta":
            return np.random.default_rng([self.seed or 0, 1, index])
        if self.seed is None:
            if self._worker_rng is None:
                self._worker_rng = np.random.default_rng()
            return self._worker_rng
        return np.random.default_rng([self.seed, 0, self.epoch, index])

    def _load(self, row: ManifestRow) -> tuple[np.ndarray, Sequence[int], str, list[np.ndarray | None]]:
        """Cropped raw-orientation pixels, best centre, horizontal_flip, cropped masks (or None)."""
        masks: list[np.ndarray | None] = [None, None]
        if row.preprocessed:
            path = self.manifest.resolve(row.cached_path)
            assert path is not None and row.best_center is not None
            cropped = np.load(path, mmap_mode="r")
            if self.with_masks:
                for k, label in enumerate(("benign", "malignant")):
                    mask_path = self.manifest.resolve(row.extra.get(f"cached_{label}_mask_path"))
                    if mask_path is not None:
                        masks[k] = np.load(mask_path, mmap_mode="r")
            return cropped, row.best_center, row.horizontal_flip, masks
        source = self.manifest.resolve(row.image_path)
        assert source is not None
        image, _ = read_image(source)
        info = crop_breast(
            image,
            row.full_view,
            row.horizontal_flip,
            iterations=self.crop_iterations,
            buffer_size=self.crop_buffer_size,
        )
        centre = best_center(info, window_shape=self.window_shape)  # type: ignore[arg-type]
        if self.with_masks:
            top, bottom, left, right = info.window_location
            for k, mask_value in enumerate((row.benign_mask_path, row.malignant_mask_path)):
                mask_path = self.manifest.resolve(mask_value)
                if mask_path is not None:
                    masks[k] = read_mask(mask_path, image.shape)[top:bottom, left:right]
        return info.cropped, centre, row.horizontal_flip, masks

    def _window(
        self,
        cropped: np.ndarray,
        row: ManifestRow,
        centre: Sequence[int],
        flip: str,
        masks: list[np.ndarray | None],
        rng: np.random.Generator | None,
        noise: CropNoise | None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        present = [m for m in masks if m is not None]
        kwargs: dict[str, Any] = {
            "rng": rng,
            "noise": noise,
            "out_shape": self.out_shape,
            "horizontal_flip": flip,
            "window_shape": self.window_shape,
            "exact": self.mode == "eval",
        }
        if not (self.with_masks and present):
            image = model_input(cropped, row.full_view, centre, **kwargs)
            mask_out = np.zeros((2, *self.out_shape), np.uint8) if self.with_masks else None
        else:
            full = [m if m is not None else np.zeros(cropped.shape, np.uint8) for m in masks]
            image, mask_out = model_input(cropped, row.full_view, centre, masks=full, **kwargs)
        if (
            self.mode == "train"
            and self.vflip_prob > 0
            and rng is not None
            and rng.random() < self.vflip_prob
        ):
            image = np.ascontiguousarray(image[::-1])
            if mask_out is not None:
                mask_out = np.ascontiguousarray(mask_out[:, ::-1])
        return image, mask_out

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        try:
            cropped, centre, flip, masks = self._load(row)
        except PreprocessingError as exc:
            raise PreprocessingError(f"{row.image_id} ({row.image_path}): {exc}") from exc
        sample: dict[str, Any] = {
            "labels": torch.from_numpy(self.labels[index].copy()),
            "image_id": row.image_id,
            "index": index,
        }
        if self.mode == "tta":
            tta_rng = self._rng(index)
            pairs = [
                self._window(cropped, row, centre, flip, masks, tta_rng, self.noise) for _ in range(self.tta)
            ]
            sample["image"] = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None])
            if self.with_masks:
                sample["masks"] = torch.from_numpy(np.stack([p[1] for p in pairs]))  # type: ignore[misc]
            return sample
        rng: np.random.Generator | None = self._rng(index) if self.mode == "train" else None
        noise = self.noise if self.mode == "train" else None
        image, mask_out = self._window(cropped, row, centre, flip, masks, rng, noise)
        sample["image"] = torch.from_numpy(image[None])
        if mask_out is not None:
            sample["masks"] = torch.from_numpy(mask_out)
        return sample
