"""The demo pipeline end to end at a toy size (the real demo's figures are measured, not tested here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mammogmic.errors import MammogmicError
from mammogmic.training.demo import DemoSettings, run_demo


def test_demo_writes_metrics_figures_and_keeps_data_inside(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    settings = DemoSettings(
        n_exams=8, size=(256, 160), epochs=1, workers=1, threads=1, amp="none", n_figures=2
    )
    run_demo(out, settings)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seconds"] > 0 and metrics["test"]["n_images"] > 0
    for key in ("malignant_auroc", "benign_auroc", "malignant_dice"):
        assert key in metrics["test"]
        value = metrics["test"][key]
        assert value is None or (0.0 <= value <= 1.0 and not math.isnan(value))
    assert (out / "data" / "manifest.csv").is_file() and (out / "run" / "last.pt").is_file()
    assert (out / "roc.png").is_file() and (out / "predictions.csv").is_file()
    assert len(metrics["report"]["figures"]) == 2
    assert all((out / f).is_file() for f in metrics["report"]["figures"])
    with pytest.raises(MammogmicError, match="already holds a demo run"):
        run_demo(out, settings)


def test_demo_dice_is_the_library_dice_of_the_dice_selected_model(tmp_path: Path) -> None:
    """The reported Dice is recomputed outside the demo: Dice-selected model as predict loads it, test split,
    aligned upsampling; so are the Dice of every image and the share of the negative images the map marks."""
    import numpy as np
    import torch

    from mammogmic.evaluation.inference import load_member
    from mammogmic.evaluation.localization import DiceResult, dice_scores, negative_marks, specific_dice
    from mammogmic.models import read_model_metadata
    from mammogmic.training.config import TrainConfig
    from mammogmic.training.data import split_dataset

    out = tmp_path / "demo"
    settings = DemoSettings(
        n_exams=12, size=(256, 160), epochs=2, workers=1, threads=1, amp="none", n_figures=0
    )
    metrics = run_demo(out, settings)
    path = out / "run" / "best_dice_model.safetensors"
    assert path.is_file() and metrics["val"]["best_dice_epoch"] is not None
    config = TrainConfig.from_dict(read_model_metadata(path)["extra"]["training_config"])
    test = split_dataset(config, "test", masks=True)
    model = load_member(path).model  # what `mammogmic predict` runs for the model file
    parts = {"aligned": [], "nearest": []}
    marks = []
    with torch.inference_mode():
        for i in range(len(test)):
            sample = test.load(i)
            saliency = model(sample["image"][None]).saliency
            for mode, found in parts.items():
                found.append(dice_scores(saliency, sample["masks"][None], upsample=mode))
            marks.append(
                negative_marks(saliency, sample["masks"][None], sample["labels"][None], upsample="aligned")
            )
    marked = np.concatenate(marks)[:, 1]
    assert np.isfinite(marked).any()  # the test split has images without malignancy
    share = float(np.nanmean(marked))
    assert metrics["test"]["malignant_negatives_marked"] == pytest.approx(share, abs=1e-12)
    dice = float(DiceResult.concatenate(parts["aligned"]).mean_hard[1])
    assert metrics["test"]["malignant_specific_dice"] == pytest.approx(specific_dice(dice, share), abs=1e-12)
    for key in ("malignant_negatives_marked", "malignant_specific_dice"):  # the localization model's
        assert metrics["test_dice_selected_model"][key] == metrics["test"][key]
    for key, mode in (("malignant_dice", "aligned"), ("malignant_dice_nearest", "nearest")):
        expected = float(DiceResult.concatenate(parts[mode]).mean_hard[1])
        reported = metrics["test"][key]
        if np.isnan(expected):
            assert reported is None or np.isnan(reported)
        else:
            assert reported == pytest.approx(expected, abs=1e-9)
        assert metrics["test_dice_selected_model"][key] == reported

    # `ablate` reads a run as the demo reports it: every figure of the demo's `test`, the same model, the same value.
    from mammogmic.training import ablate

    (tmp_path / "ablate").mkdir()
    row = ablate._evaluate_run(config, out / "run", tmp_path / "ablate")["test"]
    for key, value in metrics["test"].items():
        np.testing.assert_equal(row[key], value, err_msg=key)


def test_a_bf16_demo_scores_its_test_split_as_predict_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trained in bf16, the demo reports float32 scores (``runtime.eval_amp``), ``mammogmic predict``'s default,
    computed by the model predict loads from the model file."""
    import numpy as np
    import pandas as pd
    import torch
    from test_train_predict_pipeline import scores_as_predict

    import mammogmic.training.demo as demo
    from mammogmic.models import load_model, read_model_metadata
    from mammogmic.training.config import TrainConfig
    from mammogmic.training.data import split_dataset
    from mammogmic.training.loop import predict

    scored: list[torch.nn.Module] = []

    def spy(model: torch.nn.Module, images: object, **kwargs: object) -> object:
        scored.append(model)
        return predict(model, images, **kwargs)

    monkeypatch.setattr(demo, "predict", spy)
    out = tmp_path / "demo"
    settings = DemoSettings(
        n_exams=12, size=(256, 160), epochs=2, workers=1, threads=1, amp="bf16", n_figures=0
    )
    run_demo(out, settings)
    path = out / "run" / "best_model.safetensors"
    config = TrainConfig.from_dict(read_model_metadata(path)["extra"]["training_config"])
    assert config.runtime.amp == "bf16"
    test = split_dataset(config, "test")
    reported = pd.read_csv(out / "predictions.csv", dtype={"image_id": str}).set_index("image_id")
    ours = reported.loc[test.image_ids, ["benign_pred", "malignant_pred"]].to_numpy()
    model = load_model(path)
    fp32, _ = predict(model, test)
    np.testing.assert_allclose(ours, fp32, atol=1e-6)  # the file's six decimals
    bf16, _ = predict(model, test, amp="bf16")
    assert np.abs(bf16 - ours).max() > 2e-4  # the check can fail: bf16 scores are further off
    x = torch.stack([test.load(i)["image"] for i in range(len(test))])
    assert len(scored) == 2  # the AUROC-selected model, then the Dice-selected one
    scores_as_predict(scored[0], path, x)
    scores_as_predict(scored[1], out / "run" / "best_dice_model.safetensors", x)


