"""GMIC with heat-map channels (``model.in_channels: 3``) from ``mammogmic train`` to ``mammogmic predict --heatmaps``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from training_helpers import write_blob_manifest, write_heatmaps

from mammogmic.cli.main import main
from mammogmic.models import load_model, read_model_metadata
from mammogmic.training.config import TrainConfig, load_config
from mammogmic.training.data import input_contract, split_dataset
from mammogmic.training.loop import predict


def test_train_with_heatmaps_then_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_blob_manifest(tmp_path / "data", n_exams=4)
    maps = tmp_path / "maps"
    write_heatmaps(manifest, maps, input_contract(load_config("tiny_cpu", {"model.in_channels": 3})))
    run = tmp_path / "run"
    args = ["train", "tiny_cpu", "--set", f"data.manifest={manifest}", "--set", "schedule.epochs=1"]
    args += ["--set", "model.in_channels=3", "--set", f"data.heatmaps_dir={maps}"]
    assert main([*args, "--out", str(run), "--no-progress"]) == 0
    model_file = run / "best_model.safetensors"
    meta = read_model_metadata(model_file)
    assert meta["model_config"]["in_channels"] == 3
    assert meta["extra"]["input_contract"]["heatmaps"] is True  # the file says it needs heat maps

    test_manifest = tmp_path / "data" / "test.csv"
    table = pd.read_csv(manifest, dtype=str)
    table[table["split"] == "test"].to_csv(test_manifest, index=False)
    base = ["predict", "--manifest", str(test_manifest), "--model", str(model_file), "--no-progress"]
    base += ["--workers", "0"]
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "take the image and its benign and malignant heat maps" in err and "--heatmaps DIR" in err
    assert not (tmp_path / "refused" / "image_predictions.csv").exists()

    out = tmp_path / "pred"
    assert main([*base, "--heatmaps", str(maps), "--out", str(out)]) == 0
    preds = pd.read_csv(out / "image_predictions.csv", dtype={"image_index": str}).set_index("image_index")
    config = TrainConfig.from_dict(meta["extra"]["training_config"])
    test_images = split_dataset(config, "test")
    probs, _ = predict(load_model(model_file), test_images)
    ours = pd.Series(probs[:, 1], index=test_images.image_ids)
    assert (preds.loc[ours.index, "malignant_pred"] - ours).abs().max() < 1e-4  # fused inference: rounding
    assert json.loads((out / "run.json").read_text())["models"][0]["input_contract"]["heatmaps"] is True

    # other heat maps for one image: predict sees the change (its input key covers the maps) and redoes it
    first = test_images.items[0].image_id
    path = maps / f"{first}.npz"
    data = dict(np.load(path))
    np.savez(path, benign=data["benign"] * 0.0, malignant=data["malignant"] * 0.0)
    capsys.readouterr()
    assert main([*base, "--heatmaps", str(maps), "--out", str(out)]) == 0
    assert "1 image(s) changed since they were predicted" in capsys.readouterr().err
