"""Saliency aggregation, greedy region-of-interest retrieval and batched patch extraction.

Everything here is tensor-only and batched over images (and over patches for the crop): no numpy, no
``.item()``, no per-crop Python loop. The greedy selection loops over the K steps only, which is inherently
sequential.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Value written over already-selected windows before the next greedy step. Normalised maps lie in
# [0, num_classes], so any window touching a selected one scores far below every free window.
_FORBIDDEN = -1.0e4


def reflect_on_cells(
    x: torch.Tensor,
    grid_hw: tuple[int, int],
    stride: int,
    origin: int = 0,
    dims: tuple[int, ...] = (-2, -1),
) -> torch.Tensor:
    """``x`` (N, C, H, W) mirrored along ``dims`` (``-2`` rows, ``-1`` columns) about the lines that take
    saliency cell ``i`` of an ``h``-cell axis onto cell ``h-1-i``; both axes: a 180-degree rotation.

    Cell ``i`` is centred on pixel ``stride * i + origin``, so the reflection maps pixel ``p`` to ``c - p`` with
    ``c = stride * (h - 1) + 2 * origin``: a plain flip shifted by ``H - 1 - c`` pixels, the pixels shifted in at
    the far edge repeating the edge. The maps computed on the result, flipped along ``dims``, lie on the input's
    own cells exactly; a plain flip would leave them ``H - 1 - c`` pixels (about a cell) off.

    Raises:
        ValueError: the grid's last cell centre lies outside the input (``H - 1 < c``) along a mirrored axis.
    """
    shift = {-2: 0, -1: 0}
    for d, cells in zip((-2, -1), grid_hw, strict=True):
        if d in dims:
            shift[d] = x.shape[d] - 1 - (stride * (cells - 1) + 2 * origin)
    if min(shift.values()) < 0:
        raise ValueError(
            f"a {grid_hw[0]}x{grid_hw[1]} grid of stride {stride} (origin {origin}) does not fit a "
            f"{x.shape[-2]}x{x.shape[-1]} input"
        )
    flipped = x.flip(dims)[..., shift[-2] :, shift[-1] :]
    return F.pad(flipped, (0, shift[-1], 0, shift[-2]), mode="replicate")


def point_reflect(x: torch.Tensor, grid_hw: tuple[int, int], stride: int, origin: int = 0) -> torch.Tensor:
    """``x`` rotated by 180 degrees about the point that takes saliency cell ``(i, j)`` of an ``(h, w)`` grid
    onto cell ``(h-1-i, w-1-j)``: :func:`reflect_on_cells` along both axes."""
    return reflect_on_cells(x, grid_hw, stride, origin, (-2, -1))


def top_t_count(h: int, w: int, percent_t: float) -> int:
    """Number of saliency positions averaged by top-t% pooling: ``round(t * h * w)``, at least 1."""
    return max(1, int(round(h * w * percent_t)))


def top_t_pool(saliency: torch.Tensor, percent_t: float) -> torch.Tensor:
    """Mean of the largest ``round(t*h*w)`` values of each map.

    Args:
        saliency: ``(N, C, h, w)``.
        percent_t: fraction in (0, 1]; 1 gives global average pooling, ``1/(h*w)`` global max pooling.

    Returns:
        ``(N, C)``.
    """
    n, c, h, w = saliency.shape
    k = top_t_count(h, w, percent_t)
    flat = saliency.reshape(n, c, h * w)
    if k == h * w:
        return flat.mean(dim=2)
    if k == 1:
        return flat.amax(dim=2)
    return flat.topk(k, dim=2, sorted=False).values.mean(dim=2)


def window_on_grid(
    crop_hw: tuple[int, int], grid_hw: tuple[int, int], input_hw: tuple[int, int]
) -> tuple[int, int]:
    """Crop size mapped onto the saliency grid: ``round(crop * grid / input)`` per axis, at least 1."""
    return tuple(  # type: ignore[return-value]
        max(1, int(round(c * g / i))) for c, g, i in zip(crop_hw, grid_hw, input_hw, strict=True)
    )


def normalize_saliency(saliency: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each class map over its own positions and sum over classes: ``(N, h, w)``.

    A constant map (max == min) normalises to zeros instead of NaN.
    """
    flat = saliency.flatten(2)
    lo = flat.amin(dim=2, keepdim=True)
    span = flat.amax(dim=2, keepdim=True) - lo
    norm = torch.where(
        span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat)
    )
    return norm.sum(dim=1).reshape(saliency.shape[0], *saliency.shape[2:])


