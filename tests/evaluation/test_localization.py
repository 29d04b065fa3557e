"""Dice between saliency maps and masks on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from mammogmic.evaluation.localization import (
    DiceResult,
    PeakOffsets,
    dice_scores,
    negative_marks,
    peak_offsets,
    specific_dice,
    upsample_aligned,
    upsample_nearest,
)


def test_upsample_nearest_repeats_blocks() -> None:
    maps = np.array([[1.0, 2.0], [3.0, 4.0]])
    up = upsample_nearest(maps, (4, 6))
    expected = np.repeat(np.repeat(maps, 2, axis=0), 3, axis=1)
    np.testing.assert_array_equal(up, expected)


def test_dice_by_hand() -> None:
    # 2x2 saliency → 4x4 image: each cell covers a 2x2 block.
    sal = np.zeros((1, 2, 2, 2), dtype=np.float32)
    sal[0, 1, 0, 0] = 1.0  # malignant: top-left block fully salient
    sal[0, 1, 0, 1] = 0.25  # top-right block weakly salient
    masks = np.zeros((1, 2, 4, 4), dtype=np.uint8)
    masks[0, 1, 0:2, 0:2] = 255  # lesion = top-left block (4 pixels)
    masks[0, 0, 3, 3] = 1  # benign lesion in the bottom-right pixel, no benign saliency
    res = dice_scores(sal, masks, threshold=0.5)
    # soft: inter 4, Σs = 4 + 4*0.25 = 5, Σm = 4 → 8 / 9
    assert res.soft[0, 1] == pytest.approx(8 / 9)
    assert res.hard[0, 1] == pytest.approx(1.0)
    assert res.soft[0, 0] == pytest.approx(0.0)
    assert res.mean_soft[1] == pytest.approx(8 / 9)


def test_dice_batch_skips_empty_masks() -> None:
    sal = np.zeros((2, 2, 1, 1), dtype=np.float32)
    sal[:, 1] = 1.0
    masks = np.zeros((2, 2, 2, 2), dtype=bool)
    masks[0, 1, 0, 0] = True  # image 0: 1 of 4 pixels; saliency covers all 4 → 2*1/(4+1)
    res = dice_scores(sal, masks)
    assert res.soft[0, 1] == pytest.approx(0.4)
    assert np.isnan(res.soft[1, 1])  # empty mask skipped
    assert res.mean_soft[1] == pytest.approx(0.4)
    kept = dice_scores(sal, masks, skip_empty_masks=False)
    assert kept.soft[1, 1] == pytest.approx(0.0)
    assert kept.mean_soft[1] == pytest.approx(0.2)
    assert np.isnan(kept.soft[0, 0])  # both empty: undefined
    d = res.to_dict()
    assert d["malignant"]["n_images"] == 1


def test_negative_marks_and_specific_dice_by_hand() -> None:
    """Four images, malignant class: a lesion found (Dice 1), a negative with a dark map, a negative whose map
    marks a pixel, and one labelled positive without a mask (left out); the benign class has no negatives."""
    sal = np.zeros((4, 2, 2, 2), dtype=np.float32)
    masks = np.zeros((4, 2, 4, 4), dtype=bool)
    labels = np.array([[1, 1], [1, 0], [1, 0], [np.nan, 1]], dtype=np.float32)
    sal[0, 1] = 0.9
    masks[0, 1] = True  # a lesion over the whole image, found exactly: Dice 1 with either upsampling
    sal[1, 1] = 0.49  # dark everywhere: below the threshold
    sal[2, 1, 1, 1] = 0.5  # reaches the threshold in one cell
    sal[3, 1] = 1.0  # positive, no mask
    for upsample in ("nearest", "aligned"):
        marks = negative_marks(sal, masks, labels, upsample=upsample)
        np.testing.assert_array_equal(marks[:, 1], [np.nan, 0.0, 1.0, np.nan])
        assert np.isnan(marks[:, 0]).all()  # every image is labelled benign (or unknown)
        dice = float(dice_scores(sal, masks, upsample=upsample).mean_hard[1])
        assert dice == pytest.approx(1.0)  # the images with a lesion alone cannot see image 2
        assert specific_dice(dice, float(np.nanmean(marks[:, 1]))) == pytest.approx(0.5)
    assert specific_dice(0.4, 1.0) == 0.0  # maps that mark every negative image
    assert specific_dice(0.0, 0.0) == 0.0  # maps that mark nothing
    assert specific_dice(0.4, float("nan")) == 0.4  # no negative images: the Dice
    with pytest.raises(ValueError, match="labels"):
        negative_marks(sal, masks, labels[:3])


def test_a_map_marked_only_between_cells_is_marked_as_it_is_upsampled() -> None:
    """``aligned`` interpolates: a cell at the threshold whose neighbours are dark is reached at its centre pixel,
    so the image is marked; a map whose maximum is below the threshold never is."""
    sal = np.zeros((1, 1, 3, 3), dtype=np.float32)
    sal[0, 0, 1, 1] = 0.6
    masks = np.zeros((1, 1, 6, 6), dtype=bool)
    labels = np.zeros((1, 1), dtype=np.float32)
    assert negative_marks(sal, masks, labels, upsample="aligned")[0, 0] == 1.0
    assert negative_marks(sal * 0.8, masks, labels, upsample="aligned")[0, 0] == 0.0


@pytest.mark.parametrize("upsample", ["nearest", "aligned"])
def test_dice_of_the_classes_with_a_lesion_only_equals_dice_of_every_class(upsample: str) -> None:
    """Dice is computed only for the (image, class) pairs whose mask has a lesion: the same figures as computing
    every pair and discarding the rest (hard Dice bit for bit, from pixel counts), at a fraction of the time."""
    rng = np.random.default_rng(0)
    sal = (rng.random((12, 2, 8, 5)) ** 3).astype(np.float32)
    masks = np.zeros((12, 2, 64, 40), dtype=np.uint8)
    for i in range(12):
        for c in range(2):
            if rng.random() < 0.4:
                r, q = rng.integers(0, 56), rng.integers(0, 32)
                masks[i, c, r : r + rng.integers(1, 9), q : q + rng.integers(1, 9)] = 1
    masks[3] = 0  # no lesion of either class
    every = dice_scores(sal, masks, upsample=upsample, skip_empty_masks=False)
    kept = dice_scores(sal, masks, upsample=upsample)
    lesion = masks.any(axis=(-2, -1))
    assert 0 < lesion.sum() < lesion.size
    assert np.isnan(kept.hard[~lesion]).all() and np.isnan(kept.soft[~lesion]).all()
    np.testing.assert_array_equal(kept.hard[lesion], every.hard[lesion])
    np.testing.assert_allclose(kept.soft[lesion], every.soft[lesion], rtol=1e-12, atol=0)
    # the hard Dice by hand: thresholded upsampled map against the mask
    from mammogmic.evaluation.localization import upsample_maps

    for i, c in zip(*np.nonzero(lesion), strict=True):
        hit = upsample_maps(sal[i, c], (64, 40), upsample) >= 0.5
        target = masks[i, c] > 0
        expected = 2 * (hit & target).sum() / (hit.sum() + target.sum())
        assert kept.hard[i, c] == expected


def test_dice_torch_input_and_shape_check() -> None:
    torch = pytest.importorskip("torch")
    sal = torch.ones(2, 1, 1)
    masks = torch.ones(2, 3, 3)
    res = dice_scores(sal, masks)
    assert res.soft.shape == (1, 2)
    np.testing.assert_allclose(res.soft, 1.0)
    with pytest.raises(ValueError, match="agree in N and C"):
        dice_scores(np.zeros((1, 2, 2, 2)), np.zeros((1, 1, 4, 4)))


def test_aligned_upsample_centres_each_cell_on_its_receptive_field() -> None:
    sal = np.zeros((1, 1, 4, 3), np.float32)
    sal[0, 0, 2, 1] = 1.0
    up = upsample_aligned(sal, (128, 96))[0, 0]
    # stride 32: the value of cell (2, 1) sits on pixel (64, 32), falls off linearly over one cell
    assert up.shape == (128, 96)
    assert float(up[64, 32]) == pytest.approx(1.0)
    assert float(up[80, 32]) == pytest.approx(0.5) and float(up[64, 48]) == pytest.approx(0.5)
    assert float(up[96, 32]) == pytest.approx(0.0) and float(up[64, 0]) == pytest.approx(0.0)
    assert divmod(int(up.argmax()), 96) == (64, 32)
    # the nearest-neighbour block of that cell is centred half a cell lower and further right
    near = upsample_nearest(sal, (128, 96))[0, 0]
    rows, cols = np.nonzero(near)
    assert (rows.mean(), cols.mean()) == (79.5, 47.5)


def test_aligned_upsample_equals_torch_grid_sample() -> None:
    """The numpy interpolation is the bilinear grid_sample the demo used before (border padding)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    sal = rng.random((2, 2, 5, 4)).astype(np.float32)
    height, width = 160, 96
    ys = torch.arange(height, dtype=torch.float32) * 5 / height
    xs = torch.arange(width, dtype=torch.float32) * 4 / width
    grid = torch.stack(
        [(xs / 3 * 2 - 1)[None, :].expand(height, width), (ys / 4 * 2 - 1)[:, None].expand(height, width)],
        dim=-1,
    )
    ref = torch.nn.functional.grid_sample(
        torch.from_numpy(sal), grid[None].expand(2, height, width, 2), mode="bilinear",
        padding_mode="border", align_corners=True,
    )  # fmt: skip
    np.testing.assert_allclose(upsample_aligned(sal, (height, width)), ref.numpy(), atol=2e-6)


