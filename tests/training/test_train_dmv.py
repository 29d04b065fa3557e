"""``mammogmic train`` for DMV-CNN (view-wise, image-only and image + heat maps) and for its patch classifier.

Each model learns on a toy set (a few optimizer steps lower the loss), and the file the trainer exports is what
``mammogmic predict`` / ``mammogmic heatmaps`` use: same inputs (the contract in the file), same outputs.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from training_helpers import write_blob_manifest, write_heatmaps

from mammogmic.cli.main import main
from mammogmic.data.dmv import ExamDataset, PatchDataset
from mammogmic.data.sample import items_from_manifest, load_source
from mammogmic.errors import ConfigError
from mammogmic.models import DMVModel, PatchClassifier, load_model, read_model_metadata
from mammogmic.training.config import TrainConfig, load_config
from mammogmic.training.data import input_contract, split_dataset
from mammogmic.training.loop import _build_loss, _collate, build_model, classification_metrics, predict

DMV_MODEL = {"type": "dmv", "width": 4}
PATCH_MODEL = {"type": "patch", "growth_rate": 4, "block_config": [2, 2], "num_init_features": 8}
PATCHES = {"size": 32, "stride": 8, "per_class": 2}
SYNTH_DATA = {"data.out_shape": [256, 160], "data.crop_iterations": 9, "data.crop_buffer": 4}


def _config(**overrides: object) -> TrainConfig:
    """The tiny_cpu preset with dotted overrides (``model`` replaces the whole GMIC model section)."""
    return load_config("tiny_cpu", {"optim.lr": 3e-3, **overrides})


def _steps_lower_the_loss(config: TrainConfig, steps: int = 8) -> list[float]:
    """Loss of one fixed batch (every training sample, no augmentation) over ``steps`` Adam steps."""
    torch.manual_seed(0)
    images = split_dataset(config, "train")
    batch = _collate([images.load(i) for i in range(len(images))])
    model, loss_fn = build_model(config).train(), _build_loss(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model(batch["image"]), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _train(overrides: dict[str, object], run: Path) -> None:
    """``mammogmic train tiny_cpu --set KEY=VALUE ...`` (values as JSON, which the parser reads as YAML)."""
    args = ["train", "tiny_cpu", "--out", str(run), "--no-progress"]
    for key, value in {"optim.lr": 3e-3, **overrides}.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 0


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 four-view exams; exam e4 (training split) lacks its R-MLO view."""
    manifest = write_blob_manifest(tmp_path_factory.mktemp("blobs") / "data", n_exams=8)
    table = pd.read_csv(manifest, dtype=str)
    table[table["image_id"] != "e4_R_MLO"].to_csv(manifest, index=False)
    return manifest


