"""Train -> model file -> predict -> evaluate as one pipeline (the skew these tests would have caught).

A model trained here and given to ``mammogmic predict`` with no size or preprocessing flags must see the inputs
it was trained on (its input contract travels in the model file) and reproduce the training run's own
predictions; ``mammogmic evaluate`` on predict's table must report the numbers the trainer selected on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from training_helpers import tiny_config, write_blob_manifest

from mammogmic.cli.main import main
from mammogmic.models import load_model, read_model_metadata
from mammogmic.training.config import TrainConfig
from mammogmic.training.data import input_contract, split_dataset
from mammogmic.training.loop import classification_metrics, predict


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    manifest = write_blob_manifest(root / "data", n_exams=8)
    run = root / "run"
    args = ["train", "tiny_cpu", "--set", f"data.manifest={manifest}", "--set", "schedule.epochs=2"]
    assert main([*args, "--out", str(run), "--no-progress"]) == 0
    return manifest, run


def test_model_file_carries_contract_and_provenance(trained: tuple[Path, Path]) -> None:
    manifest, run = trained
    extra = read_model_metadata(run / "best_model.safetensors")["extra"]
    config = TrainConfig.from_dict(extra["training_config"])
    assert extra["input_contract"] == input_contract(config).to_dict()
    assert extra["input_contract"]["input_shape"] == [128, 96]
    assert extra["input_contract"]["crop_iterations"] == 4
    from mammogmic.data.cache import sha256_file

    assert extra["training_manifest_sha256"] == sha256_file(manifest)


def test_predict_without_flags_reproduces_the_training_run(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    manifest, run = trained
    config = TrainConfig.from_dict(
        json.loads(
            json.dumps(read_model_metadata(run / "best_model.safetensors")["extra"]["training_config"])
        )
    )
    test_images = split_dataset(config, "test")
    model = load_model(run / "best_model.safetensors")
    probs, _ = predict(model, test_images)
    own = classification_metrics(test_images, probs)
    result = json.loads((run / "result.json").read_text())
    assert result["test_metrics"]["malignant_auroc"] == pytest.approx(own["malignant_auroc"], abs=1e-12)

    # predict with the model alone: same inputs (contract from the file), same scores.
    test_manifest = tmp_path / "test.csv"
    table = pd.read_csv(manifest, dtype=str)
    table[table["split"] == "test"].to_csv(test_manifest, index=False)
    for name in table["image_path"]:  # relative image paths resolve against the new manifest's folder
        (tmp_path / name).write_bytes((manifest.parent / name).read_bytes())
    out = tmp_path / "pred"
    rc = main(
        ["predict", "--manifest", str(test_manifest), "--model", str(run / "best_model.safetensors"),
         "--out", str(out), "--no-progress", "--workers", "0"]
    )  # fmt: skip
    assert rc == 0
    assert pd.read_csv(out / "errors.csv").empty
    preds = pd.read_csv(out / "image_predictions.csv", dtype={"image_index": str}).set_index("image_index")
    ours = pd.Series(probs[:, 1], index=test_images.image_ids)
    delta = (preds.loc[ours.index, "malignant_pred"] - ours).abs()
    assert delta.max() < 1e-4  # fused channels-last inference vs the plain model: float32 rounding
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["models"][0]["input_contract"]["input_shape"] == [128, 96]

    # evaluate on predict's table reports what the trainer computed for the same images.
    ev = tmp_path / "eval.json"
    assert main(["evaluate", str(out / "image_predictions.csv"), "--label", "malignant_label",
                 "--scores", "malignant_pred", "--bootstrap", "0", "--json", str(ev)]) == 0  # fmt: skip
    reported = json.loads(ev.read_text())["metrics"]["malignant_pred"]["auroc"]
    assert reported == pytest.approx(own["malignant_auroc"], abs=1e-9)


def test_validation_metric_is_the_evaluate_number_at_breast_level(trained: tuple[Path, Path]) -> None:
    """Breast = mean of per-view means (the evaluation package's rule), not the plain mean of images."""
    _, run = trained
    extra = read_model_metadata(run / "best_model.safetensors")["extra"]
    config = TrainConfig.from_dict(extra["training_config"])
    images = split_dataset(config, "val")
    # Two images of one view and one of the other in a breast: the two means differ.
    probs = np.linspace(0.1, 0.9, len(images))[:, None].repeat(2, axis=1)
    breast = classification_metrics(images, probs, "breast")
    from mammogmic.evaluation.outputs import image_row, image_table
    from mammogmic.evaluation.table import auroc_summary

    table = image_table(
        [image_row(item, item.view or "", p[0], p[1]) for item, p in zip(images.items, probs, strict=True)]
    )
    expected = auroc_summary(table, "breast")
    assert breast.keys() == expected.keys()
    np.testing.assert_array_equal(list(breast.values()), list(expected.values()))  # NaN == NaN here
    assert breast["malignant_auroc"] == breast["malignant_auroc"]  # the malignant figure is a number


def test_explicit_flag_contradicting_the_model_is_warned(
    trained: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest, run = trained
    out = tmp_path / "pred"
    with caplog.at_level(logging.WARNING):
        rc = main(
            ["predict", "--manifest", str(manifest), "--model", str(run / "best_model.safetensors"),
             "--out", str(out), "--no-progress", "--workers", "0", "--input-size", "160", "96"]
        )  # fmt: skip
    assert rc == 0
    assert any(
        "input_shape 128x96" in r.message and "--input-size 160x96" in r.message for r in caplog.records
    )
    assert json.loads((out / "run.json").read_text())["models"][0]["input_contract"]["input_shape"] == [
        160,
        96,
    ]


def test_convert_and_predict_agree_on_an_official_files_t(tmp_path: Path, fixtures_dir: Path) -> None:
    official = tmp_path / "sample_model_5.p"
    official.write_bytes((fixtures_dir / "official_format_seed0.p").read_bytes())
    dest = tmp_path / "m5.safetensors"
    assert main(["convert", str(official), str(dest)]) == 0
    meta = read_model_metadata(dest)
    assert meta["model_config"]["percent_t"] == pytest.approx(0.10)
    assert meta["extra"]["input_contract"]["input_shape"] == [2944, 1920]
    from mammogmic.evaluation.inference import load_member

    assert load_member(official, fuse=False).percent_t == pytest.approx(0.10)
    assert load_member(dest, fuse=False).percent_t == pytest.approx(0.10)
    other = tmp_path / "mine.p"
    other.write_bytes(official.read_bytes())
    assert main(["convert", str(other), str(tmp_path / "x.safetensors")]) == 2  # t unknown: asked for
    assert main(["convert", str(dest), str(tmp_path / "y.safetensors"), "--percent-t", "0.05"]) == 2
    assert not (tmp_path / "y.safetensors").exists()
    torch.manual_seed(0)


@pytest.mark.parametrize("best_dice_metric", ["malignant_dice", "malignant_specific_dice"])
def test_dice_selection_keeps_the_dice_best_model(tmp_path: Path, best_dice_metric: str) -> None:
    """Validation Dice is the library's Dice on the validation split; the best-Dice model is kept beside it,
    selected on the images with a lesion or on every image."""
    from mammogmic.data.manifest import load_manifest
    from mammogmic.data.sample import demo_contract
    from mammogmic.data.synth import SynthConfig
    from mammogmic.data.synth.dataset import generate_dataset
    from mammogmic.evaluation.localization import dice_scores, negative_marks, specific_dice

    size = (256, 160)
    raw = generate_dataset(tmp_path / "synth", 6, size, 1, SynthConfig.demo(malignant_rate=0.6), 1)
    rows = [
        dict(r.to_record(), split=("val" if i % 3 == 2 else "train"))  # 3 of the 8 without malignancy
        for i, r in enumerate(load_manifest(raw))
    ]
    manifest = tmp_path / "synth" / "split.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    contract = demo_contract(size)
    run = tmp_path / "run"
    args = ["train", "tiny_cpu", "--out", str(run), "--no-progress"]
    for key, value in {
        "data.manifest": manifest,
        "data.out_shape": "[256,160]",
        "data.crop_iterations": contract.crop_iterations,
        "data.crop_buffer": contract.crop_buffer,
        "data.test_split": "",
        "schedule.epochs": 2,
        "schedule.val_metric": "malignant_dice",
        "schedule.keep_best_dice": "true",
        "schedule.best_dice_metric": best_dice_metric,
        "schedule.dice_upsample": "aligned",
    }.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    epochs = pd.read_csv(run / "epochs.csv")
    assert epochs["val_malignant_dice"].notna().all()
    result = json.loads((run / "result.json").read_text())
    assert result["best_metric"] == pytest.approx(epochs["val_malignant_dice"].max())
    assert result["best_dice"] == pytest.approx(epochs[f"val_{best_dice_metric}"].max())
    assert (
        epochs["val_malignant_negatives_marked"].between(0, 1).all()
    )  # NaN would fail: the split has negatives
    # the kept model's validation Dice, recomputed outside the trainer
    model = load_model(run / "best_dice_model.safetensors")
    config = TrainConfig.from_dict(
        read_model_metadata(run / "best_dice_model.safetensors")["extra"]["training_config"]
    )
    val = split_dataset(config, "val", masks=True)
    lesion, marks = [], []
    with torch.inference_mode():
        for i in range(len(val)):
            sample = val.load(i)
            saliency, masks = model(sample["image"][None]).saliency, sample["masks"][None]
            lesion.append(dice_scores(saliency, masks, upsample="aligned").hard[:, 1])
            marks.append(negative_marks(saliency, masks, sample["labels"][None], upsample="aligned")[:, 1])
    dice, marked = float(np.nanmean(np.concatenate(lesion))), float(np.nanmean(np.concatenate(marks)))
    kept = specific_dice(dice, marked) if best_dice_metric == "malignant_specific_dice" else dice
    assert kept == pytest.approx(result["best_dice"], abs=1e-6)


def test_training_tta_is_predicts_tta(tmp_path: Path) -> None:
    """``data.tta: 3``: the trainer's test metrics are those of the TTA windows ``predict --tta 3 --seed S``
    averages (and differ from the single-window metrics)."""
    manifest = write_blob_manifest(tmp_path / "data", n_exams=8)
    run = tmp_path / "run"
    args = ["train", "tiny_cpu", "--set", f"data.manifest={manifest}", "--set", "schedule.epochs=1"]
    args += ["--set", "data.tta=3", "--set", "runtime.seed=5", "--out", str(run), "--no-progress"]
    assert main(args) == 0
    reported = json.loads((run / "result.json").read_text())["test_metrics"]
    config = TrainConfig.from_dict(
        read_model_metadata(run / "best_model.safetensors")["extra"]["training_config"]
    )
    test_images = split_dataset(config, "test")
    model = load_model(run / "best_model.safetensors")
    tta3, _ = predict(model, test_images, tta=3, seed=5)
    single, _ = predict(model, test_images)
    assert reported == pytest.approx(classification_metrics(test_images, tta3), abs=1e-12)
    assert reported != pytest.approx(classification_metrics(test_images, single), abs=1e-12)
    # mammogmic predict with the same windows gives the same probabilities.
    test_manifest = tmp_path / "data" / "test.csv"
    table = pd.read_csv(manifest, dtype=str)
    table[table["split"] == "test"].to_csv(test_manifest, index=False)
    out = tmp_path / "pred"
    rc = main(
        ["predict", "--manifest", str(test_manifest), "--model", str(run / "best_model.safetensors"),
         "--tta", "3", "--seed", "5", "--out", str(out), "--no-progress", "--workers", "0"]
    )  # fmt: skip
    assert rc == 0
    preds = pd.read_csv(out / "image_predictions.csv", dtype={"image_index": str}).set_index("image_index")
    ours = pd.Series(tta3[:, 1], index=test_images.image_ids)
    assert (preds.loc[ours.index, "malignant_pred"] - ours).abs().max() < 1e-4  # fused inference: rounding
    assert (pd.Series(single[:, 1], index=ours.index) - ours).abs().max() > 1e-3  # the windows matter


def test_label_level_breast(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """``data.label_level: breast``: every view takes its breast's labels, and validation is per breast."""
    manifest, _ = trained
    table = pd.read_csv(manifest)
    # A finding seen on the left MLO of exam e2 (validation) only: at breast level its CC view is malignant too.
    seen = (table["exam_id"] == "e2") & (table["laterality"] == "L") & (table["view"] == "MLO")
    table.loc[seen, "malignant_label"] = 1
    breast = table.groupby(["exam_id", "laterality"])[["benign_label", "malignant_label"]].transform("max")
    table["breast_benign_label"] = breast["benign_label"]
    table["breast_malignant_label"] = breast["malignant_label"]
    assert (table["breast_malignant_label"] != table["malignant_label"]).any()  # the levels differ here
    labelled = manifest.parent / "breast_labels.csv"
    table.to_csv(labelled, index=False)
    val = split_dataset(tiny_config(**{"data.manifest": str(labelled), "data.label_level": "breast"}), "val")
    expected = table.set_index("image_id").loc[val.image_ids]
    np.testing.assert_array_equal(val.labels[:, 1], expected["breast_malignant_label"].to_numpy())
    np.testing.assert_array_equal(val.labels[:, 0], expected["breast_benign_label"].to_numpy())

    run = tmp_path / "run"
    args = ["train", "tiny_cpu", "--set", f"data.manifest={labelled}", "--set", "schedule.epochs=1"]
    assert main([*args, "--set", "data.label_level=breast", "--out", str(run), "--no-progress"]) == 0
    epochs = pd.read_csv(run / "epochs.csv")
    saved = TrainConfig.from_dict(
        read_model_metadata(run / "best_model.safetensors")["extra"]["training_config"]
    )
    val = split_dataset(saved, "val")
    probs, _ = predict(load_model(run / "best_model.safetensors"), val)
    per_breast = classification_metrics(val, probs, "breast")
    assert epochs.loc[0, "val_malignant_auroc"] == pytest.approx(per_breast["malignant_auroc"], abs=1e-12)
    per_image = classification_metrics(val, probs, "image")
    assert per_image["malignant_auroc"] != pytest.approx(per_breast["malignant_auroc"], abs=1e-6)


def scores_as_predict(model: torch.nn.Module, path: Path, x: torch.Tensor) -> None:
    """On the batch ``x``, ``model`` gives, bit for bit, what ``mammogmic predict``'s model from the file ``path``
    gives, and the plain (unfused) model with the same weights does not."""
    from mammogmic.evaluation.inference import load_member

    member = load_member(path)
    plain = load_model(path).eval()
    with torch.inference_mode():
        ours, theirs, unfused = model(x), member.model(x), plain(x)
    for name in ("y_fusion", "y_global", "y_local", "saliency"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert not torch.equal(
        ours.saliency, unfused.saliency
    )  # the check can fail: folding changes the rounding


def test_validation_and_test_score_with_predicts_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every validation and the test pass run the model ``mammogmic predict`` loads from the run's model file
    (fused, channels-last), so the figures a run selects and reports on are the ones predict gives."""
    import mammogmic.training.loop as loop

    scored: list[torch.nn.Module] = []
    real = loop.predict

    def spy(model: torch.nn.Module, images: object, **kwargs: object) -> object:
        scored.append(model)
        return real(model, images, **kwargs)

    monkeypatch.setattr(loop, "predict", spy)
    manifest = write_blob_manifest(tmp_path / "data", n_exams=8)
    run = tmp_path / "run"
    args = ["train", "tiny_cpu", "--set", f"data.manifest={manifest}", "--set", "schedule.epochs=2"]
    assert main([*args, "--out", str(run), "--no-progress"]) == 0
    assert len(scored) == 3  # two validations, one test
    path = run / "best_model.safetensors"
    config = TrainConfig.from_dict(read_model_metadata(path)["extra"]["training_config"])
    val = split_dataset(config, "val")
    x = torch.stack([val.load(i)["image"] for i in range(len(val))])
    scores_as_predict(scored[-1], path, x)  # the test pass: the selected epoch's weights
    best_epoch = json.loads((run / "result.json").read_text())["best_epoch"]
    scores_as_predict(scored[best_epoch], path, x)  # that epoch's validation


def test_a_bf16_run_reports_what_predict_gives(tmp_path: Path) -> None:
    """``runtime.amp: bf16`` trains in bf16, but validation and test are scored as ``mammogmic predict`` scores
    by default (float32, ``runtime.eval_amp``, predict's fused model): the run's test predictions are predict's,
    row for row, and the epoch it selected was ranked on float32 scores."""
    manifest = write_blob_manifest(tmp_path / "data", n_exams=8)
    run = tmp_path / "run"
    args = ["train", "tiny_cpu", "--set", f"data.manifest={manifest}", "--set", "schedule.epochs=2"]
    assert main([*args, "--set", "runtime.amp=bf16", "--out", str(run), "--no-progress"]) == 0
    path = run / "best_model.safetensors"
    config = TrainConfig.from_dict(read_model_metadata(path)["extra"]["training_config"])
    assert (config.runtime.amp, config.runtime.eval_amp) == ("bf16", "none")
    reported = pd.read_csv(run / "test_predictions.csv", dtype={"image_index": str}).set_index("image_index")

    test_manifest = tmp_path / "data" / "test.csv"
    table = pd.read_csv(manifest, dtype=str)
    table[table["split"] == "test"].to_csv(test_manifest, index=False)
    out = tmp_path / "pred"
    rc = main(
        ["predict", "--manifest", str(test_manifest), "--model", str(path), "--out", str(out), "--no-progress",
         "--workers", "0"]
    )  # fmt: skip
    assert rc == 0
    preds = pd.read_csv(out / "image_predictions.csv", dtype={"image_index": str}).set_index("image_index")
    assert sorted(preds.index) == sorted(reported.index)
    for col in ("benign_pred", "malignant_pred"):
        # The trainer scores with predict's own (fused, channels-last) model; batches of another size round
        # differently in oneDNN (~1e-7), which can move the sixth decimal. Bit for bit on one batch: the test
        # above.
        assert (preds.loc[reported.index, col] - reported[col]).abs().max() <= 1.5e-6, col

    # The check can fail: scored in bf16, the same model's test predictions are further off than that.
    model = load_model(path)
    test_images = split_dataset(config, "test")
    bf16, _ = predict(model, test_images, amp="bf16")
    ours = reported.loc[test_images.image_ids, "malignant_pred"].to_numpy()
    assert np.abs(bf16[:, 1] - ours).max() > 2e-4

    # The selected epoch was ranked on float32 validation scores: its logged AUROC and loss are float32's.
    from mammogmic.training.loss import GMICLoss

    result = json.loads((run / "result.json").read_text())
    logged = pd.read_csv(run / "epochs.csv").set_index("epoch").loc[result["best_epoch"]]
    val = split_dataset(config, "val")
    fp32, _ = predict(model, val)
    assert logged["val_malignant_auroc"] == pytest.approx(
        classification_metrics(val, fp32)["malignant_auroc"], abs=1e-12
    )
    x = torch.stack([val.load(i)["image"] for i in range(len(val))])
    y = torch.as_tensor(val.labels, dtype=torch.float32)
    loss_fn = GMICLoss(config.loss, prediction=config.model.prediction)
    with torch.inference_mode():
        losses = {amp: float(loss_fn(_scored(model, x, amp), y).total) for amp in ("none", "bf16")}
    assert logged["val_loss"] == pytest.approx(losses["none"], abs=1e-5)
    assert abs(losses["bf16"] - losses["none"]) > 1e-4  # the check can fail


def _scored(model: torch.nn.Module, x: torch.Tensor, amp: str) -> object:
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
        return model(x)
