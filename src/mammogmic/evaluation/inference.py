"""Batch prediction with GMIC models on raw or preprocessed mammograms (the engine of ``mammogmic predict``).

Pipeline per image: read (PNG/DICOM) → breast crop → optimal centre → model-input window → standardise
(:mod:`mammogmic.data`), or the cropped image and centre of a preprocess cache when the manifest has
``cached_path`` and ``best_center``. Every member model of the ensemble runs on every window
(``tta`` random windows, or the one deterministic window), and the probabilities are averaged.

A failure on one image (unreadable file, no breast found, unknown view) is recorded with the stage it
happened in and the batch goes on.
"""

from __future__ import annotations

import logging
import math
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mammogmic.errors import CheckpointError, MammogmicError
from mammogmic.evaluation.inputs import (
    IMAGE_SUFFIXES,
    clean_id,
    dicom_exam,
    id_from_relative_path,
    scan_folder,
    strip_image_suffix,
    unique_ids,
)

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageItem",
    "ImageResult",
    "Member",
    "PrepareSettings",
    "Prepared",
    "items_from_folder",
    "items_from_manifest",
    "items_from_paths",
    "load_member",
    "predict_items",
    "prepare_item",
]


@dataclass
class ImageItem:
    """One image to predict, with whatever the manifest knows about it."""

    image_id: str
    path: Path
    view: str | None = None  # "L-CC" style; read from the file (tags or name) when None
    horizontal_flip: str = "NO"
    exam_id: str | None = None
    patient_id: str | None = None
    breast_id: str | None = None
    benign_label: float = math.nan
    malignant_label: float = math.nan
    cached_path: Path | None = None
    best_center: tuple[int, int] | None = None
    window_location: tuple[int, int, int, int] | None = None  # crop box of the cache in the raw image
    benign_mask_path: Path | None = None
    malignant_mask_path: Path | None = None
    cached_benign_mask_path: Path | None = None  # masks already cropped by ``mammogmic preprocess``
    cached_malignant_mask_path: Path | None = None


@dataclass(frozen=True)
class PrepareSettings:
    """How images become model inputs.

    Attributes:
        input_shape: model input ``(height, width)`` (official 2944×1920).
        window_shape: window cut around the optimal centre in source pixels; resized to ``input_shape``
            when different (default: ``input_shape``, the official behaviour).
        tta: number of random windows (official crop noise) averaged per image; ``<= 1`` = the single
            deterministic window.
        seed: base seed of the TTA windows (each image derives its own from its id, so results do not
            depend on batch order).
        crop_iterations: erosion/dilation iterations of the breast crop (official 100).
        load_masks: also bring the manifest's lesion masks through the same geometry.
    """

    input_shape: tuple[int, int] = (2944, 1920)
    window_shape: tuple[int, int] | None = None
    tta: int = 1
    seed: int = 0
    crop_iterations: int = 100
    load_masks: bool = False


@dataclass
class Prepared:
    """Model inputs of one image (or the error that stopped it)."""

    item: ImageItem
    inputs: np.ndarray | None = None  # (T, H, W) float32
    masks: np.ndarray | None = None  # (2, H, W) uint8 benign/malignant, when asked and available
    view: str | None = None
    error: str | None = None
    stage: str | None = None


def _with_dicom_identity(item: ImageItem) -> ImageItem:
    """Patient and exam of a DICOM file from its header (``StudyInstanceUID``, else the accession number).

    Laterality and view come from the same tags when the image is read; PNGs keep the file-name rules.
    """
    patient_id, exam_id = dicom_exam(item.path)
    if patient_id is not None:
        item.patient_id = patient_id
    if exam_id is not None:
        item.exam_id = exam_id
    return item


def items_from_paths(paths: Sequence[Path]) -> list[ImageItem]:
    """Items for single files (missing or odd ones included: reading reports them).

    Ids are the file names without the image suffix, Unicode kept; repeated names get their two parent
    folders, then a number. DICOM files get patient and exam from their header
    (:func:`mammogmic.evaluation.inputs.dicom_exam`).
    """
    stems = [strip_image_suffix(p.name) for p in paths]
    ids = []
    for p, stem in zip(paths, stems, strict=True):
        if stems.count(stem) > 1:
            ids.append(clean_id("_".join([*p.parent.parts[-2:], stem])))
        else:
            ids.append(clean_id(stem))
    return [
        _with_dicom_identity(ImageItem(image_id=image_id, path=p))
        for p, image_id in zip(paths, unique_ids(ids), strict=True)
    ]