def test_dice_upsampling_modes_by_hand() -> None:
    """A 2x2 map at stride 2: a lesion at pixels (2..3, 2..3) is hit exactly by the nearest block of cell (1, 1);
    the aligned map puts that cell's value on pixel (2, 2) and spreads it over (1..3, 1..3)."""
    sal = np.zeros((1, 1, 2, 2), np.float32)
    sal[0, 0, 1, 1] = 1.0
    mask = np.zeros((1, 1, 4, 4), np.uint8)
    mask[0, 0, 2:, 2:] = 1
    near = dice_scores(sal, mask, upsample="nearest")
    assert near.hard[0, 0] == pytest.approx(1.0) and near.upsample == "nearest"
    aligned = dice_scores(sal, mask, upsample="aligned")
    up = upsample_aligned(sal, (4, 4))[0, 0]
    # by hand: rows/cols 0,1,2,3 sit at cell positions 0, .5, 1, 1.5 -> weights 0, .5, 1, 1 on cell 1
    np.testing.assert_allclose(up, np.outer([0, 0.5, 1, 1], [0, 0.5, 1, 1]))
    hard = up >= 0.5  # rows/cols 1..3: 9 pixels, 4 of them lesion
    assert aligned.hard[0, 0] == pytest.approx(2 * 4 / (hard.sum() + 4))
    soft = 2 * (up * mask[0, 0]).sum() / (up.sum() + 4)
    assert aligned.soft[0, 0] == pytest.approx(soft)
    with pytest.raises(ValueError, match="upsample must be one of"):
        dice_scores(sal, mask, upsample="bicubic")


