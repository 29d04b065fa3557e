"""Dice between saliency maps and masks on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from mammogmic.evaluation.localization import dice_scores, upsample_nearest


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


def test_dice_torch_input_and_shape_check() -> None:
    torch = pytest.importorskip("torch")
    sal = torch.ones(2, 1, 1)
    masks = torch.ones(2, 3, 3)
    res = dice_scores(sal, masks)
    assert res.soft.shape == (1, 2)
    np.testing.assert_allclose(res.soft, 1.0)
    with pytest.raises(ValueError, match="agree in N and C"):
        dice_scores(np.zeros((1, 2, 2, 2)), np.zeros((1, 1, 4, 4)))