def items_from_folder(folder: Path, exclude: Sequence[Path] = ()) -> list[ImageItem]:
    """Every image-like entry below ``folder`` (recursive, sorted); ids = path relative to the folder.

    Entries named like images that are not files (folders, dangling links, FIFOs) and extension-less
    files with DICOM content are included (see :func:`mammogmic.evaluation.inputs.scan_folder`), so that
    each one ends up predicted or in ``errors.csv``. DICOM files get patient and exam from their header.

    Args:
        folder: input folder.
        exclude: folders to skip (e.g. the output folder when it lies inside the input).
    """
    paths = scan_folder(folder, exclude).paths
    ids = unique_ids([id_from_relative_path(p.relative_to(folder)) for p in paths])
    return [_with_dicom_identity(ImageItem(image_id=i, path=p)) for p, i in zip(paths, ids, strict=True)]


def items_from_manifest(path: Path) -> list[ImageItem]:
    """Items from a manifest CSV, read and validated by :func:`mammogmic.data.manifest.load_manifest`.

    Labels and masks are used when present; rows written by ``mammogmic preprocess`` (``cached_path``
    + ``best_center``) load the cached crop and skip the crop and centre stages.

    Raises:
        ManifestError: unreadable manifest or bad rows (all listed by line).
    """
    from mammogmic.data.manifest import load_manifest

    manifest = load_manifest(path)

    def label(value: int | None) -> float:
        return math.nan if value is None else float(value)

    items = []
    for row in manifest:
        cached = row.preprocessed
        window = row.window_location
        items.append(
            ImageItem(
                image_id=row.image_id,
                path=manifest.resolve(row.image_path) or manifest.root,
                view=row.full_view,
                horizontal_flip=row.horizontal_flip,
                exam_id=row.exam_id,
                patient_id=row.patient_id,
                breast_id=row.breast_id,
                benign_label=label(row.benign_label),
                malignant_label=label(row.malignant_label),
                cached_path=manifest.resolve(row.cached_path) if cached else None,
                best_center=(int(row.best_center[0]), int(row.best_center[1]))
                if cached and row.best_center
                else None,
                window_location=(
                    (int(window[0]), int(window[1]), int(window[2]), int(window[3]))
                    if cached and window
                    else None
                ),
                benign_mask_path=manifest.resolve(row.benign_mask_path),
                malignant_mask_path=manifest.resolve(row.malignant_mask_path),
                cached_benign_mask_path=manifest.resolve(row.extra.get("cached_benign_mask_path"))
                if cached
                else None,
                cached_malignant_mask_path=(
                    manifest.resolve(row.extra.get("cached_malignant_mask_path")) if cached else None
                ),
            )
        )
    return items


def _read_cached(path: Path) -> np.ndarray:
    """A cached crop or mask: ``.npy`` from ``mammogmic preprocess`` (never unpickled) or an image file."""
    from mammogmic.data import read_image
    from mammogmic.errors import ImageReadError

    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ImageReadError(
                f"{path}: unreadable cache file ({exc}); rerun mammogmic preprocess"
            ) from exc
        if array.ndim != 2:
            raise ImageReadError(f"{path}: cache array has shape {array.shape}, expected 2-D")
        return np.asarray(array)
    return read_image(path)[0]


def _tta_rng(settings: PrepareSettings, image_id: str) -> np.random.Generator:
    return np.random.default_rng([settings.seed, zlib.crc32(image_id.encode("utf-8"))])


