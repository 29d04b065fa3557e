from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mammogmic.models.roi import (
    crop_patches,
    greedy_windows,
    grid_to_pixels,
    normalize_saliency,
    point_reflect,
    reflect_on_cells,
    top_t_count,
    top_t_pool,
    window_on_grid,
)


def brute_force_windows(score: np.ndarray, window: tuple[int, int], k: int) -> list[tuple[int, int]]:
    """Reference rule by exhaustive search: highest-average window not overlapping earlier picks,
    first in row-major order on ties (falls back to all windows if none is free)."""
    h, w = score.shape
    wh, ww = window
    picks: list[tuple[int, int]] = []
    for _ in range(k):
        best, best_val = None, -np.inf
        candidates = list(itertools.product(range(h - wh + 1), range(w - ww + 1)))
        free = [
            (r, c)
            for r, c in candidates
            if all(r + wh <= pr or pr + wh <= r or c + ww <= pc or pc + ww <= c for pr, pc in picks)
        ]
        for r, c in free or candidates:
            val = score[r : r + wh, c : c + ww].mean()
            if val > best_val:
                best, best_val = (r, c), val
        assert best is not None
        picks.append(best)
    return picks


@pytest.mark.parametrize("seed", range(8))
def test_greedy_equals_brute_force_and_never_overlaps(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    h, w = int(torch.randint(8, 20, (1,), generator=gen)), int(torch.randint(6, 16, (1,), generator=gen))
    window = (int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(1, 5, (1,), generator=gen)))
    saliency = torch.rand(3, 2, h, w, generator=gen, dtype=torch.float64)
    score = normalize_saliency(saliency)
    picks = greedy_windows(score, window, 5)
    for n in range(3):
        expected = brute_force_windows(score[n].numpy(), window, 5)
        assert picks[n].tolist() == [list(p) for p in expected]
        for (r1, c1), (r2, c2) in itertools.combinations(picks[n].tolist(), 2):
            assert (
                r1 + window[0] <= r2 or r2 + window[0] <= r1 or c1 + window[1] <= c2 or c2 + window[1] <= c1
            )


def test_official_rule_can_overlap_but_forbid_does_not() -> None:
    # A single bright 5x5 block with a 4x4 window: zeroing leaves a 1-wide bright strip whose best window
    # overlaps the first pick under the official rule.
    score = torch.zeros(1, 12, 12)
    score[0, 2:7, 2:7] = 1.0
    official = greedy_windows(score, (4, 4), 2, overlap="official")[0].tolist()
    forbid = greedy_windows(score, (4, 4), 2, overlap="forbid")[0].tolist()
    assert official[0] == forbid[0] == [2, 2]
    (r1, c1), (r2, c2) = official
    assert not (r1 + 4 <= r2 or r2 + 4 <= r1 or c1 + 4 <= c2 or c2 + 4 <= c1)  # official overlaps
    (r1, c1), (r2, c2) = forbid
    assert r1 + 4 <= r2 or r2 + 4 <= r1 or c1 + 4 <= c2 or c2 + 4 <= c1


def test_ties_pick_first_in_row_major_order() -> None:
    score = torch.zeros(1, 6, 6)
    picks = greedy_windows(score, (2, 2), 3)
    assert picks[0].tolist() == [[0, 0], [0, 2], [0, 4]]


def test_normalize_constant_map_is_zero_not_nan() -> None:
    out = normalize_saliency(torch.full((2, 2, 4, 3), 0.5))
    assert torch.equal(out, torch.zeros(2, 4, 3))


def test_top_t_special_cases() -> None:
    x = torch.rand(4, 2, 7, 5)
    assert torch.allclose(top_t_pool(x, 1.0), x.mean(dim=(2, 3)))
    assert torch.equal(top_t_pool(x, 1 / 35), x.amax(dim=(2, 3)))
    k = top_t_count(7, 5, 0.2)
    assert k == 7
    expected = x.flatten(2).sort(dim=2, descending=True).values[..., :k].mean(dim=2)
    assert torch.allclose(top_t_pool(x, 0.2), expected)


def test_released_top_t_counts() -> None:
    assert [top_t_count(46, 30, t) for t in (0.02, 0.03, 0.05, 0.1)] == [28, 41, 69, 138]


def test_grid_mapping() -> None:
    assert window_on_grid((256, 256), (46, 30), (2944, 1920)) == (4, 4)
    pos = torch.tensor([[[7, 2], [42, 26]]])
    assert grid_to_pixels(pos, (46, 30), (2944, 1920)).tolist() == [[[448, 128], [2688, 1664]]]
    # Every cell of the released grid maps to 64 * cell exactly, although pos / 46 * 2944 in float64 is
    # sometimes a hair below the integer (so flooring would be off by one pixel there).
    rows, cols = torch.meshgrid(torch.arange(46), torch.arange(30), indexing="ij")
    every = torch.stack([rows.flatten(), cols.flatten()], dim=1)[None]  # (1, 1380, 2)
    assert torch.equal(grid_to_pixels(every, (46, 30), (2944, 1920)), every * 64)
    # Not a multiple: 1 / 3 * 50 = 16.67 rounds to 17; 2 / 5 * 100 = 40.
    assert grid_to_pixels(torch.tensor([[[2, 1]]]), (5, 3), (100, 50)).tolist() == [[[40, 17]]]


