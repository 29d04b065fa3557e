"""``mammogmic predict`` with DMV-CNN models: exams of four views -> one row per exam, bad exams in errors.csv."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mammogmic.cli.main import main
from mammogmic.models import DMVConfig, DMVModel, save_model

META_COLUMNS = ["index", "left_malignant", "right_malignant", "left_benign", "right_benign"]


@pytest.fixture(scope="module")
def dmv_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dmv")
    out = {}
    for name, channels in (("image", 1), ("heat", 3)):
        torch.manual_seed(channels)
        out[name] = root / f"{name}.safetensors"
        save_model(DMVModel(DMVConfig(width=2, in_channels=channels)).eval(), out[name])
    return out


def _exams(root: Path, breast_png) -> Path:  # type: ignore[no-untyped-def]
    scans = root / "scans"
    for i, view in enumerate(("L-CC", "R-CC", "L-MLO", "R-MLO")):
        breast_png(scans / f"0_{view}.png", view[0], i)
    breast_png(scans / "3_L-CC.png", "L", 7)  # an exam without its other views
    return scans


def test_predict_exams(
    tmp_path: Path, breast_png, dmv_files: dict[str, Path], gmic_model: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    scans = _exams(tmp_path, breast_png)
    out = tmp_path / "out"
    args = ["predict", str(scans), "--model", str(dmv_files["image"]), "--out", str(out)]
    flags = ["--crop-iterations", "3", "--no-progress"]
    assert main([*args, *flags]) == 1  # exam 3 is incomplete
    table = pd.read_csv(out / "breast_predictions_metarepository.csv", dtype={"index": str})
    assert list(table.columns) == META_COLUMNS and table["index"].tolist() == ["0"]
    assert table[META_COLUMNS[1:]].apply(lambda c: c.between(0, 1)).all().all()
    errors = pd.read_csv(out / "errors.csv")
    assert errors["image_id"].tolist() == ["3_L-CC"] and errors["stage"].tolist() == ["exam"]
    assert "lacks R-CC, L-MLO, R-MLO" in errors["error"][0]
    run = json.loads((out / "run.json").read_text())
    assert (run["model_type"], run["n_exams_predicted_now"], run["tta"]) == ("dmv", 1, 1)

    # a rerun into the same folder keeps exam 0; with --overwrite it is predicted again
    assert main([*args, *flags, "--tta", "2"]) == 1
    assert json.loads((out / "run.json").read_text())["n_exams_predicted_now"] == 0
    again = pd.read_csv(out / "breast_predictions_metarepository.csv", dtype={"index": str})
    pd.testing.assert_frame_equal(again, table)
    assert main([*args, *flags, "--tta", "2", "--overwrite"]) == 1
    run = json.loads((out / "run.json").read_text())
    assert (run["n_exams_predicted_now"], run["tta"]) == (1, 2)
    assert pd.read_csv(out / "breast_predictions_metarepository.csv")["index"].tolist() == [0]

    capsys.readouterr()
    heat = ["predict", str(scans), "--model", str(dmv_files["heat"]), "--out", str(tmp_path / "o2"), *flags]
    assert main(heat) == 2
    assert "--heatmaps DIR" in capsys.readouterr().err
    maps = tmp_path / "maps"  # only exam 0's first view has heat maps: the exam fails at that image
    maps.mkdir()
    np.savez(maps / "0_L-CC.npz", benign=np.zeros((2, 2), np.float32), malignant=np.zeros((2, 2), np.float32))
    assert main([*heat, "--heatmaps", str(maps)]) == 1
    errors = pd.read_csv(tmp_path / "o2" / "errors.csv")
    stages = dict(zip(errors["image_id"], errors["stage"], strict=True))
    assert (
        stages["0_L-CC"] == "heatmaps" and stages["0_R-CC"] == "heatmaps" and stages["3_L-CC"] == "heatmaps"
    )
    assert not (tmp_path / "o2" / "breast_predictions_metarepository.csv").exists()

    gmic = [
        "predict",
        str(scans),
        "--model",
        str(gmic_model),
        "--out",
        str(tmp_path / "o4"),
        "--heatmaps",
        str(maps),
    ]
    assert main(gmic) == 2
    assert "none of the models takes heat maps" in capsys.readouterr().err
    assert main([*args, "--input-size", "256", "192"]) == 2
    assert "--input-size: GMIC options" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gmic_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mammogmic import GMIC, GMICConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gmic") / "gmic.safetensors"
    save_model(GMIC(GMICConfig(global_width=4, local_width=8, crop_size=(32, 32), num_patches=2)), path)
    return path


def test_mixed_ensemble_averages_gmic_and_dmv_per_breast(
    tmp_path: Path, breast_png, dmv_files: dict[str, Path], gmic_model: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    """``predict --model DMV --model GMIC``: each breast's score is the mean of DMV-CNN's breast output and GMIC's
    breast score (mean over the breast's views), each the number the model gives alone."""
    scans = _exams(tmp_path, breast_png)
    flags = ["--crop-iterations", "3", "--input-size", "256", "192", "--no-progress", "--workers", "0"]
    dmv, gmic = ["--model", str(dmv_files["image"])], ["--model", str(gmic_model)]
    out = {}
    for name, models, extra, status in (
        ("dmv", dmv, flags[:2] + flags[5:], 1),  # exam 3 has one view: an error for DMV-CNN
        ("gmic", gmic, flags, 0),
        ("mixed", dmv + gmic, flags, 1),
    ):
        out[name] = tmp_path / name
        assert main(["predict", str(scans), *models, "--out", str(out[name]), *extra]) == status
    tables = {
        name: pd.read_csv(folder / "breast_predictions.csv", dtype={"breast_id": str, "exam_id": str})
        .set_index("breast_id")
        .loc[["0_L", "0_R"]]
        for name, folder in out.items()
    }
    mixed = tables["mixed"]
    for kind in ("benign", "malignant"):
        alone = {name: tables[name][f"{kind}_pred"] for name in ("dmv", "gmic")}
        np.testing.assert_allclose(mixed[f"{kind}_pred__image"], alone["dmv"], atol=1e-6)
        np.testing.assert_allclose(mixed[f"{kind}_pred__gmic"], alone["gmic"], atol=1e-6)
        np.testing.assert_allclose(mixed[f"{kind}_pred"], (alone["dmv"] + alone["gmic"]) / 2, atol=2e-6)
        assert (alone["dmv"] - alone["gmic"]).abs().max() > 1e-3  # the two models do differ
    meta = pd.read_csv(out["mixed"] / "breast_predictions_metarepository.csv", dtype={"index": str})
    assert meta["index"].tolist() == ["0"]
    assert meta["left_malignant"][0] == pytest.approx(mixed.loc["0_L", "malignant_pred"], abs=1e-6)
    errors = pd.read_csv(out["mixed"] / "errors.csv")
    assert errors["image_id"].tolist() == ["3_L-CC"] and errors["stage"].tolist() == ["exam"]
    run = json.loads((out["mixed"] / "run.json").read_text())
    assert run["model_type"] == "dmv+gmic"
    assert [(m["name"], m["kind"]) for m in run["models"]] == [("image", "dmv"), ("gmic", "gmic")]
    assert run["models"][1]["input_contract"]["input_shape"] == [256, 192]

    capsys.readouterr()
    refused = ["predict", str(scans), *dmv, *gmic, "--out", str(tmp_path / "x"), "--save-saliency", *flags]
    assert main(refused) == 2
    assert "--save-saliency: not for DMV-CNN ensembles" in capsys.readouterr().err
