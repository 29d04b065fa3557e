"""Localization quality: the one Dice between GMIC saliency maps and lesion segmentations.

Every caller (``mammogmic demo``, ``ablate``, ``visualize``, the trainer's ``malignant_dice`` validation metric)
computes Dice here. The low-resolution saliency map (stride 64 for the official 2944×1920 input: 46×30 cells) is
upsampled to the mask's resolution first, in one of two ways:

* ``"nearest"`` (the paper's convention): cell ``(i, j)`` fills the block ``[s·i, s·(i+1)) × [s·j, s·(j+1))``.
* ``"aligned"``: bilinear interpolation between cell values placed at their receptive-field centres. With
  zero-padded "same" convolutions every stride-2 layer maps output index ``k`` to input index ``2k``, so cell
  ``(i, j)`` of a stride-``s`` network is centred on pixel ``(s·i, s·j)``, not on the block centre
  ``(s·i + s/2, s·j + s/2)``: nearest-neighbour blocks shift every value by half a cell down and right
  (``docs/localization.md`` measures it). Values beyond the first/last cell centre extend the border cell.

Two variants per class (0 = benign, 1 = malignant): soft Dice ``2·Σ(s·m) / (Σs + Σm)`` with the saliency values
``s ∈ [0, 1]``, and hard Dice of ``s ≥ threshold``. Dice is undefined when both the map and the mask are empty;
such entries are NaN and left out of the means. Images whose mask for a class is empty are also left out of
that class's mean by default, because Dice there only measures false positives (``skip_empty_masks=False``
keeps them).

A map that lights up on every image finds every lesion: Dice over the images with a lesion cannot see it.
:func:`negative_marks` says which maps mark an image labelled negative for the class (any pixel of the upsampled
map at or above the threshold), and :func:`specific_dice` weighs the Dice by the share of negative images left
unmarked: 0 for maps that mark every image and for maps that mark none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "PLATEAU_SHARE",
    "UPSAMPLING",
    "DiceResult",
    "PeakOffsets",
    "dice_scores",
    "negative_marks",
    "specific_dice",
    "peak_offsets",
    "upsample_aligned",
    "upsample_maps",
    "upsample_nearest",
]

Upsampling = Literal["nearest", "aligned"]
UPSAMPLING: tuple[str, ...] = ("nearest", "aligned")
#: A cell at or above this share of its map's maximum is on the map's plateau (:attr:`PeakOffsets.plateau_cells`).
PLATEAU_SHARE = 0.9


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


def _linear_weights(
    n_out: int, n_in: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]:
    """Indices and weights of 1-D linear interpolation with cell ``k`` centred on output ``k·n_out/n_in``."""
    position = np.arange(n_out, dtype=np.float64) * n_in / n_out  # in cell units
    low = np.minimum(np.floor(position).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = (position - low).astype(np.float32)
    return low, high, frac


def upsample_aligned(maps: Any, size: Sequence[int]) -> NDArray[np.float32]:
    """Bilinear upsampling of ``(..., h, w)`` maps to ``(..., H, W)`` with cell ``(i, j)`` centred on pixel
    ``(i·H/h, j·W/w)``, its receptive-field centre (see the module docstring); border values extend."""
    arr = _to_numpy(maps).astype(np.float32, copy=False)
    height, width = int(size[0]), int(size[1])
    h, w = arr.shape[-2:]
    r0, r1, fr = _linear_weights(height, h)
    c0, c1, fc = _linear_weights(width, w)
    rows = arr[..., r0, :] * (1 - fr)[:, None] + arr[..., r1, :] * fr[:, None]  # (..., H, w)
    out: NDArray[np.float32] = (rows[..., c0] * (1 - fc) + rows[..., c1] * fc).astype(np.float32, copy=False)
    return out


def upsample_maps(maps: Any, size: Sequence[int], mode: str = "nearest") -> NDArray[np.float32]:
    """:func:`upsample_nearest` or :func:`upsample_aligned` by name.

    Raises:
        ValueError: an unknown ``mode``.
    """
    if mode == "nearest":
        return upsample_nearest(maps, size)
    if mode == "aligned":
        return upsample_aligned(maps, size)
    raise ValueError(f"upsample must be one of {', '.join(UPSAMPLING)}, got {mode!r}")


def _nanmean(a: NDArray[np.float64]) -> NDArray[np.float64]:
    counts = np.isfinite(a).sum(axis=0)
    sums = np.nansum(a, axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


@dataclass(frozen=True)
class DiceResult:
    """Dice per image and class, and their means.

    Attributes:
        soft: ``(N, C)`` soft Dice per image and class (NaN where undefined or skipped).
        hard: ``(N, C)`` Dice of the thresholded map.
        mean_soft: ``(C,)`` mean over images with a defined value.
        mean_hard: ``(C,)`` same for the thresholded map.
        threshold: threshold used for ``hard``.
        upsample: ``"nearest"`` or ``"aligned"``.
    """

    soft: NDArray[np.float64]
    hard: NDArray[np.float64]
    mean_soft: NDArray[np.float64]
    mean_hard: NDArray[np.float64]
    threshold: float
    upsample: str = "nearest"

    @classmethod
    def concatenate(cls, parts: Sequence[DiceResult]) -> DiceResult:
        """One result over the images of several (batches must share threshold and upsampling).

        Raises:
            ValueError: empty, or parts computed differently.
        """
        if not parts:
            raise ValueError("no Dice results to concatenate")
        if len({(p.threshold, p.upsample) for p in parts}) > 1:
            raise ValueError("Dice results with different thresholds or upsampling cannot be combined")
        soft = np.concatenate([p.soft for p in parts])
        hard = np.concatenate([p.hard for p in parts])
        return cls(soft, hard, _nanmean(soft), _nanmean(hard), parts[0].threshold, parts[0].upsample)

    def summary(self, class_names: Sequence[str] = ("benign", "malignant")) -> dict[str, Any]:
        """Means per class as a JSON-ready dict (NaN → None): ``{name: {dice, soft_dice, n_images}}``."""

        def clean(v: float) -> float | None:
            return float(v) if np.isfinite(v) else None

        out: dict[str, Any] = {"threshold": self.threshold, "upsample": self.upsample}
        for c, name in enumerate(class_names[: self.soft.shape[1]]):
            out[name] = {
                "dice": clean(self.mean_hard[c]),
                "soft_dice": clean(self.mean_soft[c]),
                "n_images": int(np.isfinite(self.soft[:, c]).sum()),
            }
        return out

    def to_dict(self, class_names: Sequence[str] = ("benign", "malignant")) -> dict[str, Any]:
        """:meth:`summary` plus the per-image values."""
        out = self.summary(class_names)
        for c, name in enumerate(class_names[: self.soft.shape[1]]):
            out[name]["per_image_soft_dice"] = [float(v) if np.isfinite(v) else None for v in self.soft[:, c]]
            out[name]["per_image_dice"] = [float(v) if np.isfinite(v) else None for v in self.hard[:, c]]
        return out


def _dice(pred: NDArray[np.float32], target: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Dice over the last two axes; NaN where both are empty."""
    inter = np.einsum("...hw,...hw->...", pred, target.astype(np.float32), dtype=np.float64)
    total = pred.sum(axis=(-2, -1), dtype=np.float64) + target.sum(axis=(-2, -1), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * inter / np.where(total > 0, total, 1.0), np.nan)