def test_exam_dataset_breast_labels_and_skipped_exams(blobs: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = _config(model=DMV_MODEL, **{"data.manifest": str(blobs)})
    with caplog.at_level(logging.WARNING):
        train = split_dataset(config, "train")
    assert isinstance(train, ExamDataset)
    assert "e4" not in train.exam_ids and train.skipped == ["e4: lacks R-MLO"]
    assert any("left out" in r.message and "e4: lacks R-MLO" in r.message for r in caplog.records)
    table = pd.read_csv(blobs)
    for exam_id, target in zip(train.exam_ids, train.targets, strict=True):
        rows = table[table["exam_id"] == exam_id]
        side = {s: rows[rows["laterality"] == s] for s in "LR"}
        expected = [side["L"]["benign_label"].max(), side["R"]["benign_label"].max()]
        expected += [side["L"]["malignant_label"].max(), side["R"]["malignant_label"].max()]
        np.testing.assert_array_equal(target, expected)  # left/right benign, left/right malignant
    sample = train.load(0)
    # DMV-CNN's windows, scaled from the official 2677x1942 (CC) and 2974x1748 (MLO) by 128x96 / 2944x1920
    assert sample["image"]["L-CC"].shape == (1, 116, 97) and sample["image"]["R-MLO"].shape == (1, 129, 87)
    noisy = train.load(0, np.random.default_rng(0))
    assert not torch.equal(noisy["image"]["L-CC"], sample["image"]["L-CC"])


@pytest.mark.parametrize("channels", [1, 3])
def test_dmv_trains_and_predict_reproduces_it(
    blobs: Path, tmp_path: Path, channels: int, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides: dict[str, object] = {
        "data.manifest": str(blobs),
        "model": {**DMV_MODEL, "in_channels": channels},
    }
    maps = tmp_path / "maps"
    if channels == 3:
        overrides["data.heatmaps_dir"] = str(maps)
    config = _config(**overrides)
    if channels == 3:
        write_heatmaps(blobs, maps, input_contract(config))
    losses = _steps_lower_the_loss(config)
    assert losses[-1] < 0.8 * losses[0], losses

    run = tmp_path / "run"
    _train(overrides, run)
    model_file = run / "best_model.safetensors"
    meta = read_model_metadata(model_file)
    assert meta["model_type"] == "dmv" and meta["model_config"]["in_channels"] == channels
    assert meta["extra"]["input_contract"].get("heatmaps", False) is (channels == 3)
    model = load_model(model_file)
    assert isinstance(model, DMVModel)
    saved = TrainConfig.from_dict(meta["extra"]["training_config"])
    assert saved.model_type == "dmv"
    test = split_dataset(saved, "test")
    probs, _ = predict(model, test)  # (exams, 4): left/right benign, left/right malignant

    test_manifest = tmp_path / "test.csv"
    table = pd.read_csv(blobs, dtype=str)
    table["image_path"] = [str(blobs.parent / p) for p in table["image_path"]]
    table[table["split"] == "test"].to_csv(test_manifest, index=False)
    out = tmp_path / "pred"
    args = ["predict", "--manifest", str(test_manifest), "--model", str(model_file), "--out", str(out)]
    args += ["--no-progress"]
    if channels == 3:
        capsys.readouterr()
        assert main([*args[:-2], str(tmp_path / "refused"), "--no-progress"]) == 2
        assert "--heatmaps DIR" in capsys.readouterr().err
        args += ["--heatmaps", str(maps)]
    assert main(args) == 0
    meta_table = pd.read_csv(out / "breast_predictions_metarepository.csv", dtype={"index": str})
    meta_table = meta_table.set_index("index").loc[test.exam_ids]
    columns = ["left_benign", "right_benign", "left_malignant", "right_malignant"]
    np.testing.assert_allclose(meta_table[columns].to_numpy(), probs, atol=2e-6)  # CSV: 6 decimals

    # the trainer's validation figure is the breast AUROC of the table predict writes
    epochs = pd.read_csv(run / "epochs.csv")
    val = split_dataset(saved, "val")
    val_probs, _ = predict(model, val)
    assert epochs["val_malignant_auroc"].iloc[-1] == pytest.approx(
        classification_metrics(val, val_probs)["malignant_auroc"], nan_ok=True
    )


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 synthetic exams (lesion masks) at 256x160, split train/val/test by exam."""
    from mammogmic.data.manifest import load_manifest
    from mammogmic.data.synth import SynthConfig
    from mammogmic.data.synth.dataset import generate_dataset

    root = tmp_path_factory.mktemp("synth")
    raw = generate_dataset(root, 4, (256, 160), 2, SynthConfig.demo(malignant_rate=0.6, benign_rate=0.4), 1)
    rows = [
        dict(r.to_record(), split=("train", "train", "val", "test")[int(r.exam_id[-1]) % 4])
        for r in load_manifest(raw)
    ]
    manifest = root / "split.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def _patch_overrides(manifest: Path) -> dict[str, object]:
    return {"data.manifest": str(manifest), "model": PATCH_MODEL, "patches": PATCHES, **SYNTH_DATA}


def test_patch_dataset_draws_each_class_where_it_is(synth: Path) -> None:
    from mammogmic.data.preprocessing import orient

    config = _config(**_patch_overrides(synth))
    train = split_dataset(config, "train")
    assert isinstance(train, PatchDataset)
    assert set(train.classes) == {0, 1, 2, 3}  # the toy set has malignant and benign lesions
    contract = input_contract(config)
    for index in range(len(train)):
        image_index, cls = train.slots[index]
        assert cls == train.classes[index]
        source = load_source(train.images[image_index], contract, masks=True)
        view, flip = source.view, source.horizontal_flip
        tissue = orient(source.cropped > 0, view, flip)
        lesions = [orient(m != 0, view, flip) for m in source.masks or [np.zeros_like(tissue)] * 2]
        for rng in (None, np.random.default_rng(index)):
            sample = train.load(index, rng)
            assert sample["image"].shape == (1, 32, 32) and int(sample["labels"].argmax()) == cls
            top, left = sample["position"]
            window = np.s_[top : top + 32, left : left + 32]
            if cls in (0, 1):  # class 0 malignant, 1 benign: the patch holds that lesion
                assert lesions[1 - cls][window].any()
            elif cls == 2:  # tissue, no lesion in the patch
                assert tissue[window].any() and not (lesions[0] | lesions[1])[window].any()
            else:  # background
                assert (~tissue[window]).any()
        assert train.load(index)["image"].equal(train.load(index)["image"])  # deterministic without rng


def test_patch_classifier_trains_and_heatmaps_use_its_grid(synth: Path, tmp_path: Path) -> None:
    from mammogmic.evaluation.heatmaps import produce_heatmaps

    config = _config(**_patch_overrides(synth))
    losses = _steps_lower_the_loss(config)
    assert losses[-1] < 0.8 * losses[0], losses

    run = tmp_path / "run"
    _train({**_patch_overrides(synth), "schedule.epochs": 1}, run)
    model_file = run / "best_model.safetensors"
    meta = read_model_metadata(model_file)
    assert meta["model_type"] == "dmv_patch"
    assert meta["extra"]["heatmap_grid"] == {"patch_size": 32, "stride": 8}
    model = load_model(model_file)
    assert isinstance(model, PatchClassifier)

    out = tmp_path / "maps"
    items = items_from_manifest(synth, split="test")
    args = ["heatmaps", "--manifest", str(synth), "--model", str(model_file), "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    run_info = json.loads((out / "run.json").read_text())
    assert (run_info["patch_size"], run_info["stride"], run_info["crop_iterations"]) == ("32", "8", 9)
    # the maps of the first image, by hand with the trained model, its grid and the training crop
    rng = random.Random(0)
    source = load_source(items_from_manifest(synth)[0], input_contract(config))
    expected = produce_heatmaps(model, source.cropped, source.view, rng, patch=32, stride=8)
    first = items_from_manifest(synth)[0].image_id
    with np.load(out / f"{first}.npz") as saved:
        np.testing.assert_allclose(saved["malignant"], expected.malignant, atol=1e-5)
        assert saved["benign"].shape == source.cropped.shape
    assert items  # the test split is not empty
    # predict takes image models only, and says where a patch classifier goes
    pred = ["predict", "--manifest", str(synth), "--model", str(model_file), "--out", str(tmp_path / "p")]
    assert main([*pred, "--no-progress"]) == 2


def test_other_models_refuse_gmic_only_settings() -> None:
    with pytest.raises(ConfigError, match="model.type"):
        _config(model={"type": "resnet"})
    with pytest.raises(ConfigError, match="schedule.val_metric"):
        _config(model=DMV_MODEL, **{"schedule.val_metric": "malignant_dice"})
    with pytest.raises(ConfigError, match="finetune"):
        _config(model=DMV_MODEL, **{"finetune.freeze": ["global"]})
    with pytest.raises(ConfigError, match="model.head"):
        _config(model={**DMV_MODEL, "head": "image"})
    config = _config(model=DMV_MODEL)
    assert config.to_dict()["model"]["type"] == "dmv"
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert "type" not in load_config("tiny_cpu").to_dict()["model"]  # GMIC configs read as before