def test_saliency_scripts_read_a_demo_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """scripts/saliency_offsets.py and scripts/saliency_erf.py (docs/localization.md's measurements) run on a
    demo run folder and print well-formed figures."""
    out = tmp_path / "demo"
    settings = DemoSettings(
        n_exams=12, size=(256, 160), epochs=2, workers=1, threads=1, amp="none", n_figures=0
    )
    run_demo(out, settings)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "scripts"))
    import saliency_erf
    import saliency_offsets

    assert saliency_offsets.main([str(out / "run"), "--split", "test"]) == 0
    offsets = json.loads(capsys.readouterr().out)
    assert offsets["split"] == "test" and offsets["images"] > 0
    assert set(offsets["dice"]) == {"aligned", "nearest"}
    assert offsets["offsets"]["malignant"]["stride_px"] == 32.0
    assert offsets["saliency_symmetry"] == "flips_at_inference"  # the demo's own
    assert offsets["saliency_grid"] == "fine_at_inference"  # yet counted in the network's 32-pixel cells
    assert saliency_offsets.main([str(out / "run"), "--split", "test", "--grid", "native"]) == 0
    native = json.loads(capsys.readouterr().out)
    assert native["saliency_grid"] == "native" and native["offsets"]["malignant"]["stride_px"] == 32.0
    assert (
        native["offsets"]["malignant"] != offsets["offsets"]["malignant"]
    )  # the same weights read another way
    assert saliency_offsets.main([str(out / "run"), "--split", "test", "--subdivide", "2"]) == 0
    finer = json.loads(capsys.readouterr().out)
    assert finer["subdivide"] == 2 and finer["offsets"]["malignant"]["stride_px"] == 32.0
    assert set(finer["dice"]) == {"aligned", "nearest"} and finer["images"] == offsets["images"]
    # The training split of 12 exams holds normal images (the test split's 2 exams may not).
    for symmetry in ("flips_at_inference", "none"):
        assert saliency_offsets.main([str(out / "run"), "--split", "train", "--symmetry", symmetry]) == 0
        read = json.loads(capsys.readouterr().out)
        assert read["saliency_symmetry"] == symmetry and read["normal_images"]["n_images"] > 0
        assert 0 <= read["normal_images"]["malignant"]["fraction_marked"] <= 1
        maxima = read["normal_images"]["malignant"]["median_map_maximum"]
        if symmetry == "flips_at_inference":
            agreed = maxima
    assert maxima != agreed  # the same weights read another way

    import fusion_maps

    assert fusion_maps.main([str(out / "run"), "--split", "train"]) == 0
    cam = json.loads(capsys.readouterr().out)
    assert (
        cam["saliency_head"] == "fusion" and cam["normal_images"] > 0
    )  # the demo's maps are the fusion head's
    for name in ("benign", "malignant"):
        if cam[name]["images"]:
            assert cam[name]["cosine_saliency_head_fusion"] == pytest.approx(1.0, abs=1e-6)
            for k in ("saliency", "fusion", "fusion_positive"):
                assert 0 <= cam[name][k]["scaled_dice"] <= 1 and 0 <= cam[name][k]["auroc_of_maximum"] <= 1

    assert saliency_erf.main([str(out / "run"), "--split", "test", "--images", "2"]) == 0
    erf = json.loads(capsys.readouterr().out)
    assert erf["cells"] == 2 * 4 and erf["stride_px"] == 32
    for name in ("benign", "malignant"):
        for stat in ("median", "mean"):
            rows, cols = erf["offset_rows_cols_px"][name][stat]
            # a gradient centroid lies inside the 256x160 input, so within its size of the cell's centre
            assert math.isfinite(rows) and math.isfinite(cols) and abs(rows) < 256 and abs(cols) < 160


