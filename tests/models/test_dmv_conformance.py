"""DMV-CNN and its patch classifier against the official release's recorded outputs
(``shared/fixtures/official_dmv``; the images and the crop/centre results are ``shared/fixtures/official_gmic``'s).

Inputs are built by our own path (``load_source`` -> ``dmv_exam_windows`` / ``window_sample``), so these
tests cover the DMV-CNN windows, the heat-map channels and the seeded official TTA draws as well as the models.
Heat maps: the full maps take ~2,400 DenseNet-121 passes, too slow for CI on 2 cores; here every patch grid
is checked against the official map's edges (all the random stride draws), and the patches of the top-left and
bottom-right corners of every image are run and compared; ``benchmarks/bench_heatmaps.py`` compares all six
maps in full.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from mammogmic.data.io import read_image
from mammogmic.data.sample import (
    OFFICIAL_CONTRACT,
    ImageItem,
    dmv_contract,
    dmv_exam_passes,
    dmv_exam_windows,
    load_source,
    window_sample,
)
from mammogmic.evaluation.heatmaps import accumulate, heatmap_input, patch_grid, patch_probabilities
from mammogmic.models import DMV_LABELS, load_official_dmv_checkpoint, load_official_patch_classifier

pytestmark = pytest.mark.fixtures

EXAM = {"L-CC": "0_L-CC", "R-CC": "0_R-CC", "L-MLO": "0_L-MLO", "R-MLO": "0_R-MLO"}
ORDER = ("0_L-CC", "0_R-CC", "0_L-MLO", "0_R-MLO", "1_R_CC", "2_L_CC")  # the official heat-map run's order
MODELS = {
    "viewwise_image": "dmv_viewwise_image_seed0.p",
    "viewwise_imageheatmaps": "dmv_viewwise_imageheatmaps_seed0.p",
}
CORNER = 2  # patch rows/columns run at each corner of each heat map


@pytest.fixture(scope="module")
def dirs(fixtures_dir: Path, dmv_fixtures_dir: Path) -> tuple[Path, Path]:
    return fixtures_dir, dmv_fixtures_dir


@pytest.fixture(scope="module")
def expected(dirs: tuple[Path, Path]) -> dict[str, Any]:
    return json.loads((dirs[1] / "expected_seed0.json").read_text())


@pytest.fixture(scope="module")
def meta(dirs: tuple[Path, Path]) -> dict[str, Any]:
    return json.loads((dirs[0] / "metadata.json").read_text())["images"]


@pytest.fixture(scope="module")
def reference_maps(dirs: tuple[Path, Path]) -> dict[str, np.ndarray]:
    return dict(np.load(dirs[1] / "heatmaps_seed0.npz"))


def _item(gmic: Path, meta: dict[str, Any], name: str, heatmaps: Path | None = None) -> ImageItem:
    """The cropped PNG with the official crop/centre results, as a preprocess-cache row would give it."""
    info = meta[name]
    png = gmic / info["cropped_png"]
    center = tuple(info["best_center"])
    return ImageItem(name, png, view=info["view"], cached_path=png, best_center=center, heatmap_path=heatmaps)


def _heatmap_file(tmp: Path, maps: dict[str, np.ndarray], name: str) -> Path:
    path = tmp / f"{name}.npz"
    np.savez(path, benign=maps[f"{name}__benign"], malignant=maps[f"{name}__malignant"])
    return path


@pytest.fixture(scope="module")
def exam_sources(dirs, meta, reference_maps, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Exam 0's four views, without and with the official heat maps (read from .npz files like predict)."""
    tmp = tmp_path_factory.mktemp("heatmaps")
    plain = {view: load_source(_item(dirs[0], meta, name), OFFICIAL_CONTRACT) for view, name in EXAM.items()}
    heat = {
        view: load_source(
            _item(dirs[0], meta, name, _heatmap_file(tmp, reference_maps, name)),
            OFFICIAL_CONTRACT,
            heatmaps=True,
        )
        for view, name in EXAM.items()
    }
    return {"viewwise_image": plain, "viewwise_imageheatmaps": heat}


