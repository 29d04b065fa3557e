"""Heat maps of DMV-CNN's patch classifier: the stride rule, the per-pixel mean, orientation, and
``mammogmic heatmaps`` (outputs, errors, resuming)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mammogmic.cli.main import main
from mammogmic.data.sample import ImageItem, InputContract, load_source
from mammogmic.evaluation.heatmaps import (
    accumulate,
    heatmap_input,
    patch_grid,
    patch_probabilities,
    patch_steps,
    produce_heatmaps,
)
from mammogmic.models import PatchClassifier, PatchConfig, save_model

TINY = PatchConfig(growth_rate=4, block_config=(1, 1), num_init_features=4, bn_size=2)


@pytest.fixture(scope="module")
def tiny_patch_model() -> PatchClassifier:
    torch.manual_seed(0)
    return PatchClassifier(TINY).eval()


@pytest.mark.parametrize("length", [256, 257, 300, 326, 396, 801, 1006, 2023, 2864])
def test_patch_steps_end_flush(length: int) -> None:
    steps = patch_steps(length, random.Random(1))
    span = length - 256
    n = math.ceil(span / 70)
    assert len(steps) == n and sum(steps) == span  # the last patch ends at the border
    if n:
        overshoot = n * 70 - span
        base = 70 - overshoot // n
        assert set(steps) <= {base - 1, base}
        assert steps.count(base - 1) == overshoot % n


def test_patch_steps_draws_only_when_steps_shrink() -> None:
    rng = random.Random(0)
    state = rng.getstate()
    assert patch_steps(256 + 3 * 70, rng) == [70, 70, 70]
    assert rng.getstate() == state  # nothing to shrink: no draw
    # 0_L-CC's columns in the official run: 801 pixels, 8 steps, 7 of them 68 and one 69
    steps = patch_steps(801, random.Random(0))
    assert sorted(steps) == [68] * 7 + [69]
    with pytest.raises(ValueError, match="smaller than a 256-pixel patch"):
        patch_steps(255, rng)


def test_grid_draws_rows_then_columns() -> None:
    rng = random.Random(5)
    with pytest.raises(ValueError, match="smaller than a 256x256 patch"):
        patch_grid((2023, 255), rng)  # refused before drawing anything
    grid = patch_grid((2023, 801), rng)
    rng = random.Random(5)
    rows, cols = patch_steps(2023, rng), patch_steps(801, rng)
    assert grid.rows.tolist() == [0, *np.cumsum(rows).tolist()]
    assert grid.cols.tolist() == [0, *np.cumsum(cols).tolist()]
    assert grid.shape == (27, 9)


def test_accumulate_is_the_mean_over_covering_patches() -> None:
    rng = np.random.default_rng(0)
    rows, cols, patch, shape = np.array([0, 3, 5]), np.array([0, 4]), 6, (11, 10)
    probs = rng.random((3, 2, 2))
    total, count = np.zeros((2, *shape)), np.zeros(shape)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            total[:, r : r + patch, c : c + patch] += probs[i, j][:, None, None]
            count[r : r + patch, c : c + patch] += 1
    np.testing.assert_allclose(accumulate(probs, rows, cols, shape, patch), total / count, rtol=1e-12)


def test_maps_lie_on_the_stored_image(tiny_patch_model: PatchClassifier) -> None:
    """An R view is mirrored to face right and its maps mirrored back: the maps of the mirrored image as an
    L view are the mirror of the R view's maps (same draws)."""
    image = np.random.default_rng(1).integers(0, 4000, size=(90, 70)).astype(np.uint16)
    right = produce_heatmaps(
        tiny_patch_model, image, "R-CC", random.Random(3), patch=32, stride=20, batch_size=5
    )
    left = produce_heatmaps(
        tiny_patch_model, image[:, ::-1].copy(), "L-CC", random.Random(3), patch=32, stride=20, batch_size=7
    )
    assert right.benign.shape == right.malignant.shape == image.shape and right.benign.dtype == np.float32
    np.testing.assert_allclose(right.benign, left.benign[:, ::-1], atol=1e-6)
    np.testing.assert_allclose(right.malignant, left.malignant[:, ::-1], atol=1e-6)
    # top-left pixel of the oriented image: only the first patch covers it; class 0 is malignant, 1 benign
    x = heatmap_input(image, "R-CC")
    with torch.inference_mode():
        first = torch.softmax(tiny_patch_model(torch.from_numpy(x[None, None, :32, :32].copy())), 1)[0]
    np.testing.assert_allclose(right.malignant[0, -1], float(first[0]), atol=1e-6)
    np.testing.assert_allclose(right.benign[0, -1], float(first[1]), atol=1e-6)


def test_patch_probabilities_batching_and_bf16(tiny_patch_model: PatchClassifier) -> None:
    x = heatmap_input(np.random.default_rng(2).random((80, 64)), "L-MLO")
    rows, cols = np.array([0, 20, 48]), np.array([0, 32])
    a = patch_probabilities(tiny_patch_model, x, rows, cols, 32, batch_size=1)
    b = patch_probabilities(tiny_patch_model, x, rows, cols, 32, batch_size=6)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-6)
    c = patch_probabilities(tiny_patch_model, x, rows, cols, 32, batch_size=4, amp="bf16")
    np.testing.assert_allclose(a, c, atol=0.05)
    with pytest.raises(ValueError, match="past the image"):
        patch_probabilities(tiny_patch_model, x, np.array([60]), cols, 32)