def test_saliency_offsets_subdivision_is_the_finer_grid_by_other_means(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``scripts/saliency_offsets.py --subdivide 2`` on the network's own grid (the maps of the input shifted by
    half a cell stitched in between) gives the model's ``saliency_grid: fine_at_inference`` maps (its last stage
    dilated), away from the borders the shifted input moves: two computations of one grid."""
    import torch

    from mammogmic.models import GMIC, GMICConfig

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "scripts"))
    import saliency_offsets

    torch.manual_seed(0)
    config = GMICConfig(global_arch="resnet10", global_width=4, local_width=4, crop_size=(64, 64))
    native = GMIC(config).eval()
    fine = GMIC(config.replace(saliency_grid="fine_at_inference")).eval()
    fine.load_state_dict(native.state_dict())
    x = torch.randn(2, 1, 512, 384)
    with torch.no_grad():
        own = native.forward_global(x)[1]
        stitched = saliency_offsets.subdivided(native, x, own, 2)
        dilated = fine.forward_global(x)[1]
    assert own.shape[-2:] == (16, 12) and stitched.shape == dilated.shape == (2, 2, 32, 24)
    assert torch.equal(stitched[..., ::2, ::2], own)
    # 8 fine cells (128 pixels) from every border: the random-weight receptive field reaches about 7
    inner = (slice(None), slice(None), slice(8, 24), slice(8, 16))
    assert torch.allclose(stitched[inner], dilated[inner], atol=1e-5)
    assert not torch.allclose(stitched[..., 1::2, 1::2], own, atol=1e-3)  # the cells in between are new
    assert torch.equal(saliency_offsets.subdivided(native, x, own, 1), own)
    with pytest.raises(SystemExit, match="does not divide"):
        saliency_offsets.subdivided(native, x, own, 3)
