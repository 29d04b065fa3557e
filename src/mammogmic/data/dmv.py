"""Training samples of DMV-CNN and of its patch classifier, built by the one sample path (:mod:`mammogmic.data.sample`).

:class:`ExamDataset` gives DMV-CNN's four-view exams with breast labels::

    sample["image"]    {"L-CC": (C, h, w), "R-CC": ..., "L-MLO": (C, h', w'), "R-MLO": ...} float32
    sample["labels"]   (4,) float32 in DMV_LABELS order: left_benign, right_benign, left_malignant,
                       right_malignant (NaN = unknown)

Each view is read, cropped and centred under the run's contract (:func:`~mammogmic.data.sample.load_source`)
and windowed under its view angle's DMV-CNN contract (:func:`~mammogmic.data.sample.dmv_contracts`); with heat
maps (``contract.heatmaps``) the benign and malignant maps follow as channels 1 and 2. Exams that lack a view
or hold one twice are left out with a warning.

:class:`PatchDataset` gives the patch classifier's patches with their class (``image`` (1, P, P), ``labels``
one-hot (4,)): centred on a malignant-mask pixel (class 0), a benign-mask pixel (class 1), breast tissue with no
lesion in the patch (class 2) or background (class 3), cut from the image the heat maps are made from
(:func:`~mammogmic.data.sample.heatmap_input`).

Both follow the training loop's dataset protocol: ``labels`` ``(n, 2)`` (benign, malignant; what balanced
sampling and the metrics read), ``breast_ids``, ``__len__`` and ``load(index, rng)`` (``rng``: an augmented
sample; ``None``: the deterministic one).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from mammogmic.data.manifest import Manifest, load_manifest
from mammogmic.data.preprocessing import VIEWS, orient
from mammogmic.data.sample import (
    ImageItem,
    InputContract,
    SampleError,
    attach_heatmaps,
    breast_labels,
    dmv_contract,
    dmv_contracts,
    heatmap_input,
    items_from_manifest,
    load_source,
    window_sample,
)

logger = logging.getLogger(__name__)

__all__ = ["PATCH_CLASS_NAMES", "ExamDataset", "PatchDataset", "four_view_exams"]


def _items(
    manifest: Manifest | str | os.PathLike[str], split: str | None, heatmaps_dir: Any
) -> list[ImageItem]:
    table = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    items = items_from_manifest(table, split=split)
    attach_heatmaps(items, Path(heatmaps_dir) if heatmaps_dir else None)
    return items


def four_view_exams(items: Sequence[ImageItem]) -> tuple[list[tuple[str, dict[str, ImageItem]]], list[str]]:
    """The exams of ``items`` (by ``exam_id``, in order of first appearance) that have exactly one image of
    each view L-CC, R-CC, L-MLO, R-MLO, and the reasons the others were left out."""
    groups: dict[str, list[ImageItem]] = {}
    for item in items:
        groups.setdefault(item.exam_id or item.image_id, []).append(item)
    exams, skipped = [], []
    for exam_id, group in groups.items():
        views = [str(item.view) for item in group]
        missing = [v for v in VIEWS if v not in views]
        twice = sorted({v for v in views if views.count(v) > 1})
        if missing or twice:
            what = "; ".join(
                part
                for part in (
                    f"lacks {', '.join(missing)}" if missing else "",
                    f"has two or more {', '.join(twice)}" if twice else "",
                )
                if part
            )
            skipped.append(f"{exam_id}: {what}")
            continue
        exams.append((exam_id, {str(item.view): item for item in group}))
    return exams, skipped


class ExamDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """DMV-CNN's training exams of a manifest split (see the module docstring).

    Args:
        manifest: a :class:`~mammogmic.data.manifest.Manifest` or a manifest CSV path.
        split: keep only rows of this split (``None``: all).
        contract: the run's contract (crop, centre, noise, heat maps); DMV-CNN's windows are
            ``dmv_contracts(contract)``.
        heatmaps_dir: folder of ``mammogmic heatmaps`` outputs for rows without ``heatmap_path``.
    """

    def __init__(
        self,
        manifest: Manifest | str | os.PathLike[str],
        *,
        split: str | None = None,
        contract: InputContract,
        heatmaps_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.contract = contract
        self.contracts = dmv_contracts(contract)
        self.exams, self.skipped = four_view_exams(_items(manifest, split, heatmaps_dir))
        if self.skipped:
            shown = "; ".join(self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else "")
            logger.warning(
                "%d exam(s) of split %s left out: DMV-CNN needs one image of each of the four views (%s)",
                len(self.skipped),
                split,
                shown,
            )
        targets = []
        for _, views in self.exams:
            left = breast_labels([views["L-CC"], views["L-MLO"]])
            right = breast_labels([views["R-CC"], views["R-MLO"]])
            targets.append([left[0], right[0], left[1], right[1]])
        #: (n, 4) breast labels in DMV_LABELS order (the loss target).
        self.targets = np.array(targets, dtype=np.float32).reshape(-1, 4)
        with np.errstate(all="ignore"):
            benign = np.fmax(self.targets[:, 0], self.targets[:, 1])
            malignant = np.fmax(self.targets[:, 2], self.targets[:, 3])
        #: (n, 2) exam labels (benign, malignant): positive when either breast is (balanced sampling).
        self.labels = np.stack([benign, malignant], axis=1).astype(np.float32)
        self.exam_ids = [exam_id for exam_id, _ in self.exams]
        self.breast_ids = self.exam_ids

    def __len__(self) -> int:
        return len(self.exams)

    def load(self, index: int, rng: Any = None) -> dict[str, Any]:
        """Exam ``index``: ``rng`` given → augmented windows (drawn L-CC, R-CC, L-MLO, R-MLO), ``None`` → the
        deterministic ones."""
        exam_id, views = self.exams[index]
        image = {}
        for view in VIEWS:
            item = views[view]
            try:
                source = load_source(item, self.contract)
            except SampleError as exc:
                raise SampleError(f"exam {exam_id}, {item.image_id}: {exc}", exc.stage) from exc
            window, _ = window_sample(source, dmv_contract(view, self.contracts), rng=rng)
            image[view] = torch.from_numpy(window)
        return {
            "image": image,
            "labels": torch.from_numpy(self.targets[index].copy()),
            "index": index,
            "image_id": exam_id,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index)


#: The patch classifier's classes, by index (:data:`mammogmic.models.patch.PATCH_CLASSES`' meaning).
PATCH_CLASS_NAMES = ("malignant", "benign", "tissue", "background")


class PatchDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Patches for DMV-CNN's patch classifier from the images (and lesion masks) of a manifest split.

    Every image gives ``per_class`` patches of class 2 (tissue) and 3 (background); an image whose malignant
    (benign) label is 1 and that has a mask of that kind also gives ``per_class`` patches of class 0 (1).
    Augmented samples draw their centre at random among the class's candidate pixels; deterministic ones take
    the candidate a generator seeded with ``(seed, index)`` picks, so validation patches stay the same.

    Args:
        manifest: a :class:`~mammogmic.data.manifest.Manifest` or a manifest CSV path.
        split: keep only rows of this split.
        contract: crop settings of the run (the patches are cut from the whole cropped image).
        size: patch side in pixels.
        per_class: patches per class and image.
        seed: seed of the deterministic patches.

    Raises:
        SampleError (when loading): an image smaller than a patch, an empty lesion mask or no background pixel
            (value 0, the crop's background) in the cropped image.
    """

    def __init__(
        self,
        manifest: Manifest | str | os.PathLike[str],
        *,
        split: str | None = None,
        contract: InputContract,
        size: int = 256,
        per_class: int = 2,
        seed: int = 0,
    ) -> None:
        self.contract = contract
        self.size = int(size)
        self.seed = seed
        self.images = _items(manifest, split, None)
        slots: list[tuple[int, int]] = []  # (image index, class)
        for i, item in enumerate(self.images):
            classes = []
            if item.malignant_label == 1 and (item.malignant_mask_path or item.cached_malignant_mask_path):
                classes.append(0)
            if item.benign_label == 1 and (item.benign_mask_path or item.cached_benign_mask_path):
                classes.append(1)
            classes += [2, 3]
            slots += [(i, c) for c in classes for _ in range(per_class)]
        self.slots = slots
        #: Class of each patch.
        self.classes = np.array([c for _, c in slots], dtype=np.int64)
        #: (n, 2) benign / malignant indicator of each patch (metrics: one class against the rest).
        self.labels = (
            np.stack([self.classes == 1, self.classes == 0], axis=1).astype(np.float32).reshape(-1, 2)
        )
        self.breast_ids = [f"{self.images[i].image_id}#{k}" for k, (i, _) in enumerate(slots)]

    def __len__(self) -> int:
        return len(self.slots)

    def _candidates(
        self, item: ImageItem, cropped: np.ndarray, masks: list[np.ndarray] | None, cls: int
    ) -> np.ndarray:
        """Boolean map (oriented) of the pixels a patch of class ``cls`` may be centred on."""
        view, flip = str(item.view), item.horizontal_flip
        tissue = orient(cropped > 0, view, flip)
        lesion = [np.zeros(cropped.shape, bool)] * 2 if masks is None else [m != 0 for m in masks]
        benign, malignant = (orient(m, view, flip) for m in lesion)
        if cls == 0:
            out, what = malignant, "malignant mask is empty after the crop"
        elif cls == 1:
            out, what = benign, "benign mask is empty after the crop"
        elif cls == 2:
            any_lesion = (benign | malignant).astype(np.uint8)
            near = cv2.dilate(any_lesion, np.ones((self.size, self.size), np.uint8)) > 0
            out, what = tissue & ~near, "no breast tissue a patch away from every lesion"
        else:
            out, what = ~tissue, "no background pixel (value 0) in the cropped image"
        if not out.any():
            raise SampleError(f"{item.path}: cannot draw a {PATCH_CLASS_NAMES[cls]} patch: {what}", "patches")
        return out

    def load(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Patch ``index``: ``image`` (1, P, P) float32, ``labels`` one-hot (4,), ``index``, ``image_id`` and
        ``position`` (top, left) in the oriented cropped image."""
        image_index, cls = self.slots[index]
        item = self.images[image_index]
        source = load_source(item, self.contract, masks=cls in (0, 1, 2), heatmaps=False)
        image = heatmap_input(source.cropped, source.view, source.horizontal_flip)
        h, w = image.shape
        p = self.size
        if h < p or w < p:
            raise SampleError(
                f"{item.path}: cropped image {h}x{w} is smaller than a {p}x{p} patch", "patches"
            )
        rows, cols = np.nonzero(self._candidates(item, source.cropped, source.masks, cls))
        pick = (rng or np.random.default_rng([self.seed, index])).integers(len(rows))
        top = int(np.clip(rows[pick] - p // 2, 0, h - p))
        left = int(np.clip(cols[pick] - p // 2, 0, w - p))
        patch = np.ascontiguousarray(image[top : top + p, left : left + p])
        labels = np.zeros(4, dtype=np.float32)
        labels[cls] = 1.0
        return {
            "image": torch.from_numpy(patch[None]),
            "labels": torch.from_numpy(labels),
            "index": index,
            "image_id": self.breast_ids[index],
            "position": (top, left),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index)
