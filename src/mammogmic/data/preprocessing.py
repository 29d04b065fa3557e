"""The official GMIC preprocessing, re-implemented: orientation, breast crop, optimal centre, model input.

Conventions (the same as the official NYU pipeline; see ``docs/data.md``):

* Coordinates are 0-based ``(row, col)``; shapes are ``(height, width)``; box ends are exclusive.
* Raw orientation: in the files L views face right (chest wall at column 0) and R views face left.
  :func:`orient` mirrors the R views (``horizontal_flip="NO"``) or the L views (``"YES"``) so that
  **every view faces right** as the model sees it.
* :func:`crop_breast` works on the raw image and returns :class:`CropInfo`: the crop window in raw
  coordinates (``window_location``), the cropped raw-orientation pixels, and ``rightmost_points`` /
  ``bottommost_points`` expressed in the *oriented* cropped image.
* :func:`best_center` and :func:`model_input` take the raw-orientation cropped image and orient it
  themselves, exactly like the official loader reads the cropped PNG and flips it.

The morphology (100 iterations of a 3x3 cross erosion and dilation) is computed with an L1 distance
transform: ``N`` iterations of the cross equal the city-block ball of radius ``N``; pixels beyond the
image border count as background for the erosion (scipy's ``border_value=0``). This gives exactly the
same masks as ``scipy.ndimage.binary_erosion/dilation(iterations=N)``, several times faster. The largest
component comes from OpenCV's 4-connected labelling, equal to ``scipy.ndimage.label``'s (so scipy is not a
dependency: ~145 MB less in an install; ``tests/data/test_data_preprocessing.py`` compares both).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from mammogmic.errors import PreprocessingError

logger = logging.getLogger(__name__)

__all__ = [
    "VIEWS",
    "MODEL_INPUT_SHAPE",
    "CropInfo",
    "CropNoise",
    "NO_NOISE",
    "TRAIN_NOISE",
    "scaled_train_noise",
    "Window",
    "parse_view",
    "needs_flip",
    "orient",
    "chest_wall_side",
    "expected_chest_wall_side",
    "crop_breast",
    "best_center",
    "sample_window",
    "apply_window",
    "standardize",
    "model_input",
    "cbis_ddsm_input",
]

VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")
#: Height and width of the official model input.
MODEL_INPUT_SHAPE = (2944, 1920)


def parse_view(view: str) -> tuple[str, str]:
    """Split ``"L-CC"`` (also ``"L_CC"``, ``"LCC"``, ``"l-mlo"``) into ``("L", "CC")``.

    Raises:
        PreprocessingError: for anything that is not one of the four mammography views.
    """
    text = str(view).strip().upper().replace("_", "-").replace(" ", "-")
    if "-" not in text and len(text) > 1:
        text = f"{text[0]}-{text[1:]}"
    side, _, name = text.partition("-")
    if side not in ("L", "R") or name not in ("CC", "MLO"):
        raise PreprocessingError(f"unknown view {view!r}; expected one of {', '.join(VIEWS)}")
    return side, name


def _check_flip(horizontal_flip: str) -> str:
    value = str(horizontal_flip).strip().upper()
    if value not in ("NO", "YES"):
        raise PreprocessingError(f"horizontal_flip must be 'NO' or 'YES', got {horizontal_flip!r}")
    return value


def needs_flip(view: str, horizontal_flip: str = "NO") -> bool:
    """Whether the raw image must be mirrored left-right to face right (official convention)."""
    side, _ = parse_view(view)
    flip = _check_flip(horizontal_flip)
    return (side == "R") if flip == "NO" else (side == "L")


def orient(image: np.ndarray, view: str, horizontal_flip: str = "NO") -> np.ndarray:
    """Return ``image`` mirrored if needed so that the breast faces right (a view, no copy)."""
    return image[:, ::-1] if needs_flip(view, horizontal_flip) else image


def chest_wall_side(image: np.ndarray) -> str:
    """Which side of the raw image the chest wall is on, judged from the pixels.

    The breast is widest at the chest wall, so the half of the image with more signal (total
    intensity; ties: more non-zero pixels) holds it. Using intensity rather than a non-zero count keeps
    the answer right when the background is not exactly zero.

    Returns:
        ``"left"`` or ``"right"``.
    """
    arr = np.asarray(image)
    half = arr.shape[1] // 2
    left = float(arr[:, :half].sum(dtype=np.float64))
    right = float(arr[:, arr.shape[1] - half :].sum(dtype=np.float64))
    if left == right:
        left, right = float((arr[:, :half] > 0).sum()), float((arr[:, arr.shape[1] - half :] > 0).sum())
    return "left" if left >= right else "right"


def expected_chest_wall_side(view: str, horizontal_flip: str = "NO") -> str:
    """Where the chest wall should be in the raw image for this view and ``horizontal_flip``."""
    return "right" if needs_flip(view, horizontal_flip) else "left"


# --------------------------------------------------------------------------------------------------
# Breast crop


@dataclass(frozen=True)
class CropInfo:
    """Result of :func:`crop_breast` (field meanings as in the official exam lists).

    Attributes:
        window_location: ``(top, bottom, left, right)`` of the crop in the raw image, ends exclusive.
        rightmost_points: ``((row_first, row_last), col)``: rows (of the cropped image) where the
            breast reaches its rightmost column, searched in the lower 2/3, and that column in the
            oriented cropped image (for mirrored views reported as ``width - c``, like the official code).
        bottommost_points: ``(row, (col_first, col_last))``: the lowest breast row of the cropped image
            and its first/last columns in the oriented cropped image.
        distance_from_starting_side: Columns between the chest-wall edge of the raw image and the breast
            (0 for a good crop; the official pipeline rejects images where it is not 0).
        cropped: The cropped pixels in raw orientation, ``image[top:bottom, left:right]``.
        view: ``"L-CC"``-style view the crop was made for.
        horizontal_flip: ``"NO"`` or ``"YES"``.
    """

    window_location: tuple[int, int, int, int]
    rightmost_points: tuple[tuple[int, int], int]
    bottommost_points: tuple[int, tuple[int, int]]
    distance_from_starting_side: int
    cropped: np.ndarray = field(repr=False)
    view: str = "L-CC"
    horizontal_flip: str = "NO"

    @property
    def oriented(self) -> np.ndarray:
        """The cropped image facing right (as the model sees it)."""
        return orient(self.cropped, self.view, self.horizontal_flip)

    def to_record(self) -> dict[str, str]:
        """The four fields as JSON strings, for the manifest columns of the same names."""
        (r0, r1), rc = self.rightmost_points
        br, (b0, b1) = self.bottommost_points
        return {
            "window_location": json.dumps(list(self.window_location)),
            "rightmost_points": json.dumps([[r0, r1], rc]),
            "bottommost_points": json.dumps([br, [b0, b1]]),
            "distance_from_starting_side": str(self.distance_from_starting_side),
        }


def _check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise PreprocessingError(f"{what} must be a 2-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise PreprocessingError(f"{what} is empty (shape {arr.shape})")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise PreprocessingError(f"{what} contains {bad} NaN or infinite values")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise PreprocessingError(f"{what} has non-numeric dtype {arr.dtype}")
    return arr


def _erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``scipy.ndimage.binary_erosion(mask, iterations=n)`` (cross element, border_value=0), exactly."""
    padded = np.pad(mask, 1).astype(np.uint8)
    dist = cv2.distanceTransform(padded, cv2.DIST_L1, 3)
    return dist[1:-1, 1:-1] > iterations


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, iterations=n)`` (cross element), exactly."""
    dist = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L1, 3)
    return dist <= iterations


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component; ties go to the lowest label (first in raster order), like the
    official ``pandas.Series.idxmax`` over scipy's labels."""
    if not mask.any():
        raise PreprocessingError("no breast found: nothing is left after erosion")
    top, bottom, left, right = _bbox(mask)
    # OpenCV's 4-connected labelling (scipy.ndimage.label's default structure) with each component's area.
    _, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask[top:bottom, left:right].astype(np.uint8), connectivity=4, ltype=cv2.CV_32S
    )
    areas = stats[:, cv2.CC_STAT_AREA].copy()
    areas[0] = 0  # background
    largest = np.flatnonzero(areas == areas.max())
    if largest.size > 1:
        # A tie: the component met first in raster order wins, whatever order OpenCV numbered them in.
        flat = labels.ravel()
        largest = largest[np.argsort([int(np.argmax(flat == lab)) for lab in largest])]
    out = np.zeros(mask.shape, dtype=bool)
    out[top:bottom, left:right] = labels == int(largest[0])
    return out


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the True pixels, widened by ``margin`` and clipped to the array."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    height, width = mask.shape
    return (
        max(int(rows[0]) - margin, 0),
        min(int(rows[-1]) + 1 + margin, height),
        max(int(cols[0]) - margin, 0),
        min(int(cols[-1]) + 1 + margin, width),
    )


