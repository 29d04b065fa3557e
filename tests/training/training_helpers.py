"""Tiny in-memory datasets and configs for the training tests (importable from spawned DDP workers)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mammogmic.training.config import TrainConfig, load_config


class BlobImages:
    """``n`` random 1x``h``x``w`` images; malignant ones carry a bright square, benign ones a dim disc.

    Implements the loop's dataset protocol: ``labels``, ``breast_ids``, ``__len__``, ``load(index, rng)``.
    """

    def __init__(self, n: int = 16, hw: tuple[int, int] = (128, 96), seed: int = 0) -> None:
        g = np.random.default_rng(seed)
        self.hw = hw
        self.labels = np.zeros((n, 2))
        self.labels[:, 1] = np.arange(n) % 2
        self.labels[:, 0] = (np.arange(n) // 2) % 2
        self.breast_ids = [f"b{i // 2}" for i in range(n)]
        self.images = g.normal(size=(n, *hw)).astype(np.float32)
        for i in range(n):
            r, c = g.integers(8, hw[0] - 24), g.integers(8, hw[1] - 24)
            if self.labels[i, 1]:
                self.images[i, r : r + 12, c : c + 12] += 3.0
            if self.labels[i, 0]:
                self.images[i, r : r + 6, c : c + 6] -= 2.0

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        img = self.images[index]
        if rng is not None:  # tiny jitter so augmentation is exercised
            img = np.roll(img, int(rng.integers(-2, 3)), axis=1)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img)).unsqueeze(0),
            "labels": torch.from_numpy(self.labels[index].astype(np.float32)),
            "index": index,
        }


def tiny_config(**overrides: Any) -> TrainConfig:
    """The packaged tiny_cpu preset with overrides (dotted keys)."""
    return load_config("tiny_cpu", overrides)


def write_blob_manifest(
    folder: Path, n_exams: int = 6, hw: tuple[int, int] = (128, 96), seed: int = 0
) -> Path:
    """Write a small PNG dataset (4 views per exam, raw orientation) and its manifest; return the manifest.

    Right views are stored mirrored (facing left), as real raw files are; splits cycle train/train/val/test...
    """
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    blobs = BlobImages(n_exams * 4, hw, seed)
    rows = []
    splits = ["train", "train", "val", "test"]
    for i in range(n_exams * 4):
        exam, view = divmod(i, 4)
        lat, v = ("L", "R", "L", "R")[view], ("CC", "CC", "MLO", "MLO")[view]
        img = blobs.images[i]
        png = np.clip((img - img.min()) / (np.ptp(img) + 1e-6) * 4095, 0, 4095).astype(np.uint16)
        if lat == "R":
            png = png[:, ::-1]
        name = f"e{exam}_{lat}_{v}.png"
        cv2.imwrite(str(folder / name), png)
        rows.append(
            {
                "image_id": name[:-4],
                "image_path": name,
                "patient_id": f"p{exam}",
                "exam_id": f"e{exam}",
                "laterality": lat,
                "view": v,
                "benign_label": int(blobs.labels[i, 0]),
                "malignant_label": int(blobs.labels[i, 1]),
                "split": splits[exam % 4] if n_exams >= 4 else "train",
            }
        )
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return manifest


def write_heatmaps(manifest: Path, folder: Path, contract: Any) -> Path:
    """Heat-map files (``<image_id>.npz``, as ``mammogmic heatmaps`` writes them) for every row of ``manifest``:
    smooth maps in [0, 1] at the cropped image's size, different for benign and malignant; return ``folder``."""
    from mammogmic.data.sample import heatmap_file, items_from_manifest, load_source

    folder.mkdir(parents=True, exist_ok=True)
    for item in items_from_manifest(manifest):
        cropped = load_source(item, contract, heatmaps=False).cropped.astype(np.float32)
        rows = np.linspace(0.0, 1.0, cropped.shape[0], dtype=np.float32)[:, None]
        benign = cropped / max(float(cropped.max()), 1.0) * 0.5
        malignant = np.broadcast_to(rows, cropped.shape) * 0.8
        np.savez(
            heatmap_file(folder, item.image_id), benign=benign, malignant=np.ascontiguousarray(malignant)
        )
    return folder