def test_concatenated_results_average_over_all_images() -> None:
    sal = np.zeros((3, 2, 2, 2), np.float32)
    sal[:, 1, 0, 0] = 1.0
    mask = np.zeros((3, 2, 4, 4), np.uint8)
    mask[0, 1, :2, :2] = 1  # exact hit
    mask[1, 1, 2:, 2:] = 1  # miss
    # image 2 has no malignant mask: left out
    parts = [dice_scores(sal[:1], mask[:1]), dice_scores(sal[1:], mask[1:])]
    whole = DiceResult.concatenate(parts)
    assert whole.mean_hard[1] == pytest.approx(0.5)
    summary = whole.summary()
    assert summary["malignant"] == {"dice": 0.5, "soft_dice": 0.5, "n_images": 2}
    assert summary["benign"]["dice"] is None and summary["upsample"] == "nearest"
    with pytest.raises(ValueError, match="different"):
        DiceResult.concatenate([parts[0], dice_scores(sal[:1], mask[:1], upsample="aligned")])


def test_peak_offsets_by_hand() -> None:
    # Two images of 64x40 pixels, stride 8 (8x5 cells). Image 0: lesion centred on pixel (20, 24), peak cell
    # (2, 1) -> aligned at pixel (16, 8): offset (-4, -16). Image 1 has no lesion.
    saliency = np.zeros((2, 2, 8, 5), np.float32)
    saliency[0, 1, 2, 1] = 0.9
    saliency[1, 1, 4, 4] = 0.9
    masks = np.zeros((2, 2, 64, 40), np.uint8)
    masks[0, 1, 18:23, 22:27] = 1
    images = np.full((2, 1, 64, 40), -1.0, np.float32)
    images[:, :, :, :20] = 1.0  # the breast: columns 0-19, centroid (31.5, 9.5)
    locations = np.array([[[8, 0], [40, 16]], [[0, 0], [0, 0]]])
    result = peak_offsets(saliency, masks, locations, (16, 16), images=images)
    np.testing.assert_allclose(result.peak_signed[0], [-4.0, -16.0])
    assert result.peak_aligned[0] == pytest.approx(np.hypot(4, 16))
    assert result.peak_nearest[0] == pytest.approx(np.hypot(-4 + 3.5, -16 + 3.5))
    assert result.patch_nearest[0] == pytest.approx(np.hypot(8 + 7.5 - 20, 0 + 7.5 - 24))
    to_breast = np.array([31.5 - 20, 9.5 - 24])
    expected = np.array([-4.0, -16.0]) @ to_breast / (np.hypot(4, 16) * np.hypot(*to_breast))
    assert result.inward_cosine[0] == pytest.approx(expected)
    assert np.isnan(result.peak_aligned[1]) and np.isnan(result.inward_cosine[1])
    summary = PeakOffsets.concatenate([result, result]).summary()
    assert summary["n_images"] == 2 and summary["stride_px"] == 8.0
    assert summary["median_peak_offset_rows_px"] == -4.0 and summary["median_peak_offset_cols_px"] == -16.0
    assert summary["median_peak_aligned_cells"] == pytest.approx(np.hypot(4, 16) / 8)
    assert summary["fraction_peak_inward"] == 1.0
    # A map finer than the network's cells (saliency_grid: fine_at_inference) counts in the network's cells:
    # the same pixels, a cell of 16.
    coarse = peak_offsets(saliency, masks, locations, (16, 16), images=images, cell_px=16).summary()
    assert (
        coarse["stride_px"] == 16.0 and coarse["median_peak_aligned_px"] == summary["median_peak_aligned_px"]
    )
    assert coarse["median_peak_aligned_cells"] == pytest.approx(np.hypot(4, 16) / 16)
    # 25 lesion pixels: equivalent radius sqrt(25 / pi) = 2.82 px, so the peak lies 5.85 radii away, outside.
    assert result.lesion_radius[0] == pytest.approx(np.sqrt(25 / np.pi)) and np.isnan(result.lesion_radius[1])
    assert summary["median_peak_aligned_radii"] == pytest.approx(np.hypot(4, 16) / np.sqrt(25 / np.pi))
    assert summary["fraction_peak_within_radius"] == 0.0
    masks[0, 1, 4:36, 8:40] = 1  # a lesion large enough to hold the peak at pixel (16, 8)
    inside = peak_offsets(saliency, masks).summary()
    assert inside["fraction_peak_within_radius"] == 1.0 and inside["median_peak_aligned_radii"] < 1
    # Without images there is no breast to point into.
    assert np.isnan(peak_offsets(saliency, masks).inward_cosine).all()


