"""Localization quality: Dice between GMIC saliency maps and lesion segmentations.

As in the paper, the low-resolution saliency map (stride 64, e.g. 46×30 for a 2944×1920 input) is
upsampled to the mask's resolution by nearest neighbour before comparison. Two variants are reported
per class (0 = benign, 1 = malignant):

* soft Dice ``2·Σ(s·m) / (Σs + Σm)`` with the saliency values ``s ∈ [0, 1]`` as they are;
* hard Dice at a threshold: ``s ≥ threshold`` is binarised first.

Dice is undefined when both the map and the mask are empty; such entries are NaN and left out of the
means. Images whose mask for a class is empty are also left out of that class's mean by default,
because Dice there only measures false positives (set ``skip_empty_masks=False`` to keep them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["DiceResult", "dice_scores", "upsample_nearest"]


def _to_numpy(x: Any) -> NDArray[Any]:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def upsample_nearest(maps: Any, size: Sequence[int]) -> NDArray[np.float32]:
    """Nearest-neighbour upsampling of ``(..., h, w)`` maps to ``(..., H, W)``.

    Output pixel ``(i, j)`` takes input pixel ``(⌊i·h/H⌋, ⌊j·w/W⌋)``, so an integer factor repeats
    each cell exactly (e.g. 64×64 blocks for GMIC's stride).
    """
    arr = _to_numpy(maps).astype(np.float32, copy=False)
    height, width = int(size[0]), int(size[1])
    h, w = arr.shape[-2:]
    rows = (np.arange(height) * h) // height
    cols = (np.arange(width) * w) // width
    return arr[..., rows[:, None], cols[None, :]]


@dataclass(frozen=True)
class DiceResult:
    """Dice per image and class, and their means.

    Attributes:
        soft: ``(N, C)`` soft Dice per image and class (NaN where undefined or skipped).
        hard: ``(N, C)`` Dice of the thresholded map.
        mean_soft: ``(C,)`` mean over images with a defined value.
        mean_hard: ``(C,)`` same for the thresholded map.
        threshold: threshold used for ``hard``.
    """

    soft: NDArray[np.float64]
    hard: NDArray[np.float64]
    mean_soft: NDArray[np.float64]
    mean_hard: NDArray[np.float64]
    threshold: float

    def to_dict(self, class_names: Sequence[str] = ("benign", "malignant")) -> dict[str, Any]:
        """JSON-ready summary keyed by class name (NaN → None)."""

        def clean(v: float) -> float | None:
            return float(v) if np.isfinite(v) else None

        out: dict[str, Any] = {"threshold": self.threshold}
        for c, name in enumerate(class_names[: self.soft.shape[1]]):
            out[name] = {
                "soft_dice": clean(self.mean_soft[c]),
                "dice": clean(self.mean_hard[c]),
                "n_images": int(np.isfinite(self.soft[:, c]).sum()),
                "per_image_soft_dice": [clean(v) for v in self.soft[:, c]],
                "per_image_dice": [clean(v) for v in self.hard[:, c]],
            }
        return out


def _dice(pred: NDArray[np.float32], target: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Dice over the last two axes; NaN where both are empty."""
    inter = np.einsum("...hw,...hw->...", pred, target.astype(np.float32), dtype=np.float64)
    total = pred.sum(axis=(-2, -1), dtype=np.float64) + target.sum(axis=(-2, -1), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * inter / np.where(total > 0, total, 1.0), np.nan)


def dice_scores(
    saliency: Any,
    masks: Any,
    threshold: float = 0.5,
    skip_empty_masks: bool = True,
) -> DiceResult:
    """Soft and thresholded Dice between saliency maps and lesion masks, per image and class.

    Args:
        saliency: ``(N, C, h, w)`` or ``(C, h, w)`` maps in [0, 1] (numpy or torch).
        masks: ``(N, C, H, W)`` or ``(C, H, W)`` masks; nonzero = lesion. Upsampling goes to ``(H, W)``.
        threshold: the hard Dice calls ``saliency ≥ threshold`` lesion.
        skip_empty_masks: leave images whose mask is empty for a class out of that class (NaN).

    Returns:
        A :class:`DiceResult`.

    Raises:
        ValueError: the batch or class dimensions differ.
    """
    sal = _to_numpy(saliency).astype(np.float32, copy=False)
    mask = _to_numpy(masks) != 0
    if sal.ndim == 3:
        sal = sal[None]
    if mask.ndim == 3:
        mask = mask[None]
    if sal.ndim != 4 or mask.ndim != 4 or sal.shape[:2] != mask.shape[:2]:
        raise ValueError(
            f"saliency (N, C, h, w) and masks (N, C, H, W) must agree in N and C, got {sal.shape} and {mask.shape}"
        )
    size = mask.shape[-2:]
    soft = np.empty(sal.shape[:2])
    hard = np.empty(sal.shape[:2])
    # One image at a time: the upsampled maps of a full-size batch would take gigabytes.
    for i in range(sal.shape[0]):
        up = upsample_nearest(sal[i], size)
        soft[i] = _dice(up, mask[i])
        hard[i] = _dice((up >= threshold).astype(np.float32), mask[i])
    if skip_empty_masks:
        empty = ~mask.any(axis=(-2, -1))
        soft[empty] = np.nan
        hard[empty] = np.nan

    def nanmean(a: NDArray[np.float64]) -> NDArray[np.float64]:
        counts = np.isfinite(a).sum(axis=0)
        sums = np.nansum(a, axis=0)
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    return DiceResult(soft, hard, nanmean(soft), nanmean(hard), float(threshold))
