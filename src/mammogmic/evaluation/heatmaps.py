"""Benign and malignant heat maps from DMV-CNN's patch classifier (the engine of ``mammogmic heatmaps``).

The rule of the official producer, reproduced from its recorded output (``shared/fixtures/official_dmv``):

* The whole cropped image, oriented to face right (R views mirrored) and standardised over all its pixels,
  is cut into ``patch x patch`` (256) patches on a grid whose first patch is at the top/left border and whose
  last is flush with the bottom/right border.
* Along a dimension of length ``L`` the grid takes ``n = ceil((L - patch) / stride)`` steps (stride 70). They
  would overshoot by ``o = n * stride - (L - patch)``, so every step is ``stride - o // n`` and ``o mod n`` of
  them, drawn with ``random.sample(range(n), o mod n)``, one pixel shorter. One :class:`random.Random` serves
  a whole run: for each image in turn, first the rows, then the columns (:func:`patch_grid`). The official run
  seeds Python's ``random`` with 0 and goes exam by exam, L-CC, R-CC, L-MLO, R-MLO.
* Every patch goes through the classifier (3 identical channels); a pixel's probability of a class is the mean
  over the patches that cover it. Class 0 is malignant, class 1 benign.
* The maps are mirrored back, so they lie on the cropped PNG as it is stored.

The patch classifier runs on batches of patches gathered by one indexing operation; the mean over covering
patches is a product of two indicator matrices with the grid of probabilities (no loop over pixels).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mammogmic.data.preprocessing import orient
from mammogmic.data.sample import heatmap_input
from mammogmic.models.patch import BENIGN_CLASS, MALIGNANT_CLASS, PatchClassifier

__all__ = [
    "PATCH_SIZE",
    "PATCH_STRIDE",
    "HeatMaps",
    "PatchGrid",
    "accumulate",
    "heatmap_input",
    "patch_grid",
    "patch_probabilities",
    "patch_steps",
    "produce_heatmaps",
]

PATCH_SIZE = 256
PATCH_STRIDE = 70


def patch_steps(
    length: int, rng: random.Random, patch: int = PATCH_SIZE, stride: int = PATCH_STRIDE
) -> list[int]:
    """Steps between consecutive patch starts along a dimension of ``length`` pixels (the official rule).

    Raises:
        ValueError: ``length`` shorter than a patch, or a non-positive patch size or stride.
    """
    if patch < 1 or stride < 1:
        raise ValueError(f"patch size and stride must be positive, got {patch} and {stride}")
    if length < patch:
        raise ValueError(f"the image ({length} pixels) is smaller than a {patch}-pixel patch")
    span = length - patch
    n = math.ceil(span / stride)
    if n == 0:
        return []
    overshoot = n * stride - span
    steps = [stride - overshoot // n] * n
    for index in rng.sample(range(n), overshoot % n):
        steps[index] -= 1
    return steps


@dataclass(frozen=True)
class PatchGrid:
    """Upper-left corners of the patches of one image (oriented), as row and column starts."""

    rows: np.ndarray  # (R,) int64
    cols: np.ndarray  # (C,) int64
    patch: int = PATCH_SIZE

    @property
    def shape(self) -> tuple[int, int]:
        """Patches per column and per row ``(R, C)``."""
        return len(self.rows), len(self.cols)


def patch_grid(
    shape: Sequence[int], rng: random.Random, patch: int = PATCH_SIZE, stride: int = PATCH_STRIDE
) -> PatchGrid:
    """The patch grid of an image of ``shape`` (H, W); draws the rows' steps, then the columns'.

    Raises:
        ValueError: the image is smaller than a patch (checked before any draw, so a refused image takes none).
    """
    if min(int(shape[0]), int(shape[1])) < patch:
        raise ValueError(
            f"the image ({int(shape[0])}x{int(shape[1])}) is smaller than a {patch}x{patch} patch"
        )
    row_steps = patch_steps(int(shape[0]), rng, patch, stride)
    col_steps = patch_steps(int(shape[1]), rng, patch, stride)
    return PatchGrid(
        rows=np.concatenate([[0], np.cumsum(row_steps)]).astype(np.int64),
        cols=np.concatenate([[0], np.cumsum(col_steps)]).astype(np.int64),
        patch=patch,
    )


def patch_probabilities(
    model: PatchClassifier,
    image: np.ndarray | torch.Tensor,
    rows: np.ndarray,
    cols: np.ndarray,
    patch: int = PATCH_SIZE,
    *,
    batch_size: int = 64,
    amp: str = "none",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Class probabilities ``(len(rows), len(cols), num_classes)`` float64 of the patches at every
    (row start, column start) pair, ``batch_size`` patches per forward pass, on the model's device.

    Args:
        model: the patch classifier (eval mode).
        image: from :func:`heatmap_input` (H, W).
        rows, cols: upper patch rows and left patch columns (e.g. a :class:`PatchGrid`'s, or some of them).
        amp: ``"none"`` (float32, reproduces the official maps) or ``"bf16"`` (autocast: faster where the
            hardware has bf16, maps differ by ~1e-2).
        progress: called with the number of patches done after each batch.
    """
    if amp not in ("none", "bf16"):
        raise ValueError(f"amp must be 'none' or 'bf16', got {amp!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    img = torch.as_tensor(image, dtype=torch.float32).to(device)
    r = torch.as_tensor(np.asarray(rows, dtype=np.int64)).to(device)
    c = torch.as_tensor(np.asarray(cols, dtype=np.int64)).to(device)
    if len(r) and (int(r.max()) + patch > img.shape[0] or int(c.max()) + patch > img.shape[1]):
        raise ValueError(f"patches reach past the image {tuple(img.shape)}")
    offsets = torch.arange(patch, device=device)
    ri, ci = torch.meshgrid(
        torch.arange(len(r), device=device), torch.arange(len(c), device=device), indexing="ij"
    )
    ri, ci = ri.reshape(-1), ci.reshape(-1)  # row-major patch order
    out = torch.empty((len(ri), model.config.num_classes), dtype=torch.float64)
    for start in range(0, len(ri), batch_size):
        stop = min(start + batch_size, len(ri))
        top = r[ri[start:stop]][:, None] + offsets  # (B, P)
        left = c[ci[start:stop]][:, None] + offsets  # (B, P)
        patches = img[top[:, :, None], left[:, None, :]][:, None]  # (B, 1, P, P)
        with (
            torch.inference_mode(),
            torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp == "bf16"),
        ):
            logits = model(patches)
        out[start:stop] = torch.softmax(logits.float(), dim=1).double().cpu()
        if progress is not None:
            progress(stop - start)
    return out.reshape(len(r), len(c), -1).numpy()