def prepare_item(item: ImageItem, settings: PrepareSettings) -> Prepared:
    """Read and preprocess one image into ``(T, H, W)`` standardised windows; errors are returned, not raised."""
    from mammogmic.data import TRAIN_NOISE, best_center, crop_breast, model_input, read_image, read_mask

    stage = "read"
    try:
        window = settings.window_shape or settings.input_shape
        if item.cached_path is not None and item.best_center is not None:
            cropped = _read_cached(item.cached_path)
            if item.view is None:
                raise MammogmicError(
                    f"{item.cached_path}: cached image without laterality/view in the manifest"
                )
            view = item.view
            center = item.best_center
            crop_box = item.window_location
        else:
            pixels, meta = read_image(item.path)
            view = item.view or meta.full_view
            stage = "crop"
            crop = crop_breast(pixels, view, item.horizontal_flip, iterations=settings.crop_iterations)
            cropped = crop.cropped
            stage = "center"
            center = best_center(crop, horizontal_flip=item.horizontal_flip, window_shape=window)
            crop_box = crop.window_location
        masks = None
        sources = (
            (item.cached_benign_mask_path, item.benign_mask_path),
            (item.cached_malignant_mask_path, item.malignant_mask_path),
        )
        if settings.load_masks and any(c or r for c, r in sources):
            stage = "masks"
            masks = []
            for cached_mask, raw_mask in sources:
                if cached_mask is not None:
                    mask = _read_cached(cached_mask) != 0
                elif raw_mask is not None:
                    mask = read_mask(raw_mask)
                    if crop_box is None:
                        raise MammogmicError(
                            f"{raw_mask}: cannot align the mask: the manifest has no window_location"
                        )
                    top, bottom, left, right = crop_box  # raw-image coordinates: crop like the image
                    mask = mask[top:bottom, left:right]
                else:
                    mask = np.zeros(cropped.shape, dtype=bool)
                if mask.shape != cropped.shape:
                    path = cached_mask or raw_mask
                    raise MammogmicError(
                        f"{path}: mask does not cover the image (after cropping {mask.shape} vs {cropped.shape})"
                    )
                masks.append(mask)
        stage = "window"
        n = max(1, settings.tta)
        rng = _tta_rng(settings, item.image_id) if settings.tta > 1 else None
        noise = TRAIN_NOISE if settings.tta > 1 else None
        windows = []
        out_masks = None
        for t in range(n):
            kwargs: dict[str, Any] = {
                "rng": rng,
                "noise": noise,
                "out_shape": settings.input_shape,
                "horizontal_flip": item.horizontal_flip,
                "window_shape": window,
            }
            if masks is not None and t == 0:
                image, out_masks = model_input(cropped, view, center, masks=masks, **kwargs)
            else:
                image = model_input(cropped, view, center, **kwargs)
            windows.append(image)
        return Prepared(item, np.stack(windows).astype(np.float32, copy=False), out_masks, view)
    except (MammogmicError, OSError, ValueError) as exc:
        message = str(exc)
        if str(item.path) not in message:  # every error names the file it is about
            message = f"{item.path}: {message}"
        return Prepared(item, error=message, stage=stage)


@dataclass
class Member:
    """One model of an ensemble."""

    name: str
    model: Any  # GMIC or ResNetBaseline
    source: str
    percent_t: float | None = None


