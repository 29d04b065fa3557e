"""Exam-level prediction with DMV-CNN (what ``mammogmic predict`` does with DMV-CNN model files).

DMV-CNN sees the four views of an exam at once, so images are grouped into exams (the manifest's ``exam_id``,
else the exam part of names like ``0_L-CC``), each exam needs exactly one image of each view, and the result
is one row per exam with a benign and a malignant probability per breast. Inputs come from the one sample path
(:func:`mammogmic.data.sample.load_dmv_source`, :func:`~mammogmic.data.sample.dmv_exam_passes`); models that take
heat maps read them from the ``.npz`` files of ``mammogmic heatmaps`` (``<heatmaps>/<image_id>.npz``).

TTA: ``tta`` passes of noisy windows, drawn from ``numpy.random.RandomState(seed)`` per exam in the official order
(pass by pass, L-CC, R-CC, L-MLO, R-MLO), so a one-exam run replays the official ``--use-augmentation`` run.
The official script shares one generator over all exams of a list; here each exam starts afresh, so results do
not depend on which other exams are in the run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammogmic.data.cache import sha256_file
from mammogmic.data.sample import ImageItem, SampleError, Source, dmv_exam_passes, load_dmv_source
from mammogmic.errors import CheckpointError, MammogmicError
from mammogmic.evaluation.aggregation import IMAGE_NAME, metarepository_breast_table
from mammogmic.evaluation.outputs import file_stem
from mammogmic.models import DMV_LABELS, DMV_VIEWS, DMVModel, load_model, load_official_dmv_checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "DMVExam",
    "DMVMember",
    "ExamError",
    "ExamResult",
    "breast_table",
    "exam_of",
    "group_exams",
    "is_dmv_file",
    "load_dmv_member",
    "metarepository_table",
    "predict_exams",
]


def is_dmv_file(path: Path) -> bool:
    """Whether ``path`` holds a DMV-CNN model: our ``.safetensors`` with ``model_type`` ``dmv``, or an official
    ``.p`` file whose keys are DMV-CNN's (``four_view_resnet.*``). Unreadable files are not (their loader
    reports them)."""
    import pickle
    import zipfile

    import torch

    from mammogmic.models import read_model_metadata

    try:
        if path.suffix == ".p":
            try:  # zip-format files: memory-mapped, only the key names are read
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) pickles cannot be mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
            state = obj.get("model", obj) if isinstance(obj, dict) else None
            return isinstance(state, dict) and any(str(k).startswith("four_view_resnet.") for k in state)
        return read_model_metadata(path).get("model_type") == "dmv"
    except (
        CheckpointError,
        pickle.UnpicklingError,
        RuntimeError,
        OSError,
        ValueError,
        EOFError,
        zipfile.BadZipFile,
    ):
        return False  # unreadable: the regular loader names the problem


@dataclass
class DMVMember:
    """One DMV-CNN model of an ensemble."""

    name: str
    model: DMVModel
    source: str
    sha256: str


def load_dmv_member(path: Path, device: str = "cpu") -> DMVMember:
    """Load an official DMV-CNN ``.p`` file or our ``.safetensors`` DMV-CNN model, in eval mode.

    Raises:
        CheckpointError: unreadable, unsafe or mismatched file, or a model that is not DMV-CNN.
    """
    import torch

    if path.suffix == ".p":
        model = load_official_dmv_checkpoint(path)
    else:
        loaded = load_model(path)
        if not isinstance(loaded, DMVModel):
            raise CheckpointError(f"{path}: a {type(loaded).__name__} model, not DMV-CNN")
        model = loaded
    model = model.to(device).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    return DMVMember(name=path.stem, model=model, source=str(path), sha256=sha256_file(path))


@dataclass
class DMVExam:
    """The four images of one exam, by view."""

    exam_id: str
    items: dict[str, ImageItem]


@dataclass
class ExamError:
    """An image that could not be used, with the stage and the reason (a row of ``errors.csv``)."""

    item: ImageItem
    stage: str
    error: str


def exam_of(item: ImageItem) -> str:
    """The exam of an image: its ``exam_id``, else the exam part of names like ``0_L-CC``, else its own id."""
    if item.exam_id:
        return item.exam_id
    match = IMAGE_NAME.match(item.image_id)
    return match.group("exam") if match else item.image_id


def group_exams(items: Sequence[ImageItem]) -> list[tuple[str, list[ImageItem]]]:
    """Items grouped by exam, in order of first appearance."""
    groups: dict[str, list[ImageItem]] = {}
    for item in items:
        groups.setdefault(exam_of(item), []).append(item)
    return list(groups.items())


@dataclass
class ExamResult:
    """Probabilities of one exam, in :data:`~mammogmic.models.DMV_LABELS` order, averaged over models and passes."""

    exam_id: str
    items: dict[str, ImageItem]
    predictions: np.ndarray  # (4,) float64
    member_predictions: dict[str, np.ndarray] = field(default_factory=dict)


def _load_exam(
    exam_id: str, items: list[ImageItem], heatmaps: Path | None, contract: Any
) -> tuple[dict[str, Source] | None, dict[str, ImageItem], list[ExamError]]:
    """Sources of an exam's four views, or the errors that stop it (every image of a failed exam is listed)."""
    sources: dict[str, Source] = {}
    by_view: dict[str, ImageItem] = {}
    errors: list[ExamError] = []
    for item in items:
        path = heatmaps / f"{file_stem(item.image_id)}.npz" if heatmaps is not None else None
        try:
            source = load_dmv_source(item, path, contract=contract)
        except SampleError as exc:
            errors.append(ExamError(item, exc.stage, str(exc)))
            continue
        if source.view in sources:
            errors.append(
                ExamError(
                    item,
                    "exam",
                    f"{item.path}: exam {exam_id!r} has two {source.view} images "
                    f"({by_view[source.view].image_id}, {item.image_id}); DMV-CNN takes one per view",
                )
            )
            continue
        sources[source.view], by_view[source.view] = source, item
    if errors:
        others = [i for i in by_view.values() if all(e.item is not i for e in errors)]
        reason = f"exam {exam_id!r} is incomplete: " + "; ".join(
            f"{e.item.image_id}: {e.stage}" for e in errors
        )
        return None, by_view, errors + [ExamError(i, "exam", f"{i.path}: {reason}") for i in others]
    missing = [v for v in DMV_VIEWS if v not in sources]
    if missing:
        reason = f"exam {exam_id!r} lacks {', '.join(missing)}: DMV-CNN needs the four views L-CC, R-CC, L-MLO, R-MLO"
        return None, by_view, [ExamError(i, "exam", f"{i.path}: {reason}") for i in by_view.values()]
    return sources, by_view, []


