"""A torch ``Dataset`` of model inputs over a manifest, built by the one sample path (:mod:`mammogmic.data.sample`).

Usage::

    from mammogmic.data.dataset import MammogramDataset, seed_worker

    train = MammogramDataset("prep/manifest.csv", split="train", mode="train", seed=0)
    loader = DataLoader(train, batch_size=4, shuffle=True, num_workers=8, worker_init_fn=seed_worker)
    for epoch in range(epochs):
        train.set_epoch(epoch)          # new random windows every epoch, reproducible from (seed, epoch, index)
        for batch in loader:
            batch["image"]   # (N, C, H, W) float32: the image standardised per image (C = 1), then the
                             # benign and malignant heat maps when the contract takes them (C = 3)
            batch["labels"]  # (N, 2) float32 [benign, malignant], NaN = unknown
            batch["masks"]   # (N, 2, H, W) uint8 [benign, malignant] (only with masks=True)
            batch["image_id"], batch["index"]

Modes:

* ``"train"``: random window per call (the contract's crop-position and crop-size noise), optional vertical
  flips (the only flip that keeps the "faces right" convention). The generator is
  ``numpy.random.default_rng([seed, 0, epoch, index])``, so a sample does not depend on which worker loads it;
  with ``seed=None`` each worker uses its own generator seeded by :func:`seed_worker`.
* ``"eval"``: the deterministic official window (no noise): exactly ``mammogmic predict``'s model input.
* ``"tta"``: ``tta`` noisy windows per image stacked as ``image`` ``(T, C, H, W)``: exactly the windows
  ``mammogmic predict --tta T --seed S`` averages.

The trainer uses :meth:`MammogramDataset.load` (``rng`` given: augmented window; ``None``: deterministic).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mammogmic.data.manifest import Manifest, load_manifest
from mammogmic.data.preprocessing import CropNoise, scaled_train_noise
from mammogmic.data.sample import (
    ImageItem,
    InputContract,
    SampleError,
    attach_heatmaps,
    items_from_manifest,
    load_source,
    window_sample,
    window_samples,
)

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
        contract: How files become inputs (:class:`~mammogmic.data.sample.InputContract`); the keyword
            arguments below override single fields of it.
        out_shape: Model-input ``(height, width)``.
        window_shape: Window in source pixels (default ``out_shape``).
        noise: Window noise for ``train``/``tta`` (default the official 100 pixels scaled to the window).
        tta: Windows per image in ``tta`` mode (default 10).
        label_level: ``"image"`` (default) or ``"breast"`` labels.
        masks: Also return ``masks`` ``(2, H, W)`` uint8 (zeros where a class has no mask).
        vflip_prob: Probability of a vertical flip of an augmented sample (default 0: the official recipe).
        hflip_prob: Probability of a horizontal flip of an augmented sample (default 0: the official recipe
            shows every breast facing the same way; a mirrored sample puts the chest wall on the other side).
        seed: Base seed (``None``: per-worker generators, see :func:`seed_worker`).
        keep_in_memory: Keep every image's read, cropped and centred source in memory after its first use, so
            later epochs only cut windows (a small dataset's training is then no longer bound by PNG decoding
            and cropping). Memory grows with the dataset: about 2 bytes per cropped pixel. Each DataLoader
            worker keeps its own copy, so it helps with ``num_workers=0`` or persistent workers.
        crop_iterations: Erosion iterations for rows cropped on the fly.
        crop_buffer_size: Crop buffer for rows cropped on the fly.
        heatmaps_dir: Folder of ``mammogmic heatmaps`` outputs for rows without a ``heatmap_path`` column
            (read when the contract takes heat-map channels).
    """

    def __init__(
        self,
        manifest: Manifest | str | os.PathLike[str],
        *,
        split: str | None = None,
        mode: str = "train",
        contract: InputContract | None = None,
        out_shape: tuple[int, int] | None = None,
        window_shape: tuple[int, int] | None = None,
        noise: CropNoise | None = None,
        tta: int = 10,
        label_level: str = "image",
        masks: bool = False,
        vflip_prob: float = 0.0,
        hflip_prob: float = 0.0,
        seed: int | None = 0,
        keep_in_memory: bool = False,
        crop_iterations: int | None = None,
        crop_buffer_size: int | None = None,
        heatmaps_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
        if label_level not in ("image", "breast"):
            raise ValueError(f"label_level must be 'image' or 'breast', got {label_level!r}")
        for name, prob in (("vflip_prob", vflip_prob), ("hflip_prob", hflip_prob)):
            if not 0.0 <= prob <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {prob}")
        if tta < 1:
            raise ValueError(f"tta must be at least 1, got {tta}")
        base = contract or InputContract()
        changes: dict[str, Any] = {}
        if out_shape is not None:
            changes["input_shape"] = tuple(out_shape)
        if window_shape is not None:
            changes["window_shape"] = tuple(window_shape)
        if crop_iterations is not None:
            changes["crop_iterations"] = crop_iterations
        if crop_buffer_size is not None:
            changes["crop_buffer"] = crop_buffer_size
        if contract is None or noise is not None or changes:
            # Without an explicit contract the noise follows the window (the official 100 px at 2944x1920).
            window = changes.get("window_shape") or changes.get("input_shape") or base.window
            chosen = noise or (base.noise if contract is not None else scaled_train_noise(window))
            changes["max_crop_noise"] = chosen.max_crop_noise
            changes["max_crop_size_noise"] = chosen.max_crop_size_noise
        self.contract = dataclasses.replace(base, **changes) if changes else base
        table = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        self.items: list[ImageItem] = items_from_manifest(table, split=split)
        attach_heatmaps(self.items, Path(heatmaps_dir) if heatmaps_dir else None)
        self.mode = mode
        self.tta = int(tta)
        self.label_level = label_level
        self.with_masks = masks
        self.vflip_prob = float(vflip_prob)
        self.hflip_prob = float(hflip_prob)
        self.seed = seed
        self.keep_in_memory = bool(keep_in_memory)
        self._sources: dict[int, Any] = {}
        self.epoch = 0
        self._worker_rng: np.random.Generator | None = None
        self.labels = np.array([item.labels(label_level) for item in self.items], dtype=np.float32).reshape(
            -1, 2
        )
        self.image_ids = [item.image_id for item in self.items]
        self.breast_ids = [item.breast_id or item.image_id for item in self.items]
        uncached = sum(item.cached_path is None for item in self.items)
        if uncached:
            logger.info(
                "%d of %d rows are not preprocessed; they are cropped on the fly", uncached, len(self)
            )

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.contract.input_shape

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random windows ``train`` mode draws (call before each epoch)."""
        self.epoch = int(epoch)

    def _train_rng(self, index: int) -> np.random.Generator:
        if self.seed is None:
            if self._worker_rng is None:
                self._worker_rng = np.random.default_rng()
            return self._worker_rng
        return np.random.default_rng([self.seed, 0, self.epoch, index])

    def _source(self, index: int) -> Any:
        source = self._sources.get(index)
        if source is not None:
            return source
        item = self.items[index]
        try:
            source = load_source(item, self.contract, masks=self.with_masks)
        except SampleError as exc:
            raise SampleError(f"{item.image_id}: {exc}", exc.stage) from exc
        if self.keep_in_memory:
            self._sources[index] = source
        return source

    def _masks(self, masks: np.ndarray | None, n: int | None = None) -> torch.Tensor:
        if masks is None:
            shape = (2, *self.out_shape) if n is None else (n, 2, *self.out_shape)
            return torch.zeros(shape, dtype=torch.uint8)
        return torch.from_numpy(masks)

    def load(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Sample ``index``: ``rng`` given → an augmented window (training), ``None`` → the deterministic one.

        Returns:
            ``image`` (C, H, W) float32, ``labels`` (2,), ``index``, ``image_id`` and, with masks, ``masks``.
        """
        image, masks = window_sample(self._source(index), self.contract, rng=rng)
        # image (C, H, W) and masks (2, H, W): every channel and mask mirrored together
        if rng is not None and self.vflip_prob > 0 and rng.random() < self.vflip_prob:
            image = np.ascontiguousarray(image[..., ::-1, :])
            masks = None if masks is None else np.ascontiguousarray(masks[..., ::-1, :])
        if rng is not None and self.hflip_prob > 0 and rng.random() < self.hflip_prob:
            image = np.ascontiguousarray(image[..., ::-1])
            masks = None if masks is None else np.ascontiguousarray(masks[..., ::-1])
        sample: dict[str, Any] = {
            "image": torch.from_numpy(image),
            "labels": torch.from_numpy(self.labels[index].copy()),
            "index": index,
            "image_id": self.items[index].image_id,
        }
        if self.with_masks:
            sample["masks"] = self._masks(masks)
        return sample

    def windows(self, index: int, tta: int, seed: int) -> dict[str, Any]:
        """The ``tta`` windows ``mammogmic predict --tta`` averages for this image (``image`` (T, C, H, W))."""
        item = self.items[index]
        images, masks = window_samples(self._source(index), self.contract, tta, seed, item.image_id)
        sample: dict[str, Any] = {
            "image": torch.from_numpy(images),
            "labels": torch.from_numpy(self.labels[index].copy()),
            "index": index,
            "image_id": item.image_id,
        }
        if self.with_masks:
            sample["masks"] = self._masks(masks)
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.mode == "tta":
            return self.windows(index, self.tta, self.seed or 0)
        return self.load(index, self._train_rng(index) if self.mode == "train" else None)