def _cover(starts: np.ndarray, length: int, patch: int) -> np.ndarray:
    """``(length, len(starts))`` float64 indicator: pixel ``i`` lies in the patch starting at ``starts[j]``."""
    pixels = np.arange(length)[:, None]
    return ((pixels >= starts[None]) & (pixels < starts[None] + patch)).astype(np.float64)


def accumulate(
    probs: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: Sequence[int], patch: int = PATCH_SIZE
) -> np.ndarray:
    """Per-pixel mean over the covering patches: ``(num_classes, H, W)`` float64 from ``probs`` (R, C, K).

    ``mean[k] = (A P_k B^T) / (A 1 B^T)`` with ``A`` (H, R) and ``B`` (W, C) the patch-cover indicators.
    Pixels no patch covers are NaN.
    """
    height, width = int(shape[0]), int(shape[1])
    a = _cover(np.asarray(rows), height, patch)
    b = _cover(np.asarray(cols), width, patch)
    counts = np.outer(a.sum(1), b.sum(1))  # (H, W)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([(a @ probs[:, :, k] @ b.T) / counts for k in range(probs.shape[2])])


@dataclass
class HeatMaps:
    """The two maps of one image, float32, at the cropped image's size and in its stored orientation."""

    benign: np.ndarray
    malignant: np.ndarray
    grid: PatchGrid


def produce_heatmaps(
    model: PatchClassifier,
    cropped: np.ndarray,
    view: str,
    rng: random.Random,
    *,
    horizontal_flip: str = "NO",
    patch: int = PATCH_SIZE,
    stride: int = PATCH_STRIDE,
    batch_size: int = 64,
    amp: str = "none",
    progress: Callable[[int], None] | None = None,
) -> HeatMaps:
    """Benign and malignant heat maps of one cropped image (raw orientation, as stored).

    Args:
        model: the patch classifier.
        cropped: the cropped image (any numeric dtype).
        view: ``"L-CC"`` etc. (R views are mirrored to face right, and the maps mirrored back).
        rng: the run's :class:`random.Random` (the grid's draws come from it; see the module docstring).
        patch: patch size (256, what the released classifier was trained on).
        stride: patch stride before the shrinking that makes the last patch flush (70).
        batch_size, amp, progress: as in :func:`patch_probabilities`.

    Raises:
        ValueError: an image smaller than a patch in either dimension.
    """
    image = heatmap_input(cropped, view, horizontal_flip)
    grid = patch_grid(image.shape, rng, patch, stride)
    probs = patch_probabilities(
        model, image, grid.rows, grid.cols, patch, batch_size=batch_size, amp=amp, progress=progress
    )
    maps = accumulate(probs, grid.rows, grid.cols, image.shape, patch).astype(np.float32)
    back = [
        np.ascontiguousarray(orient(maps[k], view, horizontal_flip)) for k in (BENIGN_CLASS, MALIGNANT_CLASS)
    ]
    return HeatMaps(benign=back[0], malignant=back[1], grid=grid)
