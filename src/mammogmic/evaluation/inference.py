"""Batch prediction with GMIC models on raw or preprocessed mammograms (the engine of ``mammogmic predict``).

Inputs are built by the one sample path that training uses (:mod:`mammogmic.data.sample`), under each model's
own :class:`~mammogmic.data.sample.InputContract` (stored in the model file by the trainer): read (PNG/DICOM)
→ breast crop → optimal centre → model-input window → standardise, or the cropped image and centre of a
preprocess cache when the manifest has ``cached_path`` and ``best_center``. Every member model of the ensemble
runs on every window (``tta`` random windows, or the one deterministic window), and the probabilities are
averaged.

A failure on one image (unreadable file, no breast found, unknown view) is recorded with the stage it
happened in and the batch goes on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mammogmic.data.cache import sha256_file
from mammogmic.data.sample import (
    OFFICIAL_CONTRACT,
    ImageItem,
    InputContract,
    InputGeometry,
    SampleError,
    input_geometry,
    items_from_manifest,
    load_source,
    window_samples,
)
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
    "model_contract",
    "predict_items",
    "prepare_item",
]


@dataclass(frozen=True)
class PrepareSettings:
    """How predict turns images into inputs beyond each model's own :class:`InputContract`.

    Attributes:
        tta: number of random windows (the contract's crop noise) averaged per image; ``<= 1`` = the single
            deterministic window.
        seed: base seed of the TTA windows (each image derives its own from its id, so results do not
            depend on batch order).
        load_masks: also bring the lesion masks through the same geometry.
    """

    tta: int = 1
    seed: int = 0
    load_masks: bool = False


@dataclass
class Prepared:
    """Model inputs of one image, one ``(T, C, H, W)`` float32 array per contract (or the error that stopped it)."""

    item: ImageItem
    inputs: list[np.ndarray] = field(default_factory=list)
    masks: np.ndarray | None = None  # (2, H, W) uint8 benign/malignant of the first contract, when asked
    view: str | None = None
    error: str | None = None
    stage: str | None = None
    geometry: InputGeometry | None = None  # first window of the first contract in the source image


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


def prepare_item(item: ImageItem, contracts: Sequence[InputContract], settings: PrepareSettings) -> Prepared:
    """Inputs of one image for each contract (:mod:`mammogmic.data.sample`); errors are returned, not raised.

    A contract with heat maps reads the item's ``heatmap_path`` (:func:`~mammogmic.data.sample.attach_heatmaps`)
    and gives ``(T, 3, H, W)`` inputs.
    """
    inputs = []
    masks = None
    view = None
    geometry = None
    for index, contract in enumerate(contracts):
        try:
            source = load_source(item, contract, masks=settings.load_masks and index == 0)
        except SampleError as exc:
            return Prepared(item, error=str(exc), stage=exc.stage)
        try:
            windows, window_masks = window_samples(
                source, contract, settings.tta, settings.seed, item.image_id
            )  # (T, C, H, W)
        except (MammogmicError, ValueError) as exc:
            return Prepared(item, error=f"{item.path}: {exc}", stage="window")
        inputs.append(windows)
        if index == 0:
            masks, view = window_masks, source.view
            geometry = input_geometry(source, contract, settings.tta, settings.seed, item.image_id)
    return Prepared(item, inputs, masks, view, geometry=geometry)


@dataclass
class Member:
    """One model of an ensemble, with the input contract it was trained with."""

    name: str
    model: Any  # GMIC or ResNetBaseline
    source: str
    percent_t: float | None = None
    contract: InputContract = OFFICIAL_CONTRACT
    sha256: str | None = None
    dtype: str = "fp32"  # "bf16": the model's backbones already hold bf16 weights (cast_for_bf16)


def model_contract(path: Path) -> InputContract:
    """The input contract a model file was trained with.

    Official ``.p`` files: the official pipeline. Our ``.safetensors``: the contract the trainer stored;
    files written before contracts existed fall back to their training config's input size (or the official
    pipeline when they have none).

    Raises:
        CheckpointError: a stored contract that is not valid.
    """
    from mammogmic.models import read_model_metadata

    if path.suffix == ".p":
        return OFFICIAL_CONTRACT
    extra = read_model_metadata(path).get("extra") or {}
    stored = extra.get("input_contract")
    if stored is not None:
        try:
            return InputContract.from_dict(stored)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad input_contract in the model metadata: {exc}") from None
    data = (extra.get("training_config") or {}).get("data") or {}
    if data.get("out_shape"):
        return InputContract(input_shape=tuple(data["out_shape"]))
    return OFFICIAL_CONTRACT


def load_member(
    path: Path,
    percent_t: float | None = None,
    device: str = "cpu",
    fuse: bool = True,
    compile: bool = False,
    dtype: str = "fp32",
) -> Member:
    """Load our ``.safetensors`` model or an official ``.p`` file, with its input contract.

    For official files the t comes from :func:`mammogmic.models.official_percent_t` (``percent_t``, else the
    released t of ``sample_model_N.p``). With ``fuse`` the BatchNorms are folded into the convolutions
    (:func:`mammogmic.models.fuse_for_inference`) and the weights are made channels-last: same outputs to
    float32 rounding, faster. With ``compile`` the model also goes through
    :func:`mammogmic.models.compile_for_inference` (TorchInductor; compiles on the first batch of each shape).
    With ``dtype="bf16"`` a GMIC or baseline model gets bf16 backbone weights
    (:func:`mammogmic.models.cast_for_bf16`) before any compilation.

    Raises:
        CheckpointError: unreadable/unsafe file, an official file whose t is unknown, or ``percent_t`` given
            for one of our files (its t is part of its config).
        MammogmicError: ``compile`` without a C++ compiler.
    """
    from mammogmic.models import (
        GMIC,
        PatchClassifier,
        ResNetBaseline,
        load_model,
        load_official_checkpoint,
        official_percent_t,
        prepare_for_inference,
    )

    model: Any
    if path.suffix == ".p":
        percent_t = official_percent_t(path, percent_t)
        model = load_official_checkpoint(path, percent_t=percent_t).to(device)
    else:
        if percent_t is not None:
            raise CheckpointError(
                f"{path}: --percent-t applies to official .p files; this model's t is in its config"
            )
        model = load_model(path, device=device)
        if isinstance(model, PatchClassifier):
            raise CheckpointError(
                f"{path}: DMV-CNN's patch classifier, not an image model: make heat maps with mammogmic heatmaps"
            )
        percent_t = getattr(model.config, "percent_t", None)
    contract = model_contract(path)
    channels = getattr(model.config, "in_channels", 1)
    if channels != contract.channels:
        needs = "the image and its benign and malignant heat maps" if channels == 3 else "the image alone"
        raise CheckpointError(
            f"{path}: the model takes {channels} input channel(s) ({needs}), but its input contract "
            f"{'has' if contract.heatmaps else 'has no'} heat-map channels"
        )
    bf16 = dtype == "bf16" and isinstance(model, (GMIC, ResNetBaseline))
    # fuse: the inference-only fast path (BatchNorms folded, channels-last weights; about 1.4x faster on CPU,
    # benchmarks/README.md), equal to the plain model to float32 rounding.
    model = prepare_for_inference(model, fuse=fuse, bf16=bf16, compile=compile)
    prepared = "bf16" if bf16 else "fp32"
    return Member(
        name=path.stem,
        model=model,
        source=str(path),
        percent_t=percent_t,
        contract=contract,
        sha256=sha256_file(path),
        dtype=prepared,
    )


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
    geometry: InputGeometry | None = None  # where the first window lies in the source image


class _PrepareDataset:
    """Map-style dataset for a torch DataLoader (parallel preprocessing)."""

    def __init__(
        self, items: Sequence[ImageItem], contracts: Sequence[InputContract], settings: PrepareSettings
    ) -> None:
        self.items = items
        self.contracts = contracts
        self.settings = settings

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Prepared:
        return prepare_item(self.items[index], self.contracts, self.settings)


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
        dtype: ``fp32`` or ``bf16``: members loaded with ``load_member(dtype="bf16")`` run their bf16
            backbone weights as they are; any other member runs under bf16 autocast.
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
    # Members trained with different contracts each get their own inputs; equal contracts share them.
    contracts = list(dict.fromkeys(m.contract for m in members))
    member_input = [contracts.index(m.contract) for m in members]
    loader: DataLoader[Prepared] = DataLoader(
        _PrepareDataset(items, contracts, settings),  # type: ignore[arg-type]
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=list,
        shuffle=False,
    )
    autocast = [dtype == "bf16" and m.dtype != "bf16" for m in members]
    results: list[ImageResult] = []
    for batch in loader:
        good = [p for p in batch if p.error is None]
        for p in batch:
            if p.error is not None and on_error is not None:
                on_error(p)
        if good:
            counts = [p.inputs[0].shape[0] for p in good]
            xs = [
                torch.from_numpy(np.concatenate([p.inputs[c] for p in good])).to(dev)  # (ΣT, C, H, W)
                for c in range(len(contracts))
            ]
            probs_sum = torch.zeros(len(good), 2, dtype=torch.float64)
            member_probs: list[dict[str, tuple[float, float]]] = [{} for _ in good]
            first_out = None
            for m_index, member in enumerate(members):
                with (
                    torch.inference_mode(),
                    torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast[m_index]),
                ):
                    out = member.model(xs[member_input[m_index]])
                # Scores in float64 whatever the compute precision; windows of an image are averaged.
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
                    geometry=p.geometry,
                )
                if first_out is not None:
                    j = int(offsets[i])
                    res.saliency = first_out.saliency[j].float().cpu().numpy()
                    res.patch_locations = first_out.patch_locations[j].cpu().numpy()
                    res.patch_attention = first_out.patch_attention[j].float().cpu().numpy()
                    res.crop_size = tuple(members[0].model.config.crop_size)
                if keep_images:
                    res.image = p.inputs[member_input[0]][0, 0]  # the image channel of the first window
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