def greedy_windows(
    score_map: torch.Tensor, window: tuple[int, int], k: int, overlap: str = "forbid"
) -> torch.Tensor:
    """Pick ``k`` windows greedily, each the highest-average window given the previous picks.

    Ties go to the first window in row-major order (as ``argmax`` does, and as the reference does).

    Args:
        score_map: ``(N, h, w)``, non-negative (e.g. :func:`normalize_saliency`).
        window: window size on the grid.
        k: number of windows.
        overlap: ``"forbid"`` - a window overlapping an earlier pick is never chosen while a free one
            exists; ``"official"`` - earlier picks are only zeroed, exactly like the official code, which can
            pick a window that overlaps an earlier one when the map is flat around it. Both agree whenever
            the official rule picks disjoint windows (every fixture case).

    Returns:
        ``(N, k, 2)`` int64 upper-left ``(row, col)`` on the grid, in selection order.
    """
    if overlap not in ("forbid", "official"):
        raise ValueError(f"overlap must be 'forbid' or 'official', got {overlap!r}")
    n, h, w = score_map.shape
    wh, ww = min(window[0], h), min(window[1], w)
    fill = _FORBIDDEN if overlap == "forbid" else 0.0
    rows = torch.arange(h, device=score_map.device).view(1, h, 1)
    cols = torch.arange(w, device=score_map.device).view(1, 1, w)
    current = score_map.clone()
    picks = []
    for _ in range(k):
        avg = F.avg_pool2d(current.unsqueeze(1), (wh, ww), stride=1).squeeze(1)  # (N, h-wh+1, w-ww+1)
        idx = avg.flatten(1).argmax(dim=1)
        r, c = idx // avg.shape[2], idx % avg.shape[2]
        picks.append(torch.stack([r, c], dim=1))
        inside = (
            (rows >= r.view(n, 1, 1))
            & (rows < (r + wh).view(n, 1, 1))
            & (cols >= c.view(n, 1, 1))
            & (cols < (c + ww).view(n, 1, 1))
        )
        current = current.masked_fill(inside, fill)
    return torch.stack(picks, dim=1)


def random_windows(
    n: int,
    grid_hw: tuple[int, int],
    window: tuple[int, int],
    k: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniformly random upper-left grid positions (ablation: patches not guided by saliency)."""
    hi = torch.tensor([max(1, grid_hw[0] - window[0] + 1), max(1, grid_hw[1] - window[1] + 1)])
    u = torch.rand((n, k, 2), generator=generator)
    return (u * hi).long().clamp_max(hi - 1).to(device)


def grid_to_pixels(
    grid_pos: torch.Tensor,
    grid_hw: tuple[int, int],
    input_hw: tuple[int, int],
    *,
    centered: bool = False,
    crop_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Map grid upper-left corners to input pixels: ``round(pos / grid * input)`` (half to even), int64.

    That is the reference's rule. Cell ``i`` of a stride-``s`` network is centred on pixel ``s·i``
    (:mod:`mammogmic.evaluation.localization`), so a patch of ``w`` cells' size starting at pixel ``s·i`` lies half
    a cell after the cells it was chosen for. ``centered`` moves it back by half a cell, so its centre falls on
    the centre of those cells, kept inside the image (``crop_hw`` needed).
    """
    # (pos / grid) * input, in float64 like the reference's numpy arithmetic.
    grid = torch.tensor(grid_hw, dtype=torch.float64, device=grid_pos.device)
    size = torch.tensor(input_hw, dtype=torch.float64, device=grid_pos.device)
    prop = (grid_pos.double() - (0.5 if centered else 0.0)) / grid
    pixels = torch.round(prop * size).long()
    if centered:
        if crop_hw is None:
            raise ValueError("centered patches need crop_hw")
        limit = torch.tensor(
            [max(0, input_hw[0] - crop_hw[0]), max(0, input_hw[1] - crop_hw[1])], device=grid_pos.device
        )
        pixels = torch.minimum(pixels.clamp_min(0), limit)
    return pixels


def _axis_index(start: torch.Tensor, size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and validity along one axis for crops that may leave the image.

    Follows the reference: the window ``[start, start+size)`` is clipped to ``[0, length)`` and the real pixels
    are placed at the *end* of the output (the rest is background).
    """
    lo = start.clamp(0, length)
    hi = (start + size).clamp(0, length)
    origin = size - (hi - lo)  # (...,)
    i = torch.arange(size, device=start.device)
    src = lo.unsqueeze(-1) + i - origin.unsqueeze(-1)  # (..., size)
    valid = i >= origin.unsqueeze(-1)
    return src.clamp(0, max(length - 1, 0)), valid


def crop_patches(x: torch.Tensor, locations: torch.Tensor, crop_hw: tuple[int, int]) -> torch.Tensor:
    """Cut ``crop_hw`` patches at upper-left ``locations`` from every channel of ``x``, in one gather.

    Args:
        x: ``(N, C, H, W)``.
        locations: ``(N, K, 2)`` int64 upper-left ``(row, col)`` in pixels.
        crop_hw: patch size.

    Returns:
        ``(N, K, C, crop_h, crop_w)``. Area outside the image holds the image's minimum (per image, over
        all channels), as in the reference.
    """
    n, c, hh, ww = x.shape
    rows, row_ok = _axis_index(locations[..., 0], crop_hw[0], hh)  # (N, K, ch)
    cols, col_ok = _axis_index(locations[..., 1], crop_hw[1], ww)  # (N, K, cw)
    flat = (rows.unsqueeze(-1) * ww + cols.unsqueeze(-2)).flatten(1)  # (N, K*ch*cw)
    k = locations.shape[1]
    patches = x.flatten(2).gather(2, flat.unsqueeze(1).expand(n, c, -1))  # (N, C, K*ch*cw)
    patches = patches.view(n, c, k, crop_hw[0], crop_hw[1]).transpose(1, 2)
    ok = (row_ok.unsqueeze(-1) & col_ok.unsqueeze(-2)).unsqueeze(2)  # (N, K, 1, ch, cw)
    background = x.flatten(1).amin(dim=1).view(n, 1, 1, 1, 1)
    return torch.where(ok, patches, background)
