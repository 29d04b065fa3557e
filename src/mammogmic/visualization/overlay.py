"""How saliency and images are drawn, for the explanation figure and the exam report alike.

* **Saliency colours.** A map value is a probability in [0, 1]. It is drawn with the class's colour map
  (benign green, malignant red), fully transparent at and below :data:`SALIENCY_LOW` and more opaque with
  the value up to :data:`SALIENCY_MAX_ALPHA`, so the breast stays visible where the map is low. The colour
  maps start at a saturated shade, so that a low but visible value is never drawn as near-white tissue.
* **Greyscale.** Images are scaled to [0, 1] by their 0.5 / 99.5 percentiles.
* **Orientation.** The model sees every view facing right (chest wall at the left edge, official
  convention). A radiologist hangs the right breast's views on the left, facing left, back to back with the
  left breast's: :func:`hanging_mirror` says which views to mirror back for display.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:
    from matplotlib.colors import Colormap

__all__ = [
    "BENIGN_COLOR",
    "CLASSES",
    "MALIGNANT_COLOR",
    "PATCH_COLORS",
    "SALIENCY_LOW",
    "SALIENCY_MAX_ALPHA",
    "display_scale",
    "hanging_mirror",
    "mask_outline",
    "saliency_alpha",
    "saliency_colormap",
    "saliency_rgba",
]

CLASSES = ("benign", "malignant")  # channel order of GMIC's saliency maps and predictions
BENIGN_COLOR = "#2ca02c"
MALIGNANT_COLOR = "#d62728"
PATCH_COLORS = ("#1f77b4", "#ff7f0e", "#9467bd", "#17becf", "#e377c2", "#bcbd22", "#8c564b", "#7f7f7f")
#: Saliency at or below this value is not drawn at all.
SALIENCY_LOW = 0.2
#: Opacity of a saliency value of 1.
SALIENCY_MAX_ALPHA = 0.85
_CMAP_NAMES = {"benign": "Greens", "malignant": "Reds"}
_CMAP_START = 0.35  # first shade of the base colour map that is used (lighter ones read as bright tissue)


def saliency_alpha(values: ArrayLike) -> NDArray[np.float32]:
    """Opacity of saliency ``values``: 0 up to :data:`SALIENCY_LOW`, then linear to :data:`SALIENCY_MAX_ALPHA`."""
    v = np.asarray(values, dtype=np.float32)
    return (np.clip((v - SALIENCY_LOW) / (1.0 - SALIENCY_LOW), 0.0, 1.0) * SALIENCY_MAX_ALPHA).astype(
        np.float32
    )


def saliency_colormap(name: str) -> Colormap:
    """The colour map of class ``name`` (``benign`` or ``malignant``) over the saliency range [0, 1]."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    if name not in _CMAP_NAMES:
        raise ValueError(f"saliency class must be one of {sorted(_CMAP_NAMES)}, got {name!r}")
    base = colormaps[_CMAP_NAMES[name]]
    return ListedColormap(base(np.linspace(_CMAP_START, 1.0, 256)), name=f"saliency_{name}")


def saliency_rgba(values: ArrayLike, name: str, weight: ArrayLike | None = None) -> NDArray[np.uint8]:
    """``(..., 4)`` uint8 RGBA of saliency ``values`` in class ``name``'s colours and opacity.

    Args:
        values: saliency in [0, 1] (any shape).
        name: ``benign`` or ``malignant``.
        weight: optional factor in [0, 1] on the opacity (same shape), e.g. 0 outside the breast.
    """
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    rgba = saliency_colormap(name)(v)  # float64 (..., 4)
    alpha = saliency_alpha(v)
    if weight is not None:
        alpha = alpha * np.clip(np.asarray(weight, dtype=np.float32), 0.0, 1.0)
    rgba[..., 3] = alpha
    out: NDArray[np.uint8] = np.round(rgba * 255).astype(np.uint8)
    return out


def display_scale(image: ArrayLike) -> NDArray[np.float32]:
    """An image (any intensity scale) as float32 in [0, 1], scaled by its 0.5 / 99.5 percentiles."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    scaled: NDArray[np.float32] = np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0).astype(
        np.float32
    )
    return scaled


def hanging_mirror(view: str | None) -> bool:
    """Whether a view (``R-CC``, ``L-MLO``...) as the model sees it is mirrored for hanging.

    Right-breast views: yes (hung facing left, chest wall toward the middle); left-breast views: no.
    """
    return bool(view) and str(view).strip().upper().startswith("R")


def mask_outline(mask: ArrayLike) -> NDArray[np.bool_]:
    """The boundary pixels of a binary mask (mask pixels with a 4-neighbour outside it)."""
    m = np.asarray(mask) != 0
    padded = np.pad(m, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    out: NDArray[np.bool_] = m & ~inner
    return out