def _hard_dice(pred: NDArray[np.bool_], target: NDArray[np.bool_]) -> NDArray[np.float64]:
    """:func:`_dice` of binary maps, from pixel counts (the same values: the sums are exact integers)."""
    inter = np.count_nonzero(pred & target, axis=(-2, -1)).astype(np.float64)
    total = (np.count_nonzero(pred, axis=(-2, -1)) + np.count_nonzero(target, axis=(-2, -1))).astype(
        np.float64
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * inter / np.where(total > 0, total, 1.0), np.nan)


def dice_scores(
    saliency: Any,
    masks: Any,
    threshold: float = 0.5,
    skip_empty_masks: bool = True,
    upsample: str = "nearest",
) -> DiceResult:
    """Soft and thresholded Dice between saliency maps and lesion masks, per image and class.

    Args:
        saliency: ``(N, C, h, w)`` or ``(C, h, w)`` maps in [0, 1] (numpy or torch).
        masks: ``(N, C, H, W)`` or ``(C, H, W)`` masks; nonzero = lesion. Upsampling goes to ``(H, W)``.
        threshold: the hard Dice calls ``saliency ≥ threshold`` lesion.
        skip_empty_masks: leave images whose mask is empty for a class out of that class (NaN).
        upsample: ``"nearest"`` (the paper) or ``"aligned"`` (see the module docstring).

    Returns:
        A :class:`DiceResult`.

    Raises:
        ValueError: the batch or class dimensions differ, or an unknown ``upsample``.
    """
    if upsample not in UPSAMPLING:
        raise ValueError(f"upsample must be one of {', '.join(UPSAMPLING)}, got {upsample!r}")
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
    soft = np.full(sal.shape[:2], np.nan)
    hard = np.full(sal.shape[:2], np.nan)
    wanted = mask.any(axis=(-2, -1)) if skip_empty_masks else np.ones(sal.shape[:2], dtype=bool)
    # One image at a time (the upsampled maps of a full-size batch would take gigabytes), and only the classes
    # that count: most images of a screening set have no lesion of a given class.
    for i in range(sal.shape[0]):
        classes = np.flatnonzero(wanted[i])
        if classes.size == 0:
            continue
        up = upsample_maps(sal[i, classes], size, upsample)
        soft[i, classes] = _dice(up, mask[i, classes])
        hard[i, classes] = _hard_dice(up >= threshold, mask[i, classes])
    return DiceResult(soft, hard, _nanmean(soft), _nanmean(hard), float(threshold), upsample)


