"""What the training loop feeds the model: the manifest's splits through the one sample path.

Training, validation and test samples (:func:`split_dataset`: images for GMIC, four-view exams for DMV-CNN,
patches for its patch classifier) are built under the run's :class:`~mammogmic.data.sample.InputContract`
(built from ``TrainConfig.data`` by :func:`input_contract`), the same contract the trainer stores in the
exported model so that ``mammogmic predict`` rebuilds exactly these inputs.

:class:`SeededSamples` wraps a dataset as a :class:`torch.utils.data.Dataset` indexed by the ``(index, epoch)``
pairs of :class:`~mammogmic.training.sampler.EpochSampler`; each augmented sample's RNG is
``default_rng([seed, epoch, index])``, so a sample does not depend on which worker loads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mammogmic.data.dataset import MammogramDataset
from mammogmic.data.dmv import ExamDataset, PatchDataset
from mammogmic.data.sample import InputContract
from mammogmic.errors import MammogmicError
from mammogmic.training.config import TrainConfig

__all__ = ["SeededSamples", "input_contract", "split_dataset"]


def input_contract(config: TrainConfig) -> InputContract:
    """The input contract of a run: how its files become model inputs (stored in its model files).

    GMIC and DMV-CNN models with 3 input channels take the heat maps (``heatmaps``); the patch classifier's
    3 channels are its patch repeated, as released.
    """
    d = config.data
    heatmaps = config.model_type in ("gmic", "dmv") and config.model.in_channels == 3
    return InputContract(
        input_shape=tuple(d.out_shape),  # type: ignore[arg-type]
        window_shape=tuple(d.window_shape) if d.window_shape else None,  # type: ignore[arg-type]
        crop_iterations=d.crop_iterations,
        crop_buffer=d.crop_buffer,
        max_crop_noise=tuple(d.max_crop_noise),  # type: ignore[arg-type]
        max_crop_size_noise=d.max_crop_size_noise,
        tta=d.tta,
        heatmaps=heatmaps,
    )


def split_dataset(config: TrainConfig, split: str, *, masks: bool = False) -> Any:
    """The rows of one manifest split as a dataset under the run's contract: images
    (:class:`~mammogmic.data.dataset.MammogramDataset`) for GMIC, four-view exams
    (:class:`~mammogmic.data.dmv.ExamDataset`) for DMV-CNN, patches (:class:`~mammogmic.data.dmv.PatchDataset`)
    for the patch classifier.

    Raises:
        MammogmicError: no manifest configured.
    """
    d = config.data
    if not d.manifest:
        raise MammogmicError(
            "data.manifest: no manifest given (set it in the YAML or with --set data.manifest=...)"
        )
    if config.model_type == "dmv":
        return ExamDataset(
            d.manifest, split=split, contract=input_contract(config), heatmaps_dir=d.heatmaps_dir or None
        )
    if config.model_type == "patch":
        p = config.patches
        return PatchDataset(
            d.manifest,
            split=split,
            contract=input_contract(config),
            size=p.size,
            per_class=p.per_class,
            seed=config.runtime.seed,
        )
    return MammogramDataset(
        d.manifest,
        split=split,
        mode="eval",
        contract=input_contract(config),
        label_level=d.label_level,
        masks=masks,
        hflip_prob=d.hflip_prob,  # flips apply to augmented (training) samples only
        vflip_prob=d.vflip_prob,
        keep_in_memory=d.keep_in_memory,
        seed=config.runtime.seed,
        heatmaps_dir=d.heatmaps_dir or None,
    )


class SeededSamples(torch.utils.data.Dataset[dict[str, Any]]):
    """Dataset over ``(index, epoch)`` pairs; augmentation RNG = ``default_rng([seed, epoch, index])``.

    Args:
        images: the source (:class:`MammogramDataset` or anything with ``load(index, rng)`` and ``__len__``).
        augment: jitter windows (training) or not (plain evaluation).
        seed: base seed.
    """

    def __init__(self, images: Any, *, augment: bool, seed: int = 0) -> None:
        self.images = images
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | Sequence[int]) -> dict[str, Any]:
        if isinstance(key, int):
            index, epoch = key, 0
        else:
            index, epoch = int(key[0]), int(key[1])
        rng = np.random.default_rng([self.seed, epoch, index]) if self.augment else None
        return dict(self.images.load(index, rng))


class TTASamples(torch.utils.data.Dataset[dict[str, Any]]):
    """The TTA windows of every image, exactly those ``mammogmic predict --tta N --seed S`` averages."""

    def __init__(self, images: MammogramDataset, tta: int, seed: int) -> None:
        self.images = images
        self.tta = tta
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.images.windows(index, self.tta, self.seed)