def load_member(
    path: Path,
    percent_t: float | None = None,
    device: str = "cpu",
    fuse: bool = True,
    compile: bool = False,
) -> Member:
    """Load our ``.safetensors`` model or an official ``.p`` file (``percent_t`` needed for those).

    For official files named ``sample_model_N.p`` the released t of model N is used when
    ``percent_t`` is not given. With ``fuse`` the BatchNorms are folded into the convolutions
    (:func:`mammogmic.models.fuse_for_inference`) and the weights are made channels-last: same outputs to
    float32 rounding, faster. With ``compile`` the model also goes through
    :func:`mammogmic.models.compile_for_inference` (TorchInductor; compiles on the first batch of each shape).

    Raises:
        CheckpointError: unreadable/unsafe file, or an official file whose t is unknown.
        MammogmicError: ``compile`` without a C++ compiler.
    """
    from mammogmic.models import (
        RELEASED_PERCENT_T,
        compile_for_inference,
        fuse_for_inference,
        load_model,
        load_official_checkpoint,
    )

    model: Any
    if path.suffix == ".p":
        if percent_t is None:
            match = re.fullmatch(r"sample_model_(\d)", path.stem)
            if match and int(match.group(1)) in RELEASED_PERCENT_T:
                percent_t = RELEASED_PERCENT_T[int(match.group(1))]
            else:
                raise CheckpointError(f"{path}: official checkpoint needs its t: pass --percent-t for it")
        model = load_official_checkpoint(path, percent_t=percent_t).to(device)
    else:
        model = load_model(path, device=device)
    model.eval()
    if fuse:
        # Inference-only fast path: BatchNorms folded and channels-last weights (about 1.4x faster on CPU,
        # benchmarks/README.md), equal to the plain model to float32 rounding.
        import torch

        model = fuse_for_inference(model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if getattr(model.config, "in_channels", 1) != 1:
        raise CheckpointError(
            f"{path}: model expects {model.config.in_channels} input channels; predict feeds 1"
        )
    if compile:
        model = compile_for_inference(model)
    return Member(name=path.stem, model=model, source=str(path), percent_t=percent_t)


@dataclass
class ImageResult:
    """Averaged prediction of one image and, for the first member and window, its explanation."""

    item: ImageItem
    view: str
    benign: float
    malignant: float
    member_probs: dict[str, tuple[float, float]] = field(default_factory=dict)
    saliency: np.ndarray | None = None  # (2, h, w)
    patch_locations: np.ndarray | None = None  # (K, 2)
    patch_attention: np.ndarray | None = None  # (K,)
    crop_size: tuple[int, int] | None = None
    image: np.ndarray | None = None  # (H, W) first window, when asked
    masks: np.ndarray | None = None


def _batches(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


class _PrepareDataset:
    """Map-style dataset for a torch DataLoader (parallel preprocessing)."""

    def __init__(self, items: Sequence[ImageItem], settings: PrepareSettings) -> None:
        self.items = items
        self.settings = settings

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Prepared:
        return prepare_item(self.items[index], self.settings)


def predict_items(
    items: Sequence[ImageItem],
    members: Sequence[Member],
    settings: PrepareSettings,
    batch_size: int = 4,
    device: str = "cpu",
    dtype: str = "fp32",
    workers: int = 0,
    keep_explanations: bool = False,
    keep_images: bool = False,
    on_error: Callable[[Prepared], None] | None = None,
    on_result: Callable[[ImageResult], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ImageResult]:
    """Predict ``items`` with the ensemble ``members``.

    Args:
        items: images.
        members: loaded models; probabilities are averaged over members and TTA windows.
        settings: preprocessing.
        batch_size: images per forward pass (each image contributes ``tta`` windows).
        device: torch device string.
        dtype: ``fp32`` or ``bf16`` (autocast).
        workers: preprocessing worker processes (0: in this process).
        keep_explanations: keep saliency and patches of the first member on the first window.
        keep_images: keep the first window (for figures).
        on_error: called with each failed :class:`Prepared`.
        on_result: called with each :class:`ImageResult` as soon as it exists.
        progress: called with the number of images finished after each batch.

    Returns:
        Results of the images that succeeded, in input order.
    """
    import torch
    from torch.utils.data import DataLoader

    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
    if not members:
        raise ValueError("no models given")
    dev = torch.device(device)
    loader: DataLoader[Prepared] = DataLoader(
        _PrepareDataset(items, settings),  # type: ignore[arg-type]
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=list,
        shuffle=False,
    )
    results: list[ImageResult] = []
    for batch in loader:
        good = [p for p in batch if p.error is None]
        for p in batch:
            if p.error is not None and on_error is not None:
                on_error(p)
        if good:
            arrays = [p.inputs for p in good if p.inputs is not None]
            x = torch.from_numpy(np.concatenate(arrays))[:, None].to(dev)  # (B·T, 1, H, W)
            counts = [a.shape[0] for a in arrays]
            probs_sum = torch.zeros(len(good), 2, dtype=torch.float64)
            member_probs: list[dict[str, tuple[float, float]]] = [{} for _ in good]
            first_out = None
            for m_index, member in enumerate(members):
                with (
                    torch.inference_mode(),
                    torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16"),
                ):
                    out = member.model(x)
                pred = out.prediction.float().cpu().double()
                per_image = torch.stack([chunk.mean(0) for chunk in torch.split(pred, counts)])
                probs_sum += per_image
                for i, row in enumerate(per_image.tolist()):
                    member_probs[i][member.name] = (row[0], row[1])
                if m_index == 0 and keep_explanations and hasattr(out, "saliency"):
                    first_out = out
            probs = (probs_sum / len(members)).tolist()
            offsets = np.cumsum([0, *counts])[:-1]
            for i, p in enumerate(good):
                res = ImageResult(
                    item=p.item,
                    view=p.view or "",
                    benign=probs[i][0],
                    malignant=probs[i][1],
                    member_probs=member_probs[i] if len(members) > 1 else {},
                    masks=p.masks,
                )
                if first_out is not None:
                    j = int(offsets[i])
                    res.saliency = first_out.saliency[j].float().cpu().numpy()
                    res.patch_locations = first_out.patch_locations[j].cpu().numpy()
                    res.patch_attention = first_out.patch_attention[j].float().cpu().numpy()
                    res.crop_size = tuple(members[0].model.config.crop_size)
                if keep_images:
                    res.image = arrays[i][0]
                results.append(res)
                if on_result is not None:
                    on_result(res)
        if progress is not None:
            progress(len(batch))
    return results


def default_workers() -> int:
    """A modest number of preprocessing workers: half the CPUs, at most 4, 0 on 1-2 CPU machines."""
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(4, cpus // 2)
