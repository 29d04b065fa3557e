"""One sample path: a training sample with augmentation off is bit-identical to predict's model input.

Three callers build model inputs: the trainer (``training.data.split_dataset`` + ``SeededSamples``),
``MammogramDataset`` and ``mammogmic predict`` (``evaluation.inference.prepare_item``). These tests hold them
equal on the official fixture images (where the input must also equal the official pipeline's recorded input)
and on synthetic images with lesion masks, for raw rows cropped on the fly and for preprocess caches.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mammogmic.data.cache import PreprocessSettings, preprocess_manifest
from mammogmic.data.dataset import MammogramDataset
from mammogmic.data.manifest import load_manifest
from mammogmic.data.sample import OFFICIAL_CONTRACT, InputContract, demo_contract
from mammogmic.evaluation.inference import PrepareSettings, prepare_item
from mammogmic.training.config import load_config
from mammogmic.training.data import SeededSamples, input_contract, split_dataset

# Two exam-0 views (one mirrored) and a real crop of a larger image; every image takes ~1 s to crop.
OFFICIAL = ["0_R-CC", "0_L-MLO", "1_R_CC"]


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _three_paths(manifest: Path, contract: InputContract, config_overrides: dict[str, Any]) -> list[Any]:
    """(trainer sample, MammogramDataset sample, predict input) per row, masks included."""
    config = load_config("tiny_cpu", {"data.manifest": str(manifest), **config_overrides})
    assert input_contract(config) == contract
    trainer = SeededSamples(split_dataset(config, "test", masks=True), augment=False, seed=7)
    dataset = MammogramDataset(manifest, split="test", mode="eval", contract=contract, masks=True)
    out = []
    for index, item in enumerate(dataset.items):
        prepared = prepare_item(item, [contract], PrepareSettings(load_masks=True))
        assert prepared.error is None, prepared.error
        out.append((trainer[(index, 3)], dataset[index], prepared))
    return out


def _assert_same(trainer: dict[str, Any], dataset: dict[str, Any], prepared: Any) -> None:
    np.testing.assert_array_equal(trainer["image"].numpy(), prepared.inputs[0][0])  # (C, H, W)
    np.testing.assert_array_equal(dataset["image"].numpy(), prepared.inputs[0][0])
    assert trainer["image"].dtype == dataset["image"].dtype
    if prepared.masks is not None:
        np.testing.assert_array_equal(trainer["masks"].numpy(), prepared.masks)
        np.testing.assert_array_equal(dataset["masks"].numpy(), prepared.masks)


@pytest.mark.fixtures
def test_official_images_same_input_on_every_path(
    tmp_path: Path, fixtures_dir: Path, official_metadata: dict[str, Any]
) -> None:
    rows = []
    for name in OFFICIAL:
        entry = official_metadata["images"][name]
        side, view = entry["view"].split("-")
        rows.append(
            {
                "image_id": name,
                "image_path": str(fixtures_dir / entry["original_png"]),
                "patient_id": f"p{entry['exam_index']}",
                "exam_id": str(entry["exam_index"]),
                "laterality": side,
                "view": view,
                "horizontal_flip": entry["horizontal_flip"],
                "split": "test",
            }
        )
    manifest = _write_manifest(tmp_path / "manifest.csv", rows)
    official_size = {
        "data.out_shape": [2944, 1920],
        "data.crop_iterations": 100,
        "data.crop_buffer": 50,
        "data.max_crop_noise": [100, 100],
        "data.max_crop_size_noise": 100,
    }
    for name, (trainer, dataset, prepared) in zip(
        OFFICIAL, _three_paths(manifest, OFFICIAL_CONTRACT, official_size), strict=True
    ):
        _assert_same(trainer, dataset, prepared)
        # ... and that input is the official pipeline's, recorded by the official code.
        expected = np.load(fixtures_dir / "expected" / f"{name}.npz")
        x = prepared.inputs[0][0, 0]
        assert x.shape == (2944, 1920)
        np.testing.assert_array_equal(x[::16, ::16], expected["input_sub16"])
        rows_, cols_ = expected["input_probe_positions"].T
        np.testing.assert_array_equal(x[rows_, cols_], expected["input_probe_values"])
        assert float(x.astype(np.float64).sum()) == float(expected["input_sum_f64"])


def test_synthetic_images_same_input_raw_and_cached(tmp_path: Path) -> None:
    from mammogmic.data.synth import SynthConfig
    from mammogmic.data.synth.dataset import generate_dataset

    size = (256, 160)
    raw = generate_dataset(tmp_path / "synth", 4, size, 3, SynthConfig.demo(), 1)
    # Every row into the test split, so one split holds benign, malignant and normal images.
    table = load_manifest(raw)
    rows = [dict(r.to_record(), split="test") for r in table]
    manifest = _write_manifest(tmp_path / "synth" / "all_test.csv", rows)
    contract = demo_contract(size)
    overrides = {
        "data.out_shape": list(size),
        "data.crop_iterations": contract.crop_iterations,
        "data.crop_buffer": contract.crop_buffer,
        "data.max_crop_noise": list(contract.max_crop_noise),
        "data.max_crop_size_noise": contract.max_crop_size_noise,
    }
    on_the_fly = _three_paths(manifest, contract, overrides)
    assert len(on_the_fly) == 16
    assert any(p.masks is not None and p.masks[1].any() for _, _, p in on_the_fly)  # lesions reach the masks
    for trainer, dataset, prepared in on_the_fly:
        _assert_same(trainer, dataset, prepared)

    # A preprocess cache of the same rows gives the same inputs again.
    settings = PreprocessSettings(
        iterations=contract.crop_iterations, buffer_size=contract.crop_buffer, window_shape=size
    )
    preprocess_manifest(load_manifest(manifest), tmp_path / "cache", settings=settings)
    cached = _three_paths(tmp_path / "cache" / "manifest.csv", contract, overrides)
    for (trainer, _, prepared), (c_trainer, c_dataset, c_prepared) in zip(on_the_fly, cached, strict=True):
        _assert_same(c_trainer, c_dataset, c_prepared)
        np.testing.assert_array_equal(c_prepared.inputs[0], prepared.inputs[0])
        np.testing.assert_array_equal(c_trainer["masks"].numpy(), trainer["masks"].numpy())


def test_contract_round_trip_and_refusals() -> None:
    contract = demo_contract((512, 320))
    assert contract.crop_iterations == 17 and contract.crop_buffer == 9
    assert InputContract.from_dict(json.loads(json.dumps(contract.to_dict()))) == contract
    assert contract.differences(OFFICIAL_CONTRACT)[0] == ("input_shape", [512, 320], [2944, 1920])
    with pytest.raises(ValueError, match="unknown field"):
        InputContract.from_dict({**contract.to_dict(), "gamma": 2})
    with pytest.raises(ValueError, match="input_shape"):
        InputContract(input_shape=(8, 8))
    with pytest.raises(ValueError, match="class_order"):
        InputContract(class_order=("malignant", "benign"))
    # heat maps: written only when true, so image-only files keep the contract dict they always had
    assert "heatmaps" not in contract.to_dict() and contract.channels == 1
    heat = InputContract(heatmaps=True)
    assert heat.channels == 3 and InputContract.from_dict(json.loads(json.dumps(heat.to_dict()))) == heat
    assert heat.differences(OFFICIAL_CONTRACT) == [("heatmaps", True, False)]


def test_small_image_with_official_crop_says_which_flag(tmp_path: Path) -> None:
    from mammogmic.data.sample import ImageItem, SampleError, load_source
    from mammogmic.data.synth import SynthConfig, generate_exam

    view, image, _, _ = generate_exam(seed=0, size=(512, 320), config=SynthConfig.demo())[0]
    from PIL import Image

    path = tmp_path / f"x_{view}.png"
    Image.fromarray(image).save(path)
    with pytest.raises(SampleError) as err:
        load_source(ImageItem("x", path, view=view), OFFICIAL_CONTRACT)
    assert err.value.stage == "crop" and str(path) in str(err.value)
    assert "--crop-iterations 17" in str(err.value) and "data.crop_iterations=17" in str(err.value)
    assert load_source(ImageItem("x", path, view=view), demo_contract((512, 320))).cropped.size > 0


def test_heatmap_channels_same_input_in_training_and_predict(tmp_path: Path) -> None:
    """GMIC with ``in_channels: 3``: the training sample (augmentation off) is predict's model input bit for bit,
    with the model file's contract (which records the heat maps); the maps follow the image's window, unscaled."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
    from training_helpers import write_blob_manifest, write_heatmaps

    from mammogmic.data.preprocessing import model_input
    from mammogmic.data.sample import attach_heatmaps, items_from_manifest, load_source
    from mammogmic.evaluation.inference import model_contract
    from mammogmic.models import GMIC, save_model

    manifest = write_blob_manifest(tmp_path / "data", n_exams=4)
    config = load_config(
        "tiny_cpu",
        {"data.manifest": str(manifest), "model.in_channels": 3, "data.heatmaps_dir": str(tmp_path / "maps")},
    )
    contract = input_contract(config)
    assert contract.heatmaps and contract.to_dict()["heatmaps"] is True
    maps = write_heatmaps(manifest, Path(config.data.heatmaps_dir), contract)
    model_file = save_model(
        GMIC(config.model), tmp_path / "m.safetensors", metadata={"input_contract": contract.to_dict()}
    )
    stored = model_contract(model_file)
    assert stored == contract
    trainer = SeededSamples(split_dataset(config, "test"), augment=False, seed=7)
    items = items_from_manifest(manifest, split="test")
    attach_heatmaps(items, maps)
    assert len(items) == len(trainer) == 4
    for index, item in enumerate(items):
        prepared = prepare_item(item, [stored], PrepareSettings())
        assert prepared.error is None, prepared.error
        x = trainer[(index, 3)]["image"].numpy()
        assert x.shape == (3, 128, 96) and prepared.inputs[0].shape == (1, 3, 128, 96)
        np.testing.assert_array_equal(x, prepared.inputs[0][0])
        # channels 1-2: the maps through the image's window, not standardised
        source = load_source(item, contract)
        raw = model_input(
            source.cropped,
            source.view,
            source.center,
            out_shape=contract.input_shape,
            auxiliary=list(source.heatmaps),
            horizontal_flip=source.horizontal_flip,
        )
        np.testing.assert_array_equal(x, raw)
        assert 0.0 <= x[1:].min() and x[1:].max() <= 1.0 and x[2].std() > 0.05
    # without its maps the image is refused at the heat-map stage, naming the file
    bare = items_from_manifest(manifest, split="test")[0]
    failed = prepare_item(bare, [stored], PrepareSettings())
    assert failed.stage == "heatmaps" and str(bare.path) in str(failed.error)