def _breast_mask(arr: np.ndarray, threshold: float, iterations: int) -> np.ndarray:
    """Dilated largest component of the eroded ``arr > threshold`` mask (the official crop mask).

    Each step works on the bounding box of its input only (exact: nothing outside the box can change).
    """
    mask = arr > threshold
    if not mask.any():
        raise PreprocessingError("no breast found: the image has no pixel above the background value")
    top, bottom, left, right = _bbox(mask)
    region = mask[top:bottom, left:right]
    if iterations > 0:
        # Erosion with the image border as background: pixels outside the box are background too, and
        # the padding of _erode stands in for both.
        region = _erode(region, iterations)
        if not region.any():
            raise PreprocessingError("no breast found: nothing is left after erosion")
    full = np.zeros(mask.shape, dtype=bool)
    full[top:bottom, left:right] = _largest_component(region)
    if iterations > 0:
        r0, r1, c0, c1 = _bbox(full, margin=iterations)
        full[r0:r1, c0:c1] = _dilate(full[r0:r1, c0:c1], iterations)
    return full


def crop_breast(
    image: np.ndarray,
    view: str,
    horizontal_flip: str = "NO",
    *,
    iterations: int = 100,
    buffer_size: int = 50,
    rightmost_from_ratio: float = 1 / 3,
    threshold: float = 0,
) -> CropInfo:
    """Crop the breast as the official cropping stage does.

    Mask ``image > threshold``, erode ``iterations`` times, keep the largest 4-connected component,
    dilate it back, take its bounding box, widen it by ``buffer_size`` pixels at top and bottom and on
    the nipple side only.

    Args:
        image: 2-D raw-orientation mammogram (any numeric dtype; background must be ``<= threshold``).
        view: ``"L-CC"``, ``"R-MLO"``, ...
        horizontal_flip: ``"NO"`` (the usual) or ``"YES"`` for exams stored mirrored.
        iterations: Erosion/dilation iterations (official default 100; smaller for tiny demo images).
        buffer_size: Margin added around the bounding box (official 50).
        rightmost_from_ratio: Fraction of the top of the crop ignored when finding the rightmost point.
        threshold: Pixels above this count as breast (official: 0).

    Returns:
        A :class:`CropInfo`.

    Raises:
        PreprocessingError: invalid array (NaN/inf, not 2-D), unknown view, or no breast found.
    """
    arr = _check_image(image)
    full_view = "-".join(parse_view(view))
    flip = _check_flip(horizontal_flip)
    mirrored = needs_flip(full_view, flip)
    largest = _breast_mask(arr, threshold, iterations)

    height, width = arr.shape
    rows = np.flatnonzero(largest.any(axis=1))
    cols = np.flatnonzero(largest.any(axis=0))
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1
    bottom_row = bottom - 1
    bottom_cols = np.flatnonzero(largest[bottom_row])

    top = max(top - buffer_size, 0)
    bottom = min(bottom + buffer_size, height)
    # The chest wall is at column 0 of the raw image unless mirrored; the buffer goes on the nipple side.
    distance = width - right if mirrored else left
    if mirrored:
        left = max(left - buffer_size, 0)
    else:
        right = min(right + buffer_size, width)

    bottom_row -= top
    if mirrored:
        bottom_first, bottom_last = right - int(bottom_cols[-1]), right - int(bottom_cols[0])
    else:
        bottom_first, bottom_last = int(bottom_cols[0]) - left, int(bottom_cols[-1]) - left

    crop_mask = largest[top:bottom, left:right]
    skip = int(crop_mask.shape[0] * rightmost_from_ratio)
    search = crop_mask[skip:]
    search_cols = np.flatnonzero(search.any(axis=0))
    if search_cols.size == 0:
        raise PreprocessingError("no breast found in the lower part of the crop")
    rightmost_col = int(search_cols[0] if mirrored else search_cols[-1])
    rightmost_rows = np.flatnonzero(search[:, rightmost_col]) + skip
    if mirrored:
        rightmost_col = crop_mask.shape[1] - rightmost_col

    return CropInfo(
        window_location=(top, bottom, left, right),
        rightmost_points=((int(rightmost_rows[0]), int(rightmost_rows[-1])), rightmost_col),
        bottommost_points=(int(bottom_row), (bottom_first, bottom_last)),
        distance_from_starting_side=int(distance),
        cropped=arr[top:bottom, left:right],
        view=full_view,
        horizontal_flip=flip,
    )