# --------------------------------------------------------------------------------------------------
# mammogmic heatmaps


@pytest.fixture(scope="module")
def patch_file(tmp_path_factory: pytest.TempPathFactory, tiny_patch_model: PatchClassifier) -> Path:
    path = tmp_path_factory.mktemp("patch") / "patch.safetensors"
    save_model(tiny_patch_model, path)
    return path


def _scans(root: Path, breast_png) -> Path:  # type: ignore[no-untyped-def]
    scans = root / "scans"
    breast_png(scans / "0_L-CC.png", "L", 0, shape=(480, 360))
    breast_png(scans / "0_R-MLO.png", "R", 1, shape=(520, 380))
    breast_png(scans / "5_L-CC.png", "L", 2, shape=(480, 200))  # cropped narrower than a patch
    (scans / "broken_L-CC.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return scans


def test_heatmaps_cli(tmp_path: Path, breast_png, patch_file: Path) -> None:  # type: ignore[no-untyped-def]
    scans = _scans(tmp_path, breast_png)
    out = tmp_path / "maps"
    args = ["heatmaps", str(scans), "--model", str(patch_file), "--out", str(out), "--crop-iterations", "3"]
    assert main([*args, "--no-progress", "--batch-size", "3"]) == 1  # one image failed
    errors = pd.read_csv(out / "errors.csv")
    assert errors["image_id"].tolist() == ["5_L-CC", "broken_L-CC"]
    assert errors["stage"].tolist() == ["heatmaps", "read"]
    assert "smaller than a 256x256 patch" in errors["error"][0]
    first = {}
    for name, view in (("0_L-CC", "L-CC"), ("0_R-MLO", "R-MLO")):
        with np.load(out / f"{name}.npz", allow_pickle=False) as data:
            first[name] = {k: data[k] for k in data.files}
        item = ImageItem(name, scans / f"{name}.png")
        cropped = load_source(item, InputContract(crop_iterations=3)).cropped
        maps = first[name]
        assert maps["benign"].shape == maps["malignant"].shape == cropped.shape
        assert maps["benign"].dtype == np.float32 and str(maps["view"]) == view
        assert 0 < maps["benign"].min() and maps["malignant"].max() < 1
        assert maps["row_starts"][-1] + 256 == cropped.shape[0]
    run = json.loads((out / "run.json").read_text())
    assert (run["n_done_now"], run["n_errors"], run["stride"]) == (2, 2, "70")

    # a rerun skips what is done; after deleting the first image's file it is redone identically, and the
    # second image, skipped, still has its draws (its grid is redrawn from the saved map's shape)
    (out / "0_L-CC.npz").unlink()
    stamp = (out / "0_R-MLO.npz").stat().st_mtime_ns
    assert main([*args, "--no-progress"]) == 1
    assert (out / "0_R-MLO.npz").stat().st_mtime_ns == stamp
    assert json.loads((out / "run.json").read_text())["n_already_done"] == 1
    with np.load(out / "0_L-CC.npz", allow_pickle=False) as data:
        np.testing.assert_array_equal(data["benign"], first["0_L-CC"]["benign"])

    # another model: everything is redone
    torch.manual_seed(9)
    other = tmp_path / "other.safetensors"
    save_model(PatchClassifier(TINY).eval(), other)
    assert (
        main(
            [
                "heatmaps",
                str(scans),
                "--model",
                str(other),
                "--out",
                str(out),
                "--crop-iterations",
                "3",
                "--no-progress",
            ]
        )
        == 1
    )
    run = json.loads((out / "run.json").read_text())
    assert (run["n_done_now"], run["n_already_done"]) == (2, 0)
    with np.load(out / "0_R-MLO.npz", allow_pickle=False) as data:
        assert not np.array_equal(data["benign"], first["0_R-MLO"]["benign"])


def test_heatmaps_cli_refuses_bad_arguments(tmp_path: Path, breast_png, patch_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    scans = _scans(tmp_path, breast_png)
    assert main(["heatmaps", str(scans), "--model", str(patch_file), "--out", str(scans / "0_L-CC.png")]) == 2
    assert "--out must be a folder" in capsys.readouterr().err
    gmic_like = tmp_path / "model.safetensors"
    from mammogmic.models import DMVConfig, DMVModel

    save_model(DMVModel(DMVConfig(width=2)), gmic_like)
    assert main(["heatmaps", str(scans), "--model", str(gmic_like), "--out", str(tmp_path / "o")]) == 2
    assert "DMVModel model, not a patch classifier" in capsys.readouterr().err
    assert (
        main(
            [
                "heatmaps",
                str(scans),
                "--model",
                str(patch_file),
                "--out",
                str(tmp_path / "o"),
                "--stride",
                "0",
            ]
        )
        == 2
    )