@pytest.fixture(scope="module")
def dmv_models(dirs):  # type: ignore[no-untyped-def]
    # channels-last: faster on CPU, equal to float32 rounding.
    return {
        kind: load_official_dmv_checkpoint(dirs[1] / file).to(memory_format=torch.channels_last)
        for kind, file in MODELS.items()
    }


def _run(model, windows: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        return model({view: torch.from_numpy(x) for view, x in windows.items()})


@pytest.mark.parametrize("kind", list(MODELS))
def test_model_input_sums(kind: str, exam_sources, expected) -> None:  # type: ignore[no-untyped-def]
    windows = dmv_exam_windows(exam_sources[kind])
    for view, stats in expected["exams"][kind]["model_input_stats"].items():
        x = windows[view][0].astype(np.float64)  # (C, H, W)
        assert list(x.shape[1:]) + [x.shape[0]] == stats["shape_hwc"]
        sums = x.sum(axis=(1, 2))
        abs_sums = np.abs(x).sum(axis=(1, 2))
        np.testing.assert_allclose(sums, stats["sum_f64"], rtol=1e-6, err_msg=f"{kind} {view}")
        np.testing.assert_allclose(abs_sums, stats["abs_sum_f64"], rtol=1e-6, err_msg=f"{kind} {view}")


@pytest.mark.parametrize("kind", list(MODELS))
def test_viewwise_one_pass(kind: str, exam_sources, dmv_models, expected) -> None:  # type: ignore[no-untyped-def]
    ref = expected["exams"][kind]
    assert tuple(ref["label_order"]) == DMV_LABELS
    out = _run(dmv_models[kind], dmv_exam_windows(exam_sources[kind]))
    for angle in ("CC", "MLO"):
        np.testing.assert_allclose(
            out.log_probs[angle][0].numpy(),
            ref["heads_log_softmax_no_augmentation"][angle],
            atol=1e-4,
            rtol=0,
        )
    np.testing.assert_allclose(
        out.predictions[0].numpy(), ref["predictions_no_augmentation"], atol=1e-5, rtol=0
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(MODELS))
def test_viewwise_tta10_seed0(kind: str, exam_sources, dmv_models, expected) -> None:  # type: ignore[no-untyped-def]
    """The official ``--use-augmentation --num-epochs 10`` run: one RandomState(0) over passes and views."""
    predictions = []
    for windows in dmv_exam_passes(exam_sources[kind], tta=10, rng=np.random.RandomState(0)):
        predictions.append(_run(dmv_models[kind], {v: x[None] for v, x in windows.items()}).predictions[0])
    assert len(predictions) == 10
    mean = torch.stack(predictions).double().mean(0).numpy()
    np.testing.assert_allclose(mean, expected["exams"][kind]["predictions_tta10_seed0"], atol=1e-5, rtol=0)


def test_imagewise_single_images(dirs, meta, expected) -> None:  # type: ignore[no-untyped-def]
    model = load_official_dmv_checkpoint(dirs[1] / "dmv_imagewise_image_seed0.p").to(
        memory_format=torch.channels_last
    )
    assert model.config.head == "image"
    cases = expected["single_image_imagewise"]
    assert sorted(cases) == sorted(ORDER)
    for name, ref in cases.items():
        source = load_source(_item(dirs[0], meta, name), OFFICIAL_CONTRACT)
        x, _ = window_sample(source, dmv_contract(ref["view"]))
        with torch.inference_mode():
            log_probs = model.forward_single(torch.from_numpy(x)[None], ref["view"])  # (1, 2, 2)
        np.testing.assert_allclose(log_probs.numpy(), ref["raw_output"], atol=1e-4, rtol=0, err_msg=name)
        np.testing.assert_allclose(
            log_probs[0, :, 1].exp().numpy(), ref["benign_malignant"], atol=1e-5, rtol=0, err_msg=name
        )


@pytest.fixture(scope="module")
def patch_model(dirs):  # type: ignore[no-untyped-def]
    path = dirs[1] / "dmv_patch_densenet121_seed0.p"
    return load_official_patch_classifier(path).to(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def grids(dirs, meta) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Each image's heat-map input and patch grid, drawn in the official run's order from one Random(0)."""
    rng = random.Random(0)
    out = {}
    for name in ORDER:
        cropped, _ = read_image(dirs[0] / meta[name]["cropped_png"])
        image = heatmap_input(cropped, meta[name]["view"])
        out[name] = (image, patch_grid(image.shape, rng))
    return out


def _oriented_reference(maps: dict[str, np.ndarray], name: str, view: str) -> np.ndarray:
    """(benign, malignant) official maps turned to face right, like the model input."""
    ref = np.stack([maps[f"{name}__benign"], maps[f"{name}__malignant"]])
    return ref[:, :, ::-1] if view.startswith("R") else ref


@pytest.mark.parametrize("name", ORDER)
def test_heatmap_grid_matches_official_edges(name: str, grids, meta, reference_maps) -> None:  # type: ignore[no-untyped-def]
    """The official map changes value exactly where one of our patches starts or ends: every stride draw
    of the run (rows and columns of all six images) is the official one."""
    image, grid = grids[name]
    ref = _oriented_reference(reference_maps, name, meta[name]["view"])
    assert ref.shape[1:] == image.shape == tuple(meta[name]["cropped_shape_hw"])
    for axis, starts in ((1, grid.rows), (2, grid.cols)):
        length = image.shape[axis - 1]
        changes = np.flatnonzero(np.abs(np.diff(ref, axis=axis)).max(axis=(0, 3 - axis)) > 0) + 1
        edges = (set(starts.tolist()) | set((starts + grid.patch).tolist())) - {0, length}
        assert set(changes.tolist()) == edges
        assert starts[0] == 0 and starts[-1] + grid.patch == length


@pytest.mark.parametrize("name", ORDER)
def test_heatmap_corners_match_official(name: str, grids, meta, reference_maps, patch_model) -> None:  # type: ignore[no-untyped-def]
    """Run the patches of the top-left and bottom-right ``CORNER x CORNER`` blocks of the grid; where only
    those patches cover a pixel the map must equal the official one (1e-5)."""
    model = patch_model
    image, grid = grids[name]
    ref = _oriented_reference(reference_maps, name, meta[name]["view"])
    k, p = CORNER, grid.patch
    regions = {
        "top-left": (slice(0, k), (slice(0, grid.rows[k]), slice(0, grid.cols[k]))),
        "bottom-right": (
            slice(-k, None),
            (slice(grid.rows[-k - 1] + p, None), slice(grid.cols[-k - 1] + p, None)),
        ),
    }
    for where, (block, (rows, cols)) in regions.items():
        probs = patch_probabilities(model, image, grid.rows[block], grid.cols[block], batch_size=2 * k)
        maps = accumulate(probs, grid.rows[block], grid.cols[block], image.shape)[[1, 0]]  # benign, malignant
        ours, theirs = maps[:, rows, cols], ref[:, rows, cols]
        assert ours.size > 2 * 100 * 100
        assert np.abs(ours - theirs).max() <= 1e-5, f"{name} {where}"


def test_predict_cli_reproduces_exam_0(dirs, reference_maps, expected, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``mammogmic predict`` on exam 0's four PNGs (cropped and centred again by our pipeline) with the official
    image + heat-map model and the official heat maps as ``--heatmaps`` files."""
    from mammogmic.cli.main import main

    maps = tmp_path / "maps"
    maps.mkdir()
    for name in EXAM.values():
        _heatmap_file(maps, reference_maps, name)
    files = [str(dirs[0] / "images" / "cropped" / f"{name}.png") for name in EXAM.values()]
    out = tmp_path / "out"
    model = dirs[1] / MODELS["viewwise_imageheatmaps"]
    args = ["predict", *files, "--model", str(model), "--heatmaps", str(maps), "--out", str(out)]
    assert main([*args, "--device", "cpu", "--no-progress"]) == 0
    table = pd.read_csv(out / "breast_predictions_metarepository.csv", dtype={"index": str})
    assert table["index"].tolist() == ["0"]
    ref = dict(
        zip(
            DMV_LABELS,
            expected["exams"]["viewwise_imageheatmaps"]["predictions_no_augmentation"],
            strict=True,
        )
    )
    for label, value in ref.items():
        assert abs(float(table[label][0]) - value) <= 1e-5, label