def test_lesion_centred_profile_by_hand() -> None:
    # 64x40 pixels, stride 8 (8x5 cells). The lesion's centroid (24, 16) is cell (3, 2)'s receptive-field centre;
    # the map peaks one cell to its left (1.0), holds 0.5 on the lesion's cell and 0.25 in the corner cell (0, 0).
    saliency = np.zeros((1, 2, 8, 5), np.float32)
    saliency[0, 1, 3, 1], saliency[0, 1, 3, 2], saliency[0, 1, 0, 0] = 1.0, 0.5, 0.25
    masks = np.zeros((1, 2, 64, 40), np.uint8)
    masks[0, 1, 22:27, 14:19] = 1
    # The blob: cells >= half the maximum connected to the peak: (3, 1) at 1.0 and the lesion's cell (3, 2) at
    # 0.5, not the corner. Its centroid, column (1 * 1.0 + 2 * 0.5) / 1.5 = 4/3, lies 16 - 8 * 4/3 px from the
    # lesion, between the two cells; the peak lies a whole cell (8 px) away.
    centred = peak_offsets(saliency, masks)
    assert centred.peak_aligned[0] == 8.0
    assert centred.centroid_aligned[0] == pytest.approx(16 - 8 * 4 / 3)
    assert centred.summary()["median_centroid_aligned_cells"] == pytest.approx((16 - 8 * 4 / 3) / 8)
    split = saliency.copy()
    split[0, 1, 3, 2] = 0.49  # below half the maximum: the blob is the peak's cell alone
    assert peak_offsets(split, masks).centroid_aligned[0] == 8.0
    diagonal = saliency.copy()
    diagonal[0, 1, 3, 2], diagonal[0, 1, 4, 2] = 0.0, 1.0  # 8-connected to the peak through a corner
    assert peak_offsets(diagonal, masks).centroid_aligned[0] == pytest.approx(np.hypot(4, 4))
    assert peak_offsets(np.zeros_like(saliency), masks).centroid_aligned[0] == pytest.approx(np.hypot(24, 16))
    # The plateau: cells at >= 0.9 of the maximum. One cell here (the peak), the lesion's cell (0.5) off it.
    summary = centred.summary()
    assert centred.plateau_cells[0] == 1.0 and summary["median_plateau_cells"] == 1.0
    assert (
        summary["fraction_lesion_cell_in_plateau"] == 0.0 and summary["fraction_peak_on_lesion_cell"] == 0.0
    )
    saturated = saliency.copy()
    saturated[0, 1, 3, 2], saturated[0, 1, 2, 1] = (
        0.95,
        0.92,
    )  # a near-tie over three cells; the lesion's loses
    tie = peak_offsets(saturated, masks)
    assert tie.plateau_cells[0] == 3.0 and tie.summary()["fraction_lesion_cell_in_plateau"] == 1.0
    assert tie.summary()["fraction_peak_on_lesion_cell"] == 0.0
    saturated[0, 1, 2, 1] = 0.89  # under 0.9 of the maximum: off the plateau
    assert peak_offsets(saturated, masks).plateau_cells[0] == 2.0
    saturated[0, 1, 3, 1] = 0.9  # now the lesion's cell holds the maximum
    won = peak_offsets(saturated, masks)
    assert won.summary()["fraction_peak_on_lesion_cell"] == 1.0 and won.peak_aligned[0] == 0.0
    assert np.isnan(peak_offsets(np.zeros_like(saliency), masks).plateau_cells[0])
    small = peak_offsets(2 * saliency, masks, radius=1)  # divided by the image's maximum
    expected = np.zeros((3, 3))
    expected[1, 0], expected[1, 1] = 1.0, 0.5
    np.testing.assert_allclose(small.profile[0], expected)
    wide = peak_offsets(saliency, masks, radius=3).profile[0]  # rows 0-6, columns -1..5 of the map
    assert np.isnan(wide[:, 0]).all() and np.isnan(wide[:, 6]).all() and np.isfinite(wide[:, 1:6]).all()
    assert wide[0, 1] == 0.25 and wide[3, 2] == 1.0 and wide[3, 3] == 0.5 and np.nansum(wide) == 1.75
    # the mean over images skips cells outside an image's map; an image without a lesion adds nothing
    other = peak_offsets(np.roll(saliency, 1, axis=3), np.roll(masks, 8, axis=3), radius=3)  # one cell right
    both = PeakOffsets.concatenate([peak_offsets(saliency, masks, radius=3), other])
    mean = both.mean_profile()
    assert mean is not None and mean[3, 2] == 1.0 and mean[0, 1] == 0.25
    assert mean[0, 0] == 0.0  # NaN for the first image (column -1), 0 in the shifted one
    assert both.summary()["lesion_centred_saliency"][3][2] == 1.0
    empty = peak_offsets(saliency, np.zeros_like(masks), radius=1)
    assert np.isnan(empty.profile).all() and empty.mean_profile() is None