def negative_marks(
    saliency: Any, masks: Any, labels: Any, threshold: float = 0.5, upsample: str = "nearest"
) -> NDArray[np.float64]:
    """Which maps mark an image labelled negative for their class: ``(N, C)`` 1.0 where some pixel of the
    upsampled map (as :func:`dice_scores` upsamples it) is at or above ``threshold``, 0.0 where none is, NaN
    where the image is not a negative of the class (its label is not 0, or its mask holds a lesion).

    Args:
        saliency: ``(N, C, h, w)`` maps in [0, 1]; masks: ``(N, C, H, W)``; labels: ``(N, C)`` with NaN unknown.

    Raises:
        ValueError: the shapes disagree, or an unknown ``upsample``.
    """
    if upsample not in UPSAMPLING:
        raise ValueError(f"upsample must be one of {', '.join(UPSAMPLING)}, got {upsample!r}")
    sal = _to_numpy(saliency).astype(np.float32, copy=False)
    mask = _to_numpy(masks) != 0
    lab = _to_numpy(labels).astype(np.float64, copy=False)
    if sal.ndim != 4 or mask.ndim != 4 or sal.shape[:2] != mask.shape[:2] or lab.shape != sal.shape[:2]:
        raise ValueError(
            "saliency (N, C, h, w), masks (N, C, H, W) and labels (N, C) must agree in N and C, got "
            f"{sal.shape}, {mask.shape} and {lab.shape}"
        )
    out = np.full(sal.shape[:2], np.nan)
    negative = (lab == 0) & ~mask.any(axis=(-2, -1))
    for i, c in zip(*np.nonzero(negative), strict=True):
        # Interpolation never exceeds the map's maximum: only a map that reaches the threshold is upsampled.
        marked = sal[i, c].max() >= threshold and bool(
            (upsample_maps(sal[i, c], mask.shape[-2:], upsample) >= threshold).any()
        )
        out[i, c] = float(marked)
    return out


