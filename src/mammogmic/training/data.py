"""Training/evaluation samples from a manifest, with per-sample seeded augmentation.

:class:`ManifestImages` is what the training loop consumes: labels and ids as arrays (so samplers never read
pixels) and ``load(index, rng)`` returning a standardised model input. It reads each image, turns it to face
right (the project's convention: chest wall at column 0; right views are mirrored unless the manifest's
``horizontal_flip`` says the opposite), takes a window (the cached preprocessing window when the manifest holds a
``cached_path``, else the whole image), optionally jitters that window's position and size (``rng`` given), resizes
it to ``out_shape`` and standardises it per image (mean 0, std 1), like the official pipeline. Masks go through
the same geometry with nearest-neighbour resizing.

:class:`SeededSamples` wraps it as a :class:`torch.utils.data.Dataset` indexed by the ``(index, epoch)`` pairs
of :class:`~mammogmic.training.sampler.EpochSampler`; each sample's RNG is ``default_rng([seed, epoch, index])``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from mammogmic.errors import ManifestError

__all__ = ["ManifestImages", "SeededSamples", "read_manifest_table"]

logger = logging.getLogger(__name__)


def read_manifest_table(path: str | Path) -> Any:
    """Read and validate a manifest CSV (:func:`mammogmic.data.load_manifest`) as a DataFrame of strings."""
    from mammogmic.data.manifest import load_manifest

    return load_manifest(path).to_dataframe()


def _label(value: Any) -> float:
    text = str(value).strip()
    if text in ("", "nan", "None"):
        return float("nan")
    try:
        return float(int(float(text)))
    except ValueError as exc:
        raise ManifestError(f"label value {value!r} is not 0, 1 or empty") from exc


def _read_gray(path: Path) -> np.ndarray:
    """Pixels of a PNG, DICOM or ``.npy`` cache file through the project's reader (same checks and errors)."""
    from mammogmic.data.io import read_image

    return read_image(path)[0]


@dataclass(frozen=True)
class _Row:
    image_path: Path
    flip: bool
    window: tuple[int, int, int, int] | None  # top, bottom, left, right in the right-facing frame
    mask_paths: tuple[Path | None, Path | None]


