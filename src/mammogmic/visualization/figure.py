"""The GMIC explanation figure for one image (as in the paper's qualitative figures).

Panels, top row: the input; the patch map (the K retrieved windows drawn on the image, numbered by rank); the
benign and the malignant saliency maps over the image, with a colour bar of the saliency scale. Ground-truth
outlines (green benign, red malignant) are drawn on every top-row panel when masks are given. Saliency cells are
drawn centred on their receptive-field centres (cell ``(i, j)`` of a stride-``s`` map on pixel ``(s·i, s·j)``,
:mod:`mammogmic.evaluation.localization`) and are transparent where the map is low. Right-breast views are shown
mirrored (facing right, as the model sees them) and say so. Bottom row: the K patches with their attention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from mammogmic.visualization.overlay import (
    BENIGN_COLOR,
    MALIGNANT_COLOR,
    PATCH_COLORS,
    display_scale,
    saliency_alpha,
    saliency_colormap,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["gmic_figure", "save_gmic_figure"]

_MAX_DISPLAY_ROWS = 1200  # images are subsampled for drawing; coordinates stay in input pixels


def _array(x: Any) -> NDArray[Any]:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _display(image: NDArray[Any]) -> tuple[NDArray[np.float32], int]:
    """Subsample a large image for drawing and scale it to [0, 1] by its 0.5/99.5 percentiles."""
    step = max(1, int(np.ceil(image.shape[0] / _MAX_DISPLAY_ROWS)))
    return display_scale(image[::step, ::step]), step


def gmic_figure(
    image: ArrayLike,
    saliency: ArrayLike,
    patch_locations: ArrayLike,
    crop_size: Sequence[int],
    patch_attention: ArrayLike,
    patches: ArrayLike | None = None,
    benign_mask: ArrayLike | None = None,
    malignant_mask: ArrayLike | None = None,
    scores: Mapping[str, float] | None = None,
    title: str | None = None,
    panel_width: float = 2.6,
    mirrored: bool = False,
) -> Figure:
    """Build the explanation figure.

    Args:
        image: ``(H, W)`` model input (any intensity scale; it is percentile-scaled for display).
        saliency: ``(2, h, w)`` benign/malignant saliency in [0, 1]; drawn over the image by nearest
            neighbour (each cell covers ``H/h × W/w`` pixels).
        patch_locations: ``(K, 2)`` upper-left ``(row, col)`` of each patch in input pixels.
        crop_size: ``(crop_h, crop_w)`` of the patches.
        patch_attention: ``(K,)`` attention weight of each patch.
        patches: ``(K, crop_h, crop_w)`` patches; cut from ``image`` when omitted.
        benign_mask: ``(H, W)`` benign lesion mask (nonzero = lesion), outlined in green.
        malignant_mask: ``(H, W)`` malignant lesion mask, outlined in red.
        scores: e.g. ``{"benign": 0.12, "malignant": 0.87}``, shown in the title.
        title: figure title (e.g. the image id).
        panel_width: width of each top-row panel in inches.
        mirrored: the image was mirrored left-right to face right (right views): said in the input panel.

    Returns:
        A matplotlib ``Figure`` (not attached to pyplot, so it works under any backend).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    img = _array(image)
    if img.ndim == 3 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 2:
        raise ValueError(f"image must be (H, W), got shape {img.shape}")
    sal = _array(saliency).astype(np.float32)
    if sal.ndim != 3 or sal.shape[0] != 2:
        raise ValueError(f"saliency must be (2, h, w), got shape {sal.shape}")
    locations = _array(patch_locations).astype(int).reshape(-1, 2)
    attention = _array(patch_attention).astype(float).reshape(-1)
    if attention.shape[0] != locations.shape[0]:
        raise ValueError(f"{locations.shape[0]} patch locations but {attention.shape[0]} attention weights")
    crop_h, crop_w = int(crop_size[0]), int(crop_size[1])
    height, width = img.shape
    if patches is None:
        padded = np.pad(img, ((0, crop_h), (0, crop_w)))
        crops = (
            np.stack([padded[r : r + crop_h, c : c + crop_w] for r, c in locations])
            if len(locations)
            else None
        )
    else:
        crops = _array(patches)
        if crops.ndim == 4:
            crops = crops[:, 0]
    k = locations.shape[0]
    shown, step = _display(img)
    extent = (0, width, height, 0)

    panel_h = panel_width * height / width
    fig_w = 4 * panel_width
    patch_w = fig_w / max(4, k)
    fig = Figure(figsize=(fig_w, panel_h + patch_w * 1.25 + 0.6), dpi=150)
    outer = fig.add_gridspec(2, 1, height_ratios=[panel_h, patch_w * 1.25])
    top_grid = outer[0].subgridspec(1, 4)
    bottom_grid = outer[1].subgridspec(1, max(4, k))
    top = [fig.add_subplot(top_grid[0, i]) for i in range(4)]

    def base(ax: Any, name: str) -> None:
        ax.imshow(shown, cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="bilinear")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])

    base(top[0], "input (mirrored: right breast)" if mirrored else "input")
    outlines = []
    for mask, color, name in (
        (benign_mask, BENIGN_COLOR, "benign"),
        (malignant_mask, MALIGNANT_COLOR, "malignant"),
    ):
        if mask is None:
            continue
        m = _array(mask)
        if m.shape != img.shape:
            raise ValueError(f"{name} mask has shape {m.shape}, the image {img.shape}")
        small = (m[::step, ::step] != 0).astype(np.float32)
        if small.any():
            outlines.append((small, color, name))

    def outline(ax: Any, legend: bool) -> None:
        for small, color, name in outlines:
            ys = (np.arange(small.shape[0]) + 0.5) * step
            xs = (np.arange(small.shape[1]) + 0.5) * step
            ax.contour(xs, ys, small, levels=[0.5], colors=[color], linewidths=1.0)
            if legend:
                ax.plot([], [], color=color, label=f"{name} lesion")
        if legend and outlines:
            ax.legend(loc="lower right", fontsize=6, framealpha=0.6)

    outline(top[0], legend=True)

    base(top[1], f"patch map (K={k})")
    for i, (row, col) in enumerate(locations):
        color = PATCH_COLORS[i % len(PATCH_COLORS)]
        top[1].add_patch(Rectangle((col, row), crop_w, crop_h, fill=False, edgecolor=color, linewidth=1.2))
        top[1].text(
            col + 4, row + 4, str(i + 1), color=color, fontsize=6, va="top", ha="left", fontweight="bold"
        )
    outline(top[1], legend=False)
    top[1].set_xlim(0, width)
    top[1].set_ylim(height, 0)

    # Cell (i, j) centred on pixel (s_y·i, s_x·j): the map's extent is shifted by half a cell.
    sy, sx = height / sal.shape[1], width / sal.shape[2]
    cell_extent = (-sx / 2, width - sx / 2, height - sy / 2, -sy / 2)
    for ax, cls, name in ((top[2], 0, "benign"), (top[3], 1, "malignant")):
        base(ax, f"saliency: {name}  (max {sal[cls].max():.2f})")
        # Transparent where the map is low (mammogmic.visualization.overlay), so the breast stays visible.
        layer = ax.imshow(
            sal[cls],
            cmap=saliency_colormap(name),
            vmin=0,
            vmax=1,
            alpha=saliency_alpha(sal[cls]),
            extent=cell_extent,
            interpolation="nearest",
        )
        outline(ax, legend=False)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        bar = fig.colorbar(layer, ax=ax, fraction=0.046, pad=0.02)
        bar.solids.set_alpha(1.0)  # type: ignore[union-attr]
        bar.ax.tick_params(labelsize=6)

    order = np.argsort(-attention) if k else np.array([], dtype=int)
    for j, i in enumerate(order):
        ax = fig.add_subplot(bottom_grid[0, j])
        if crops is not None:
            ax.imshow(crops[i], cmap="gray", interpolation="nearest")
        color = PATCH_COLORS[i % len(PATCH_COLORS)]
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(2)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"patch {i + 1}\nattention {attention[i]:.3f}", fontsize=7)

    heading = title or ""
    if scores:
        heading += ("  —  " if heading else "") + ", ".join(f"{k_}: {v:.3f}" for k_, v in scores.items())
    if heading:
        fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    return fig


def save_gmic_figure(path: str | Path, dpi: int = 150, **kwargs: Any) -> Path:
    """Build :func:`gmic_figure` with ``kwargs`` and save it as PNG at ``dpi`` (readable, not print size)."""
    fig = gmic_figure(**kwargs)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out