def test_train_time_flips_move_heatmap_channels_with_the_image(tmp_path: Path) -> None:
    """``data.hflip_prob`` / ``data.vflip_prob`` on a 3-channel model: the image, both heat maps and the masks
    are mirrored together (a flip of one axis of a ``(C, H, W)`` sample, never of the channel axis)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
    from training_helpers import write_blob_manifest, write_heatmaps

    manifest = write_blob_manifest(tmp_path / "data", n_exams=2)
    base = {
        "data.manifest": str(manifest),
        "model.in_channels": 3,
        "data.heatmaps_dir": str(tmp_path / "maps"),
    }
    write_heatmaps(manifest, tmp_path / "maps", input_contract(load_config("tiny_cpu", base)))
    plain = split_dataset(load_config("tiny_cpu", base), "train", masks=True)
    for key, axis in (("data.hflip_prob", 2), ("data.vflip_prob", 1)):
        flipped = split_dataset(load_config("tiny_cpu", {**base, key: 1.0}), "train", masks=True)
        a = plain.load(0, np.random.default_rng(3))
        b = flipped.load(0, np.random.default_rng(3))
        assert a["image"].shape == (3, 128, 96) and a["image"][1:].std() > 0  # maps are present
        np.testing.assert_array_equal(b["image"].numpy(), np.flip(a["image"].numpy(), axis=axis))
        np.testing.assert_array_equal(b["masks"].numpy(), np.flip(a["masks"].numpy(), axis=axis))
