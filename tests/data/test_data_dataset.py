"""MammogramDataset: samples, labels, masks, TTA, seeding, cached vs on-the-fly rows."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import synthetic_breast
from PIL import Image
from torch.utils.data import DataLoader

from mammogmic.data import CropNoise, model_input
from mammogmic.data.cache import PreprocessSettings, preprocess_manifest
from mammogmic.data.dataset import MammogramDataset, seed_worker
from mammogmic.data.manifest import load_manifest

OUT = (64, 48)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ds")
    data = root / "in"
    data.mkdir()
    lines = ["image_id,image_path,patient_id,exam_id,laterality,view,benign_label,malignant_label,"
             "breast_malignant_label,malignant_mask_path,split"]  # fmt: skip
    for index, (side, view, label) in enumerate([("L", "CC", "1"), ("R", "MLO", ""), ("L", "MLO", "0")]):
        image = np.zeros((160, 120), np.uint16)
        block = synthetic_breast((130, 80), side)
        if side == "L":
            image[15:145, :80] = block
        else:
            image[15:145, 40:] = block
        Image.fromarray(image).save(data / f"img{index}.png")
        mask_col = ""
        if index == 0:
            mask = np.zeros((160, 120), np.uint8)
            mask[70:90, 10:30] = 255
            Image.fromarray(mask).save(data / "mask0.png")
            mask_col = "mask0.png"
        lines.append(f"i{index},img{index}.png,p,e,{side},{view},0,{label},1,{mask_col},train")
    (data / "manifest.csv").write_text("\n".join(lines) + "\n")
    settings = PreprocessSettings(iterations=3, buffer_size=5, window_shape=OUT)
    preprocess_manifest(load_manifest(data / "manifest.csv"), root / "out", settings=settings)
    return data / "manifest.csv", root / "out" / "manifest.csv"


def test_eval_sample_equals_model_input(prepared: tuple[Path, Path]) -> None:
    _, cached = prepared
    ds = MammogramDataset(cached, mode="eval", out_shape=OUT)
    sample = ds[0]
    assert sample["image"].shape == (1, *OUT) and sample["image"].dtype == torch.float32
    item = ds.items[0]
    assert item.cached_path is not None and item.view is not None and item.best_center is not None
    expected = model_input(np.load(item.cached_path), item.view, item.best_center, out_shape=OUT)
    np.testing.assert_array_equal(sample["image"][0].numpy(), expected)
    assert sample["labels"].tolist() == [0.0, 1.0] and sample["image_id"] == "i0"
    assert torch.isnan(ds[1]["labels"][1]) and ds[1]["labels"][0] == 0.0
    breast = MammogramDataset(cached, mode="eval", out_shape=OUT, label_level="breast")
    assert torch.isnan(breast[0]["labels"][0]) and breast[0]["labels"][1] == 1.0


def test_on_the_fly_rows_match_cached_rows(prepared: tuple[Path, Path]) -> None:
    raw, cached = prepared
    a = MammogramDataset(raw, mode="eval", out_shape=OUT, crop_iterations=3, crop_buffer_size=5, masks=True)
    b = MammogramDataset(cached, mode="eval", out_shape=OUT, masks=True)
    for index in range(len(a)):
        assert torch.equal(a[index]["image"], b[index]["image"])
        assert torch.equal(a[index]["masks"], b[index]["masks"])
    np.testing.assert_array_equal(a.labels, b.labels)


def test_train_samples_are_seeded_per_epoch_and_index(prepared: tuple[Path, Path]) -> None:
    _, cached = prepared
    # A window larger than the crop (resized to OUT) and small noise keep the lesion inside every window.
    kwargs = {"mode": "train", "out_shape": OUT, "window_shape": (160, 120), "noise": CropNoise((4, 4), 4)}
    ds = MammogramDataset(cached, seed=3, masks=True, **kwargs)
    first = ds[0]["image"]
    assert torch.equal(first, ds[0]["image"])  # same (seed, epoch, index) -> same window
    ds.set_epoch(1)
    assert not torch.equal(first, ds[0]["image"])
    other = MammogramDataset(cached, seed=4, **kwargs)
    assert not torch.equal(first, other[0]["image"])
    sample = ds[0]
    assert sample["masks"].shape == (2, *OUT) and sample["masks"].dtype == torch.uint8
    assert sample["masks"][0].sum() == 0 and sample["masks"][1].sum() > 0  # malignant mask only
    assert ds[1]["masks"].sum() == 0  # no mask in the manifest -> zeros
    image = sample["image"][0]
    assert abs(float(image.mean())) < 1e-4 and abs(float(image.std()) - 1) < 1e-3


def test_vertical_flip_and_tta(prepared: tuple[Path, Path]) -> None:
    _, cached = prepared
    plain = MammogramDataset(cached, mode="train", out_shape=OUT, seed=0, noise=None)
    flipped = MammogramDataset(cached, mode="train", out_shape=OUT, seed=0, vflip_prob=1.0)
    assert torch.equal(flipped[0]["image"], torch.flip(plain[0]["image"], dims=[1]))
    tta = MammogramDataset(cached, mode="tta", out_shape=OUT, tta=4, masks=True)
    sample = tta[0]
    assert sample["image"].shape == (4, 1, *OUT) and sample["masks"].shape == (2, *OUT)  # first window's
    assert len({hash(w.numpy().tobytes()) for w in sample["image"]}) > 1  # different windows
    assert torch.equal(sample["image"], tta[0]["image"])  # fixed per image


def test_horizontal_flip_mirrors_image_and_masks_together(prepared: tuple[Path, Path]) -> None:
    _, cached = prepared
    kwargs = {"mode": "train", "out_shape": OUT, "seed": 0, "masks": True}
    plain = MammogramDataset(cached, **kwargs)
    mirrored = MammogramDataset(cached, hflip_prob=1.0, **kwargs)
    a, b = plain[0], mirrored[0]
    assert torch.equal(b["image"], torch.flip(a["image"], dims=[2]))
    assert torch.equal(b["masks"], torch.flip(a["masks"], dims=[2]))
    assert b["masks"][1].sum() > 0  # the malignant lesion moved with the image
    # Deterministic (evaluation) samples are never flipped.
    evaluation = MammogramDataset(cached, mode="eval", out_shape=OUT, hflip_prob=1.0)
    assert torch.equal(
        evaluation[0]["image"], MammogramDataset(cached, mode="eval", out_shape=OUT)[0]["image"]
    )
    with pytest.raises(ValueError, match="hflip_prob"):
        MammogramDataset(cached, hflip_prob=1.5)


def test_keep_in_memory_reads_each_file_once(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    raw, _ = prepared
    copy = tmp_path / "in"
    shutil.copytree(raw.parent, copy)
    kwargs = {"mode": "train", "out_shape": OUT, "crop_iterations": 3, "crop_buffer_size": 5, "masks": True}
    reference = MammogramDataset(raw, **kwargs)
    kept = MammogramDataset(copy / "manifest.csv", keep_in_memory=True, **kwargs)
    for i in range(len(kept)):
        assert torch.equal(kept[i]["image"], reference[i]["image"])
    for png in copy.glob("*.png"):
        png.unlink()  # any second read of an image or mask would now fail
    kept.set_epoch(1)
    reference.set_epoch(1)
    for i in range(len(kept)):
        again, expected = kept[i], reference[i]  # epoch 1's windows, cut from memory
        assert torch.equal(again["image"], expected["image"])
        assert torch.equal(again["masks"], expected["masks"])


def test_dataloader_with_workers_is_reproducible(prepared: tuple[Path, Path]) -> None:
    _, cached = prepared
    ds = MammogramDataset(cached, split="train", mode="train", out_shape=OUT, seed=None)

    def run() -> torch.Tensor:
        loader = DataLoader(
            ds,
            batch_size=3,
            num_workers=2,
            # Forked workers deadlock when the parent's OpenCV/OpenMP pools were busy (earlier tests in the same
            # xdist worker): spawn them fresh.
            multiprocessing_context="spawn",
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(7),
        )
        return torch.cat([b["image"] for b in loader])

    batch = run()
    assert batch.shape == (3, 1, *OUT)
    assert torch.equal(batch, run())


def test_bad_arguments(prepared: tuple[Path, Path]) -> None:
    _, cached = prepared
    with pytest.raises(ValueError, match="mode must be one of"):
        MammogramDataset(cached, mode="test")
    with pytest.raises(ValueError, match="label_level"):
        MammogramDataset(cached, label_level="exam")