def loop_crop(img: np.ndarray, r: int, c: int, ch: int, cw: int) -> np.ndarray:
    """Reference crop: clip the window to the image, put real pixels at the end, fill with the minimum."""
    H, W = img.shape
    r0, r1 = min(max(r, 0), H), min(max(r + ch, 0), H)
    c0, c1 = min(max(c, 0), W), min(max(c + cw, 0), W)
    out = np.full((ch, cw), img.min(), img.dtype)
    out[ch - (r1 - r0) :, cw - (c1 - c0) :] = img[r0:r1, c0:c1]
    return out


def test_crop_patches_matches_loop_including_borders() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 40, 30, generator=gen)
    locs = torch.tensor(
        [[[0, 0], [32, 25], [-3, 5], [10, -4], [38, 29]], [[5, 5], [36, 0], [0, 26], [20, 20], [-8, -8]]]
    )
    patches = crop_patches(x, locs, (8, 6))
    assert patches.shape == (2, 5, 1, 8, 6)
    for n in range(2):
        for k in range(5):
            r, c = locs[n, k].tolist()
            np.testing.assert_array_equal(patches[n, k, 0].numpy(), loop_crop(x[n, 0].numpy(), r, c, 8, 6))


def test_crop_patches_multichannel_and_gradient() -> None:
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    locs = torch.tensor([[[2, 3], [8, 8]]])
    patches = crop_patches(x, locs, (4, 4))
    assert torch.equal(patches[0, 1], x[0, :, 8:12, 8:12])
    patches.sum().backward()
    assert x.grad is not None and float(x.grad.sum()) == 2 * 3 * 16


def test_centered_patches_sit_on_the_cells_they_were_chosen_for() -> None:
    """Official: patch at stride × cell (half a cell late); centered: patch centre on the cells' centres."""
    from mammogmic.models.roi import grid_to_pixels

    grid_pos = torch.tensor([[[3, 2], [0, 0], [7, 4]]])
    official = grid_to_pixels(grid_pos, (8, 5), (256, 160))
    assert official[0].tolist() == [[96, 64], [0, 0], [224, 128]]
    centered = grid_to_pixels(grid_pos, (8, 5), (256, 160), centered=True, crop_hw=(64, 64))
    # a 2x2-cell window at cells (3, 2): cell centres at pixels 96..128 rows, 64..96 cols -> centre (112, 80);
    # a 64-pixel patch centred there starts at (80, 48) = official - half a cell (16 px)
    assert centered[0, 0].tolist() == [80, 48]
    assert centered[0, 1].tolist() == [0, 0]  # kept inside the image
    assert centered[0, 2].tolist() == [192, 96]  # last cells: clamped to input - crop
    with pytest.raises(ValueError, match="crop_hw"):
        grid_to_pixels(grid_pos, (8, 5), (256, 160), centered=True)


@pytest.mark.parametrize("dims", [(-2, -1), (-2,), (-1,)])
@pytest.mark.parametrize(
    ("hw", "grid", "stride", "origin"),
    [((512, 320), (16, 10), 32, 0), ((256, 192), (4, 3), 64, 2), ((500, 300), (16, 10), 32, 0)],
)
def test_reflection_takes_each_cell_centre_to_the_mirrored_cell(
    hw: tuple[int, int], grid: tuple[int, int], stride: int, origin: int, dims: tuple[int, ...]
) -> None:
    for i, j in [(0, 0), (1, 2), (grid[0] - 1, grid[1] - 1)]:
        x = torch.zeros(1, 1, *hw)
        x[0, 0, stride * i + origin, stride * j + origin] = 1.0
        centre = [stride * (n - 1) + 2 * origin for n in grid]  # p goes to centre - p along a mirrored axis
        mirrored = reflect_on_cells(x, grid, stride, origin, dims)
        if dims == (-2, -1):
            assert torch.equal(mirrored, point_reflect(x, grid, stride, origin))
        # (beyond centre the edge repeats, a (0, 0) impulse with it)
        hit = (mirrored[0, 0, : centre[0] + 1, : centre[1] + 1] == 1).nonzero().tolist()
        row = stride * (grid[0] - 1 - i) + origin if -2 in dims else stride * i + origin
        col = stride * (grid[1] - 1 - j) + origin if -1 in dims else stride * j + origin
        assert hit == [[row, col]]


def test_point_reflection_undoes_itself_up_to_the_centre_line() -> None:
    x = torch.randn(2, 1, 512, 320)
    twice = point_reflect(point_reflect(x, (16, 10), 32), (16, 10), 32)
    # Pixel p goes to c - p (c = 480 along the rows, 288 along the columns); beyond c the edge repeats.
    assert torch.equal(twice[..., :481, :289], x[..., :481, :289])
    assert not torch.equal(twice, x)
    with pytest.raises(ValueError, match="does not fit"):
        point_reflect(x, (17, 10), 32)