def predict_exams(
    items: Sequence[ImageItem],
    members: Sequence[DMVMember],
    *,
    heatmaps: Path | None = None,
    tta: int = 1,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "fp32",
    contract: Any = None,
    on_error: Callable[[ExamError], None] | None = None,
    on_result: Callable[[ExamResult], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ExamResult]:
    """Predict every complete exam among ``items`` with the DMV-CNN ``members`` (probabilities averaged).

    Args:
        items: images; grouped with :func:`group_exams`.
        members: loaded models (:func:`load_dmv_member`).
        heatmaps: folder of ``mammogmic heatmaps`` outputs; required when a model takes 3 channels.
        tta: passes of noisy windows per exam (``<= 1``: the deterministic windows).
        seed: seed of each exam's ``RandomState``.
        device: torch device.
        dtype: ``fp32`` or ``bf16`` (autocast).
        contract: crop settings (default: the official ones).
        on_error: called for each image that could not be used.
        on_result: called with each exam's result.
        progress: called with the number of images finished after each exam.

    Raises:
        MammogmicError: a model needs heat maps and ``heatmaps`` is not given.
    """
    import torch

    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
    if not members:
        raise ValueError("no models given")
    channels = {m.name: m.model.config.in_channels for m in members}
    if heatmaps is None and any(c == 3 for c in channels.values()):
        needs = [n for n, c in channels.items() if c == 3]
        raise MammogmicError(
            f"model(s) {', '.join(needs)} take the image and its two heat maps: pass --heatmaps DIR "
            f"(made by mammogmic heatmaps)"
        )
    use_maps = heatmaps if any(c == 3 for c in channels.values()) else None
    dev = torch.device(device)
    results = []
    for exam_id, exam_items in group_exams(items):
        sources, by_view, errors = _load_exam(exam_id, exam_items, use_maps, contract)
        for error in errors:
            if on_error is not None:
                on_error(error)
        if sources is None:
            if progress is not None:
                progress(len(exam_items))
            continue
        sums = {m.name: np.zeros(len(DMV_LABELS)) for m in members}
        passes = 0
        for windows in dmv_exam_passes(sources, tta, np.random.RandomState(seed) if tta > 1 else None):
            batch = {v: torch.from_numpy(x)[None].to(dev) for v, x in windows.items()}  # (1, C, H, W)
            for member in members:
                x = {v: t[:, : channels[member.name]] for v, t in batch.items()}
                with (
                    torch.inference_mode(),
                    torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16"),
                ):
                    out = member.model(x)
                sums[member.name] += out.predictions[0].float().cpu().double().numpy()
            passes += 1
        per_member = {name: total / passes for name, total in sums.items()}
        mean = np.mean(np.stack(list(per_member.values())), axis=0)
        result = ExamResult(exam_id, by_view, mean, per_member if len(members) > 1 else {})
        results.append(result)
        if on_result is not None:
            on_result(result)
        if progress is not None:
            progress(len(exam_items))
    return results


def breast_table(results: Sequence[ExamResult]) -> pd.DataFrame:
    """One row per breast (``breast_id, exam_id, patient_id, laterality, benign_pred, malignant_pred``, and the
    breast labels when the manifest has them), the input of
    :func:`~mammogmic.evaluation.aggregation.metarepository_breast_table`."""
    rows = []
    for result in results:
        p = dict(zip(DMV_LABELS, result.predictions.tolist(), strict=True))
        for side, name in (("L", "left"), ("R", "right")):
            views = [result.items[f"{side}-{a}"] for a in ("CC", "MLO")]
            row: dict[str, Any] = {
                "breast_id": views[0].breast_id or f"{result.exam_id}_{side}",
                "exam_id": result.exam_id,
                "patient_id": views[0].patient_id,
                "laterality": side,
                "benign_pred": p[f"{name}_benign"],
                "malignant_pred": p[f"{name}_malignant"],
            }
            for kind in ("benign", "malignant"):
                labels = [getattr(v, f"breast_{kind}_label") for v in views]
                labels = [x for x in labels if not math.isnan(x)] or [
                    x for x in (getattr(v, f"{kind}_label") for v in views) if not math.isnan(x)
                ]
                row[f"{kind}_label"] = max(labels) if labels else math.nan
            rows.append(row)
    columns = ["breast_id", "exam_id", "patient_id", "laterality", "benign_pred", "malignant_pred"]
    table = pd.DataFrame(rows, columns=[*columns, "benign_label", "malignant_label"])
    for col in ("benign_label", "malignant_label"):
        if col in table.columns and table[col].isna().all():
            table = table.drop(columns=col)
    return table


def metarepository_table(results: Sequence[ExamResult]) -> pd.DataFrame:
    """``index, left_malignant, right_malignant, left_benign, right_benign`` (and labels when known), one row
    per exam: the layout of ``breast_predictions_metarepository.csv``."""
    if not results:
        return pd.DataFrame(
            columns=["index", "left_malignant", "right_malignant", "left_benign", "right_benign"]
        )
    return metarepository_breast_table(breast_table(results))