# --------------------------------------------------------------------------------------------------
# Optimal centre


def _box_sums(integral: np.ndarray, tl: np.ndarray, br: np.ndarray) -> np.ndarray:
    """Sums of boxes ``[tl, br)`` from a zero-padded integral image (shape ``(H+1, W+1)``)."""
    return (
        integral[br[:, 0], br[:, 1]]
        - integral[tl[:, 0], br[:, 1]]
        - integral[br[:, 0], tl[:, 1]]
        + integral[tl[:, 0], tl[:, 1]]
    )


def best_center(
    cropped: np.ndarray | CropInfo,
    view: str | None = None,
    rightmost_points: Sequence[Any] | None = None,
    bottommost_points: Sequence[Any] | None = None,
    *,
    horizontal_flip: str = "NO",
    window_shape: tuple[int, int] = MODEL_INPUT_SHAPE,
) -> tuple[int, int]:
    """Centre of the model-input window in the oriented cropped image (official optimal-centre stage).

    CC: the window's right edge is pinned to the rightmost breast column and the row is searched to
    cover the most non-zero pixels (ties: nearest the image centre). MLO: the window's bottom-right
    corner is pinned to (bottommost row, rightmost column). The centre may lie outside the image.

    Args:
        cropped: Raw-orientation cropped image, or a :class:`CropInfo` (then the other fields default
            to its values).
        view: ``"L-CC"`` etc.
        rightmost_points: ``((row_first, row_last), col)`` from :func:`crop_breast`.
        bottommost_points: ``(row, (col_first, col_last))`` from :func:`crop_breast`.
        horizontal_flip: As in :func:`crop_breast`.
        window_shape: Window height and width (official ``(2944, 1920)``).

    Returns:
        ``(row, col)``.
    """
    if isinstance(cropped, CropInfo):
        info = cropped
        view = view or info.view
        rightmost_points = rightmost_points if rightmost_points is not None else info.rightmost_points
        bottommost_points = bottommost_points if bottommost_points is not None else info.bottommost_points
        horizontal_flip = info.horizontal_flip
        image = info.cropped
    else:
        image = cropped
    if view is None or rightmost_points is None or bottommost_points is None:
        raise PreprocessingError("best_center needs the view, rightmost_points and bottommost_points")
    image = _check_image(image, "cropped image")
    _, view_name = parse_view(view)
    oriented = orient(image, view, horizontal_flip)
    dims = np.array(oriented.shape, dtype=np.int64)
    window = np.array(window_shape, dtype=np.int64)
    half = window // 2
    centre = dims // 2
    rightmost_col = int(rightmost_points[1])

    if view_name == "MLO":
        bottom_row = int(bottommost_points[0])
        right_part = oriented[:, -int(window[1]) :]
        nonzero_rows = np.flatnonzero((right_part != 0).any(axis=1))
        if nonzero_rows.size:
            bottom_row = min(int(nonzero_rows[-1]), bottom_row)
        return bottom_row - int(half[0]) - 1, rightmost_col - int(half[1]) - 1

    # CC: candidate centre rows lie where the window fits vertically; otherwise the image centre row.
    row_first, row_last = int(half[0]), int(dims[0] - (window[0] - half[0]))
    if row_first >= row_last:
        row_first = row_last = int(centre[0])
    col = rightmost_col - int(half[1]) - 1
    candidates = np.arange(row_first, row_last + 1, dtype=np.int64)
    if candidates.size == 1:
        return int(candidates[0]), col
    integral = np.zeros((dims[0] + 1, dims[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(oriented > 0, axis=0), axis=1, out=integral[1:, 1:])
    centres = np.stack([candidates, np.full_like(candidates, col)], axis=1)
    tl = centres - half
    shift = np.clip(-tl, 0, None)
    tl = np.clip(tl, 0, None)
    br = np.minimum(centres + (window - half) + shift, dims)
    sums = _box_sums(integral, tl, br)
    best = np.flatnonzero(sums == sums.max())
    if best.size > 1:
        dist = ((centres[best] - centre) ** 2).sum(axis=1)
        best = best[np.argmin(dist) : np.argmin(dist) + 1]
    return int(centres[best[0], 0]), col


# --------------------------------------------------------------------------------------------------
# Model input


@dataclass(frozen=True)
class CropNoise:
    """Window noise of the official augmentation (pixels of the source image).

    Attributes:
        max_crop_noise: Maximum shift of the window (rows, cols).
        max_crop_size_noise: Maximum change of each window border (scaled for the shorter side).
    """

    max_crop_noise: tuple[int, int] = (100, 100)
    max_crop_size_noise: int = 100


NO_NOISE = CropNoise((0, 0), 0)
#: Noise used for training by the official code (``max_crop_noise=(100, 100)``, ``max_crop_size_noise=100``).
TRAIN_NOISE = CropNoise()


def scaled_train_noise(window_shape: Sequence[int]) -> CropNoise:
    """:data:`TRAIN_NOISE` scaled to a window other than 2944x1920 (e.g. reduced-size demos)."""
    scale_y = float(window_shape[0]) / MODEL_INPUT_SHAPE[0]
    scale_x = float(window_shape[1]) / MODEL_INPUT_SHAPE[1]
    return CropNoise(
        (round(TRAIN_NOISE.max_crop_noise[0] * scale_y), round(TRAIN_NOISE.max_crop_noise[1] * scale_x)),
        round(TRAIN_NOISE.max_crop_size_noise * scale_y),
    )


@dataclass(frozen=True)
class Window:
    """Where the model-input window lies in the zero-padded oriented image.

    Attributes:
        pad_top: Zero rows added above the image.
        padded_shape: Shape of the padded image (rows added at top/bottom, columns at the right).
        borders: ``(top, bottom, left, right)`` of the window in padded coordinates (ends exclusive).
    """

    pad_top: int
    padded_shape: tuple[int, int]
    borders: tuple[int, int, int, int]


def _noise_multipliers(rng: Any, n: int) -> np.ndarray:
    return np.asarray(rng.uniform(low=-1.0, high=1.0, size=n), dtype=np.float64)


def sample_window(
    shape: tuple[int, int],
    view: str,
    center: Sequence[int],
    *,
    rng: Any = None,
    noise: CropNoise | None = None,
    window_shape: tuple[int, int] = MODEL_INPUT_SHAPE,
) -> Window:
    """Place the window around ``center`` (official rules), with optional position/size noise.

    Padding rules when the image is smaller than window + noise margin: CC views are padded equally at
    top and bottom, MLO views at the bottom only, and all views on the right only. A window reaching past
    the (padded) image is shifted back inside; the noise then only moves it inwards.

    Args:
        shape: ``(height, width)`` of the oriented image.
        view: ``"L-CC"`` etc.
        center: ``(row, col)`` from :func:`best_center`.
        rng: ``numpy.random.Generator`` or ``RandomState`` (draws in the official order); required when
            the noise is not zero.
        noise: :class:`CropNoise`; ``None`` means no noise (inference).
        window_shape: Window height and width before resizing.
    """
    _, view_name = parse_view(view)
    noise = noise or NO_NOISE
    height, width = int(shape[0]), int(shape[1])
    win_h, win_w = int(window_shape[0]), int(window_shape[1])
    max_noise = np.array(noise.max_crop_noise, dtype=np.int64)
    size_noise = int(noise.max_crop_size_noise)
    if (max_noise.any() or size_noise) and rng is None:
        rng = np.random.default_rng()
    multiplier = np.zeros(2, dtype=np.float64)
    if max_noise.any():
        multiplier = _noise_multipliers(rng, 2)

    center_row, center_col = int(center[0]), int(center[1])
    top = center_row - win_h // 2
    bottom = top + win_h
    left = center_col - win_w // 2
    right = left + win_w

    pad_top = pad_bottom = pad_right = 0
    margin_y = int(max_noise[0]) + size_noise
    margin_x = int(max_noise[1]) + size_noise
    if view_name == "CC":
        if height < win_h + 2 * margin_y:
            total = win_h - height + 2 * margin_y
            pad_top = total // 2
            pad_bottom = total - pad_top
            top, bottom = margin_y, margin_y + win_h
    elif height < win_h + margin_y:
        pad_bottom = win_h - height + margin_y
        top, bottom = 0, win_h
    if width < win_w + margin_x:
        pad_right = win_w - width + margin_x
        left, right = 0, win_w
    padded_h = height + pad_top + pad_bottom
    padded_w = width + pad_right

    if top < 0:
        top, bottom = 0, win_h
    elif bottom > padded_h:
        top, bottom = padded_h - win_h, padded_h
    if left < 0:
        left, right = 0, win_w
    elif right > padded_w:
        left, right = padded_w - win_w, padded_w

    if top == 0:
        multiplier[0] = abs(multiplier[0])
    elif bottom == padded_h:
        multiplier[0] = -abs(multiplier[0])
    if left == 0:
        multiplier[1] = abs(multiplier[1])
    elif right == padded_w:
        multiplier[1] = -abs(multiplier[1])
    vertical_margin = padded_h - bottom if multiplier[0] >= 0 else top
    horizontal_margin = padded_w - right if multiplier[1] >= 0 else left
    max_noise = np.minimum(max_noise, [vertical_margin, horizontal_margin])
    shift = np.round(max_noise * multiplier).astype(np.int64)
    top, bottom = top + int(shift[0]), bottom + int(shift[0])
    left, right = left + int(shift[1]), right + int(shift[1])

    # Size noise: the official code always draws these four numbers, even when the noise is zero.
    size_multiplier = _noise_multipliers(rng, 4) if rng is not None else np.zeros(4)
    size_limit = min(size_noise, top, padded_h - bottom, left, padded_w - right)
    if win_h >= win_w:
        vertical, horizontal = size_limit, int(np.round(size_limit * (win_w / win_h)))
    else:
        vertical, horizontal = int(np.round(size_limit * (win_h / win_w))), size_limit
    deltas = np.round(np.array([vertical, vertical, horizontal, horizontal]) * size_multiplier).astype(
        np.int64
    )
    top, bottom = top + int(deltas[0]), bottom + int(deltas[1])
    left, right = left + int(deltas[2]), right + int(deltas[3])
    if not (0 <= top < bottom <= padded_h and 0 <= left < right <= padded_w):
        raise PreprocessingError(
            f"window {top, bottom, left, right} falls outside the padded image {padded_h, padded_w}"
        )
    return Window(pad_top=pad_top, padded_shape=(padded_h, padded_w), borders=(top, bottom, left, right))


def apply_window(
    image: np.ndarray,
    window: Window,
    out_shape: tuple[int, int] | None = None,
    *,
    interpolation: int = cv2.INTER_CUBIC,
    dtype: Any = np.float32,
) -> np.ndarray:
    """Cut ``window`` out of the (virtually zero-padded) oriented ``image`` and resize to ``out_shape``.

    Args:
        image: Oriented 2-D array (a mirrored view is fine).
        window: From :func:`sample_window`.
        out_shape: Output size; ``None`` keeps the window size. Resizing only happens when the window
            size differs from ``out_shape`` (as in the official code).
        interpolation: ``cv2.INTER_CUBIC`` for images, ``cv2.INTER_NEAREST`` for masks.
        dtype: Output dtype (``float32`` for images, ``uint8`` for masks).
    """
    top, bottom, left, right = window.borders
    out = np.zeros((bottom - top, right - left), dtype=dtype)
    # Window rows/cols in image coordinates.
    img_top, img_bottom = top - window.pad_top, bottom - window.pad_top
    r0, r1 = max(img_top, 0), min(img_bottom, image.shape[0])
    c0, c1 = max(left, 0), min(right, image.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0 - img_top : r1 - img_top, c0 - left : c1 - left] = image[r0:r1, c0:c1]
    if out_shape is not None and out.shape != tuple(out_shape):
        out = cv2.resize(out, (int(out_shape[1]), int(out_shape[0])), interpolation=interpolation)
    return out


def standardize(image: np.ndarray, *, exact: bool = True) -> np.ndarray:
    """Per-image standardisation in place: zero mean, unit std (std floored at 1e-5).

    Args:
        image: Contiguous ``float32`` array, modified in place.
        exact: ``True``: float32 maths exactly like the official code (bit-identical inputs). ``False``:
            one-pass float64 statistics (OpenCV), about 4x faster; differs by at most a few 1e-7.
    """
    if exact:
        image -= image.mean(dtype=np.float32)
        image /= np.maximum(image.std(dtype=np.float32), np.float32(1e-5))
        return image
    count = float(image.size)
    mean = cv2.sumElems(image)[0] / count
    variance = max(cv2.norm(image, cv2.NORM_L2SQR) / count - mean * mean, 0.0)
    image -= np.float32(mean)
    image *= np.float32(1.0 / max(float(np.sqrt(variance)), 1e-5))
    return image


def model_input(
    cropped: np.ndarray,
    view: str,
    best_center: Sequence[int],
    rng: Any = None,
    noise: CropNoise | None = None,
    out_shape: tuple[int, int] = MODEL_INPUT_SHAPE,
    *,
    horizontal_flip: str = "NO",
    window_shape: tuple[int, int] | None = None,
    masks: Sequence[np.ndarray] | None = None,
    auxiliary: Sequence[np.ndarray] | None = None,
    standardize_image: bool = True,
    exact: bool = True,
    window: Window | None = None,
) -> Any:
    """Build the standardised model input from a raw-orientation cropped image (official loader).

    Orient, place the window around ``best_center`` (with noise if given), zero-pad, cut, resize with
    ``cv2.INTER_CUBIC`` when the window differs from ``out_shape``, standardise.

    Args:
        cropped: Raw-orientation cropped image (``CropInfo.cropped``).
        view: ``"L-CC"`` etc.
        best_center: ``(row, col)`` from :func:`best_center`.
        rng: Random generator for the noise (``Generator`` or ``RandomState``).
        noise: :class:`CropNoise`; ``None`` = none (inference, reproduces the official inputs).
        out_shape: Output ``(height, width)``; default ``(2944, 1920)``.
        horizontal_flip: As in :func:`crop_breast`.
        window_shape: Window size in source pixels; default ``out_shape`` (no resize without size noise).
            Use ``(2944, 1920)`` with a smaller ``out_shape`` to feed full-size images to a small model.
        masks: Optional raw-orientation masks of the same shape as ``cropped``; they go through the same
            geometry with nearest-neighbour interpolation.
        auxiliary: Optional raw-orientation float channels of the same shape as ``cropped`` (DMV-CNN's heat
            maps): oriented, windowed and resized exactly like the image, not standardised, and returned
            stacked after it.
        standardize_image: Set ``False`` to get the un-standardised float32 window.
        exact: Standardise with the official float32 maths (default) or the faster float64 statistics
            (see :func:`standardize`; used for training samples).
        window: A window already placed by :func:`sample_window` for this image (``rng`` and ``noise`` are
            then unused), so that a caller can keep the geometry of the input it gets.

    Returns:
        ``float32`` array of ``out_shape`` (with ``auxiliary``: ``(1 + A, *out_shape)``, the image first); with
        ``masks``, a tuple ``(that array, masks_uint8 (K, H, W))``.
    """
    image = _check_image(cropped, "cropped image")
    oriented = orient(image, view, horizontal_flip)
    if window is None:
        win_shape = tuple(window_shape) if window_shape is not None else tuple(out_shape)
        window = sample_window(
            oriented.shape,
            view,
            best_center,
            rng=rng,
            noise=noise,
            window_shape=(int(win_shape[0]), int(win_shape[1])),
        )
    out = apply_window(oriented, window, out_shape)
    if standardize_image:
        standardize(out, exact=exact)
    if auxiliary is not None:
        channels = [out]
        for index, aux in enumerate(auxiliary):
            if aux.shape != image.shape:
                raise PreprocessingError(
                    f"auxiliary channel {index} has shape {aux.shape}, image has {image.shape}"
                )
            oriented_aux = orient(np.asarray(aux, dtype=np.float32), view, horizontal_flip)
            channels.append(apply_window(oriented_aux, window, out_shape))
        out = np.stack(channels)
    if masks is None:
        return out
    mask_out = np.zeros((len(masks), int(out_shape[0]), int(out_shape[1])), dtype=np.uint8)
    for index, mask in enumerate(masks):
        if mask.shape != image.shape:
            raise PreprocessingError(f"mask {index} has shape {mask.shape}, image has {image.shape}")
        oriented_mask = orient(np.asarray(mask) > 0, view, horizontal_flip).astype(np.uint8)
        mask_out[index] = apply_window(
            oriented_mask, window, out_shape, interpolation=cv2.INTER_NEAREST, dtype=np.uint8
        )
    return out, mask_out


def cbis_ddsm_input(
    image: np.ndarray,
    view: str,
    out_shape: tuple[int, int] = MODEL_INPUT_SHAPE,
    *,
    horizontal_flip: str = "NO",
    iterations: int = 100,
    threshold: float = 0,
) -> np.ndarray:
    """The CBIS-DDSM preprocessing of the GMIC paper (section 3.1), as a named alternative.

    Largest connected component of ``image > threshold`` after erosion/dilation (no buffers), crop to
    its bounding box, orient to face right, resize to ``out_shape`` (cubic), scale to ``[0, 1]``.

    Returns:
        ``float32`` array of ``out_shape`` with values in ``[0, 1]``.
    """
    arr = _check_image(image)
    largest = _breast_mask(arr, threshold, iterations)
    rows = np.flatnonzero(largest.any(axis=1))
    cols = np.flatnonzero(largest.any(axis=0))
    crop = arr[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    oriented = np.ascontiguousarray(orient(crop, view, horizontal_flip), dtype=np.float32)
    size = (int(out_shape[1]), int(out_shape[0]))
    resized = np.asarray(cv2.resize(oriented, size, interpolation=cv2.INTER_CUBIC), dtype=np.float32)
    low, high = float(resized.min()), float(resized.max())
    resized -= low
    if high > low:
        resized /= high - low
    return np.clip(resized, 0.0, 1.0, out=resized)