class ManifestImages:
    """Images of one split of a manifest, ready for the training loop.

    Args:
        manifest: manifest CSV path.
        split: keep the rows whose ``split`` equals this (``None`` = all rows).
        out_shape: (height, width) of the model input.
        label_level: ``image`` or ``breast`` (each view takes its breast's labels).
        max_crop_noise: maximal (rows, cols) window shift in source pixels when augmenting.
        max_crop_size_noise: maximal window size change in source pixels when augmenting.
        with_masks: also return per-class lesion masks (``mask``: (2, H, W) uint8) when the manifest has them.

    Attributes:
        labels: (n, 2) float array, columns benign, malignant; NaN = unknown.
        image_ids, breast_ids, exam_ids: per row identifiers.
    """

    def __init__(
        self,
        manifest: str | Path,
        *,
        split: str | None = None,
        out_shape: tuple[int, int] = (2944, 1920),
        label_level: str = "image",
        max_crop_noise: tuple[int, int] = (0, 0),
        max_crop_size_noise: int = 0,
        with_masks: bool = False,
    ) -> None:
        self.manifest = Path(manifest)
        table = read_manifest_table(self.manifest)
        if split is not None:
            if "split" not in table.columns:
                raise ManifestError(f"{self.manifest}: no 'split' column, cannot select split {split!r}")
            table = table[table["split"].astype(str) == split]
        self.out_shape = tuple(out_shape)
        self.max_crop_noise = tuple(max_crop_noise)
        self.max_crop_size_noise = int(max_crop_size_noise)
        self.with_masks = with_masks
        root = self.manifest.parent
        cols = set(table.columns)

        def col(name: str, default: str = "") -> list[str]:
            return [str(v) for v in table[name]] if name in cols else [default] * len(table)

        prefix = "breast_" if label_level == "breast" else ""
        if label_level == "breast" and not {"breast_benign_label", "breast_malignant_label"} <= cols:
            raise ManifestError(
                f"{self.manifest}: label_level 'breast' needs breast_benign_label/breast_malignant_label"
            )
        self.labels = np.array(
            [
                [_label(b), _label(m)]
                for b, m in zip(col(f"{prefix}benign_label"), col(f"{prefix}malignant_label"), strict=True)
            ],
            dtype=np.float64,
        ).reshape(-1, 2)
        self.image_ids = col("image_id")
        self.exam_ids = col("exam_id")
        lat = col("laterality")
        self.breast_ids = [
            b if b else f"{e}_{la}" for b, e, la in zip(col("breast_id"), self.exam_ids, lat, strict=True)
        ]
        self.views = col("view")

        def resolve(p: str) -> Path | None:
            if not p or p == "nan":
                return None
            q = Path(p)
            return q if q.is_absolute() else root / q

        rows = []
        for path, cached, la, hflip, window, bm, mm in zip(
            col("image_path"),
            col("cached_path"),
            lat,
            col("horizontal_flip", "NO"),
            col("window_location"),
            col("benign_mask_path"),
            col("malignant_mask_path"),
            strict=True,
        ):
            # Raw files: left views face right, right views face left; horizontal_flip=YES swaps the rule.
            flip = (la.upper() == "R") != (hflip.upper() == "YES")
            win = None
            src = resolve(path)
            if cached and cached != "nan":
                src = resolve(cached)
            elif window and window != "nan":
                try:
                    top, bottom, left, right = (int(v) for v in json.loads(window))
                    win = (top, bottom, left, right)
                except (ValueError, TypeError):
                    win = None
            assert src is not None
            rows.append(_Row(src, flip, win, (resolve(bm), resolve(mm))))
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def _window(self, shape: tuple[int, int], rng: np.random.Generator | None) -> tuple[int, int, int, int]:
        h, w = shape
        if rng is None or (self.max_crop_size_noise == 0 and not any(self.max_crop_noise)):
            return 0, h, 0, w
        s = self.max_crop_size_noise
        dh = int(rng.integers(-s, s + 1)) if s else 0
        dw = int(round(dh * w / h))
        nh, nw = max(8, h + dh), max(8, w + dw)
        ny, nx = self.max_crop_noise
        oy = int(rng.integers(-ny, ny + 1)) if ny else 0
        ox = int(rng.integers(-nx, nx + 1)) if nx else 0
        top = (h - nh) // 2 + oy
        left = (w - nw) // 2 + ox
        return top, top + nh, left, left + nw

    @staticmethod
    def _take(img: np.ndarray, box: tuple[int, int, int, int], fill: float) -> np.ndarray:
        """Cut ``box`` (top, bottom, left, right) from ``img``, padding with ``fill`` outside the image."""
        top, bottom, left, right = box
        h, w = img.shape
        out = np.full((bottom - top, right - left), fill, dtype=img.dtype)
        sy0, sy1 = max(0, top), min(h, bottom)
        sx0, sx1 = max(0, left), min(w, right)
        if sy1 > sy0 and sx1 > sx0:
            out[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = img[sy0:sy1, sx0:sx1]
        return out

    def load(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Model input for row ``index``: ``image`` (1, H, W) float32 standardised, ``label`` (2,), ``index``.

        With ``rng`` the window is jittered (training augmentation / TTA); without, it is deterministic.
        """
        row = self.rows[index]
        raw = _read_gray(row.image_path).astype(np.float32)
        if row.flip:
            raw = raw[:, ::-1]
        if row.window is not None:
            t, b, left, r = row.window
            raw = raw[t:b, left:r]
        box = self._window(raw.shape, rng)
        img = self._take(raw, box, 0.0)
        oh, ow = self.out_shape
        img = cv2.resize(
            img, (ow, oh), interpolation=cv2.INTER_AREA if img.shape[0] > oh else cv2.INTER_CUBIC
        )
        img = (img - img.mean()) / max(float(img.std()), 1e-5)
        sample: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).unsqueeze(0),
            "label": torch.from_numpy(self.labels[index].astype(np.float32)),
            "index": index,
        }
        if self.with_masks:
            masks: list[np.ndarray] = []
            for mpath in row.mask_paths:
                if mpath is None:
                    masks.append(np.zeros((oh, ow), dtype=np.uint8))
                    continue
                m = (_read_gray(mpath) > 0).astype(np.uint8)
                if row.flip:
                    m = m[:, ::-1]
                if row.window is not None:
                    t, b, left, r = row.window
                    m = m[t:b, left:r]
                m = self._take(m, box, 0)
                masks.append(cv2.resize(m, (ow, oh), interpolation=cv2.INTER_NEAREST))
            sample["mask"] = torch.from_numpy(np.stack(masks))
        return sample


class SeededSamples(torch.utils.data.Dataset[dict[str, Any]]):
    """Dataset over ``(index, epoch)`` pairs; augmentation RNG = ``default_rng([seed, epoch, index])``.

    Args:
        images: the source (:class:`ManifestImages` or anything with ``load(index, rng)`` and ``__len__``).
        augment: jitter windows (training, TTA) or not (plain evaluation).
        seed: base seed.
    """

    def __init__(self, images: Any, *, augment: bool, seed: int = 0) -> None:
        self.images = images
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | Sequence[int]) -> dict[str, Any]:
        if isinstance(key, int):
            index, epoch = key, 0
        else:
            index, epoch = int(key[0]), int(key[1])
        rng = np.random.default_rng([self.seed, epoch, index]) if self.augment else None
        return dict(self.images.load(index, rng))