def specific_dice(dice: float, marked: float) -> float:
    """The Dice of the images with a lesion (:func:`dice_scores`' mean) times the share of the negative images
    that the maps leave unmarked (``1 - marked``, ``marked`` the mean of :func:`negative_marks`): the maps must
    find the lesions and stay dark elsewhere. Without negative images (``marked`` NaN) it is the Dice."""
    return dice if math.isnan(marked) else dice * (1.0 - marked)


@dataclass(frozen=True)
class PeakOffsets:
    """Distances (input pixels) from each image's lesion centroid to the saliency peak and to the patches.

    Attributes:
        peak_aligned: peak cell placed at its receptive-field centre ``(s·i, s·j)``.
        peak_nearest: peak cell placed at its nearest-neighbour block centre ``(s·i + (s-1)/2, …)``.
        patch_nearest: centre of the retrieved patch closest to the lesion centroid (``NaN`` without patches).
        stride: pixels per saliency cell (rows, cols), the unit of the summary's ``_cells`` figures: the map's
            spacing, or the network's stride when the map is finer (``peak_offsets``' ``cell_px``).
        peak_signed: ``(N, 2)`` signed (rows, cols) offset from the lesion centroid to the aligned peak.
        inward_cosine: cosine between that offset and the direction from the lesion centroid to the breast's
            centroid (``NaN`` without images): near 1 when the peak sits on the lesion's chest-wall/interior side.
        profile: ``(N, 2r+1, 2r+1)`` each image's map divided by its maximum, in the cells around the cell whose
            receptive-field centre is nearest the lesion centroid (the centre entry; rows down, columns toward
            the skin; ``NaN`` outside the map). Its mean over images shows where, relative to the lesion, the
            maps put their mass (docs/localization.md).
        lesion_radius: the lesion's equivalent radius ``sqrt(area / π)`` in pixels (``NaN`` without a lesion):
            the summary's ``median_peak_aligned_radii`` says whether the peak lies on the lesion's body (< 1) or
            beside it, on its margin or spicules (docs/localization.md).
        centroid_aligned: distance to the centroid of the peak's blob: the saliency-weighted mean position
            (cells placed as in ``peak_aligned``) of the cells at or above half the map's maximum that are
            8-connected to the peak. Unlike the peak, it can fall between cells: a blob spread evenly over the
            lesion's cell and a neighbour has its centroid between them.
        plateau_cells: how many cells hold at least :data:`PLATEAU_SHARE` of the map's maximum (``NaN``
            without a lesion). A map saturated over several cells (sigmoid near 1) has a near-tie there, and its
            argmax peak is any one of them; the summary's ``fraction_lesion_cell_in_plateau`` and
            ``fraction_peak_on_lesion_cell`` say how often the lesion's own cell is among them and how often it
            holds the maximum.
    """

    peak_aligned: NDArray[np.float64]
    peak_nearest: NDArray[np.float64]
    patch_nearest: NDArray[np.float64]
    stride: tuple[float, float]
    peak_signed: NDArray[np.float64]
    inward_cosine: NDArray[np.float64]
    profile: NDArray[np.float64]
    lesion_radius: NDArray[np.float64]
    centroid_aligned: NDArray[np.float64]
    plateau_cells: NDArray[np.float64]

    @classmethod
    def concatenate(cls, parts: Sequence[PeakOffsets]) -> PeakOffsets:
        """One result over the images of several batches."""
        if not parts:
            raise ValueError("no offsets to concatenate")
        return cls(
            np.concatenate([p.peak_aligned for p in parts]),
            np.concatenate([p.peak_nearest for p in parts]),
            np.concatenate([p.patch_nearest for p in parts]),
            parts[0].stride,
            np.concatenate([p.peak_signed for p in parts]),
            np.concatenate([p.inward_cosine for p in parts]),
            np.concatenate([p.profile for p in parts]),
            np.concatenate([p.lesion_radius for p in parts]),
            np.concatenate([p.centroid_aligned for p in parts]),
            np.concatenate([p.plateau_cells for p in parts]),
        )

    def summary(self) -> dict[str, Any]:
        """Medians in pixels and in saliency cells (mean stride), over the images with a lesion."""
        cell = float(np.mean(self.stride))
        out: dict[str, Any] = {"n_images": int(np.isfinite(self.peak_aligned).sum()), "stride_px": cell}
        for name in ("peak_aligned", "peak_nearest", "patch_nearest", "centroid_aligned"):
            values = getattr(self, name)
            median = float(np.nanmedian(values)) if np.isfinite(values).any() else None
            out[f"median_{name}_px"] = median
            out[f"median_{name}_cells"] = None if median is None else median / cell
        radii = self.peak_aligned / self.lesion_radius
        radii = radii[np.isfinite(radii)]
        out["median_peak_aligned_radii"] = float(np.median(radii)) if len(radii) else None
        out["fraction_peak_within_radius"] = float(np.mean(radii < 1)) if len(radii) else None
        found = np.isfinite(self.peak_signed).all(axis=1)
        for axis, name in enumerate(("rows", "cols")):
            out[f"median_peak_offset_{name}_px"] = (
                float(np.median(self.peak_signed[found, axis])) if found.any() else None
            )
        inward = self.inward_cosine[np.isfinite(self.inward_cosine)]
        out["median_inward_cosine"] = float(np.median(inward)) if len(inward) else None
        out["fraction_peak_inward"] = float(np.mean(inward > 0)) if len(inward) else None
        plateau = self.plateau_cells[np.isfinite(self.plateau_cells)]
        out["median_plateau_cells"] = float(np.median(plateau)) if len(plateau) else None
        own = self.profile[:, self.profile.shape[1] // 2, self.profile.shape[2] // 2]
        own = own[np.isfinite(own)]  # the lesion's cell over its map's maximum
        out["fraction_lesion_cell_in_plateau"] = float(np.mean(own >= PLATEAU_SHARE)) if len(own) else None
        out["fraction_peak_on_lesion_cell"] = float(np.mean(own == 1.0)) if len(own) else None
        mean_profile = self.mean_profile()
        out["lesion_centred_saliency"] = None if mean_profile is None else np.round(mean_profile, 3).tolist()
        return out

    def mean_profile(self) -> NDArray[np.float64] | None:
        """Mean of :attr:`profile` over the images with a lesion (each cell over the images where it lies in
        the map); ``None`` without any."""
        seen = np.isfinite(self.profile)
        if not seen[:, seen.shape[1] // 2, seen.shape[2] // 2].any():
            return None
        counts = seen.sum(axis=0)
        return np.where(counts > 0, np.nansum(self.profile, axis=0) / np.maximum(counts, 1), np.nan)


def peak_offsets(
    saliency: Any,
    masks: Any,
    patch_locations: Any = None,
    crop_size: Sequence[int] | None = None,
    class_index: int = 1,
    images: Any = None,
    radius: int = 3,
    cell_px: float | None = None,
) -> PeakOffsets:
    """How far the saliency peak (and the nearest retrieved patch) lies from each lesion's centroid.

    Args:
        saliency: ``(N, C, h, w)`` maps.
        masks: ``(N, C, H, W)`` masks (images whose mask of ``class_index`` is empty give NaN).
        patch_locations: optional ``(N, K, 2)`` upper-left (row, col) of the retrieved patches.
        crop_size: ``(height, width)`` of the patches.
        class_index: 1 = malignant, 0 = benign.
        images: optional ``(N, 1, H, W)`` model inputs; the breast is every pixel above the image's minimum (the
            background of a standardised, zero-padded window), for :attr:`PeakOffsets.inward_cosine`.
        radius: cells on each side of the lesion's cell in :attr:`PeakOffsets.profile`.
        cell_px: pixels per cell for the summary's ``_cells`` figures (:attr:`PeakOffsets.stride`): the
            network's own stride when the map is finer than its cells (``saliency_grid: fine_at_inference``);
            by default the map's own spacing.
    """
    sal = _to_numpy(saliency)[:, class_index].astype(np.float64)
    mask = _to_numpy(masks)[:, class_index] != 0
    n, h, w = sal.shape
    height, width = mask.shape[-2:]
    sy, sx = height / h, width / w
    peak_aligned = np.full(n, np.nan)
    peak_nearest = np.full(n, np.nan)
    patch_nearest = np.full(n, np.nan)
    signed = np.full((n, 2), np.nan)
    inward = np.full(n, np.nan)
    side = 2 * radius + 1
    profile = np.full((n, side, side), np.nan)
    lesion_radius = np.full(n, np.nan)
    blob_centroid = np.full(n, np.nan)
    plateau = np.full(n, np.nan)
    pixels = None if images is None else _to_numpy(images)[:, 0]
    locations = None if patch_locations is None else _to_numpy(patch_locations)
    for i in range(n):
        rows, cols = np.nonzero(mask[i])
        if not len(rows):
            continue
        centroid = np.array([rows.mean(), cols.mean()])
        lesion_radius[i] = math.sqrt(len(rows) / math.pi)
        pi, pj = divmod(int(np.argmax(sal[i])), w)
        signed[i] = np.array([sy * pi, sx * pj]) - centroid
        peak_aligned[i] = np.hypot(*signed[i])
        blob_centroid[i] = np.hypot(*(_blob_centroid(sal[i], pi, pj) * (sy, sx) - centroid))
        # the lesion's cell: receptive-field centre (s·i, s·j) nearest the centroid, as peak_aligned places cells
        ci, cj = (
            int(np.clip(np.rint(centroid[0] / sy), 0, h - 1)),
            int(np.clip(np.rint(centroid[1] / sx), 0, w - 1)),
        )
        top = sal[i].max()
        scaled = sal[i] / top if top > 0 else np.zeros_like(sal[i])
        plateau[i] = float(np.count_nonzero(scaled >= PLATEAU_SHARE)) if top > 0 else np.nan
        r0, r1 = max(ci - radius, 0), min(ci + radius + 1, h)
        c0, c1 = max(cj - radius, 0), min(cj + radius + 1, w)
        profile[i, r0 - ci + radius : r1 - ci + radius, c0 - cj + radius : c1 - cj + radius] = scaled[
            r0:r1, c0:c1
        ]
        if pixels is not None:
            rows_b, cols_b = np.nonzero(pixels[i] > pixels[i].min())
            to_breast = np.array([rows_b.mean(), cols_b.mean()]) - centroid
            norm = np.hypot(*signed[i]) * np.hypot(*to_breast)
            inward[i] = float(signed[i] @ to_breast / norm) if norm > 0 else np.nan
        peak_nearest[i] = np.hypot(*(np.array([sy * pi + (sy - 1) / 2, sx * pj + (sx - 1) / 2]) - centroid))
        if locations is not None and crop_size is not None:
            centres = locations[i].astype(np.float64) + (np.asarray(crop_size, np.float64) - 1) / 2
            patch_nearest[i] = float(np.min(np.hypot(*(centres - centroid).T)))
    return PeakOffsets(
        peak_aligned,
        peak_nearest,
        patch_nearest,
        (sy, sx) if cell_px is None else (float(cell_px), float(cell_px)),
        signed,
        inward,
        profile,
        lesion_radius,
        blob_centroid,
        plateau,
    )


def _blob_centroid(saliency: NDArray[np.float64], row: int, col: int) -> NDArray[np.float64]:
    """Saliency-weighted mean (row, col), in cells, of the cells >= half the maximum 8-connected to the peak
    ``(row, col)``; the peak itself when the map is flat at zero."""
    import cv2

    top = saliency[row, col]
    if not top > 0:
        return np.array([row, col], np.float64)
    _, labels = cv2.connectedComponents((saliency >= top / 2).astype(np.uint8), connectivity=8)
    weights = np.where(labels == labels[row, col], saliency, 0.0)
    total = weights.sum()
    return (
        np.array(
            [
                weights.sum(axis=1) @ np.arange(saliency.shape[0]),
                weights.sum(axis=0) @ np.arange(saliency.shape[1]),
            ]
        )
        / total
    )
