"""Exam-level prediction with DMV-CNN (what ``mammogmic predict`` does with DMV-CNN model files).

DMV-CNN sees the four views of an exam at once, so images are grouped into exams (the manifest's ``exam_id``,
else the exam part of names like ``0_L-CC``), each exam needs exactly one image of each view, and the result
is one row per exam with a benign and a malignant probability per breast. Inputs come from the one sample path
(:func:`mammogmic.data.sample.load_source`, :func:`~mammogmic.data.sample.dmv_exam_passes`) under each model's
input contract (official files: the official pipeline; ours: the contract their training stored, whose DMV-CNN
windows are :func:`~mammogmic.data.sample.dmv_contracts`); models that take heat maps read each image's
``heatmap_path`` (``.npz`` files of ``mammogmic heatmaps``; :func:`~mammogmic.data.sample.attach_heatmaps`).

TTA: ``tta`` passes of noisy windows, drawn from ``numpy.random.RandomState(seed)`` per exam in the official order
(pass by pass, L-CC, R-CC, L-MLO, R-MLO), so a one-exam run replays the official ``--use-augmentation`` run.
The official script shares one generator over all exams of a list; here each exam starts afresh, so results do
not depend on which other exams are in the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammogmic.data.cache import sha256_file
from mammogmic.data.sample import (
    OFFICIAL_CONTRACT,
    ImageItem,
    InputContract,
    SampleError,
    Source,
    breast_labels,
    dmv_contracts,
    dmv_exam_passes,
    load_source,
)
from mammogmic.errors import CheckpointError
from mammogmic.evaluation.aggregation import IMAGE_NAME, metarepository_breast_table
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
    "with_gmic_members",
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
    """One DMV-CNN model of an ensemble, with its input contract (crop, centre, size, heat maps)."""

    name: str
    model: DMVModel
    source: str
    sha256: str
    contract: InputContract = OFFICIAL_CONTRACT


def load_dmv_member(path: Path, device: str = "cpu") -> DMVMember:
    """Load an official DMV-CNN ``.p`` file or our ``.safetensors`` DMV-CNN model, in eval mode.

    The contract is the official pipeline for ``.p`` files and the one stored by training for ours
    (:func:`mammogmic.evaluation.inference.model_contract`); with 3 input channels it takes heat maps.

    Raises:
        CheckpointError: unreadable, unsafe or mismatched file, or a model that is not DMV-CNN.
    """
    import dataclasses

    import torch

    from mammogmic.evaluation.inference import model_contract

    if path.suffix == ".p":
        model = load_official_dmv_checkpoint(path)
    else:
        loaded = load_model(path)
        if not isinstance(loaded, DMVModel):
            raise CheckpointError(f"{path}: a {type(loaded).__name__} model, not DMV-CNN")
        model = loaded
    # An official image + heat-maps file (or one of ours saved without training) says so by its channels.
    contract = dataclasses.replace(model_contract(path), heatmaps=model.config.in_channels == 3)
    model = model.to(device).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    return DMVMember(
        name=path.stem, model=model, source=str(path), sha256=sha256_file(path), contract=contract
    )


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
    """Probabilities of one exam, in :data:`~mammogmic.models.DMV_LABELS` order, averaged over models and passes
    (``member_predictions``: each model's own, by name)."""

    exam_id: str
    items: dict[str, ImageItem]
    predictions: np.ndarray  # (4,) float64
    member_predictions: dict[str, np.ndarray] = field(default_factory=dict)


def _load_exam(
    exam_id: str, items: list[ImageItem], heatmaps: bool, contract: InputContract
) -> tuple[dict[str, Source] | None, dict[str, ImageItem], list[ExamError]]:
    """Sources of an exam's four views, or the errors that stop it (every image of a failed exam is listed)."""
    sources: dict[str, Source] = {}
    by_view: dict[str, ImageItem] = {}
    errors: list[ExamError] = []
    for item in items:
        try:
            source = load_source(item, contract, heatmaps=heatmaps)
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
    tta: int = 1,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "fp32",
    on_error: Callable[[ExamError], None] | None = None,
    on_result: Callable[[ExamResult], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ExamResult]:
    """Predict every complete exam among ``items`` with the DMV-CNN ``members`` (probabilities averaged).

    Members whose contracts differ only in heat maps share their inputs (the image channel is the same with
    and without maps; image-only members take channel 0); others get their own. Every input group draws its
    TTA windows from its own ``RandomState(seed)``, so each member sees the windows it would see alone.

    Args:
        items: images; grouped with :func:`group_exams`. Members that take heat maps read each image's
            ``heatmap_path`` (a missing or bad file fails its exam, listed in ``on_error``).
        members: loaded models (:func:`load_dmv_member`).
        tta: passes of noisy windows per exam (``<= 1``: the deterministic windows).
        seed: seed of each exam's ``RandomState``.
        device: torch device.
        dtype: ``fp32`` or ``bf16`` (autocast).
        on_error: called for each image that could not be used.
        on_result: called with each exam's result.
        progress: called with the number of images finished after each exam.
    """
    import dataclasses

    import torch

    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
    if not members:
        raise ValueError("no models given")
    groups: dict[InputContract, list[DMVMember]] = {}
    for member in members:
        groups.setdefault(dataclasses.replace(member.contract, heatmaps=False), []).append(member)
    dev = torch.device(device)
    results = []
    for exam_id, exam_items in group_exams(items):
        sums = {m.name: np.zeros(len(DMV_LABELS)) for m in members}
        by_view: dict[str, ImageItem] = {}
        failed = False
        for contract, group in groups.items():
            maps = any(m.contract.heatmaps for m in group)
            sources, by_view, errors = _load_exam(exam_id, exam_items, maps, contract)
            for error in errors:
                if on_error is not None:
                    on_error(error)
            if sources is None:
                failed = True
                break
            passes = 0
            rng = np.random.RandomState(seed) if tta > 1 else None
            for windows in dmv_exam_passes(sources, tta, rng, dmv_contracts(contract)):
                batch = {v: torch.from_numpy(x)[None].to(dev) for v, x in windows.items()}  # (1, C, H, W)
                for member in group:
                    x = {v: t[:, : member.contract.channels] for v, t in batch.items()}
                    with (
                        torch.inference_mode(),
                        torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16"),
                    ):
                        out = member.model(x)
                    sums[member.name] += out.predictions[0].float().cpu().double().numpy()
                passes += 1
            for member in group:
                sums[member.name] /= passes
        if failed:
            if progress is not None:
                progress(len(exam_items))
            continue
        per_member = sums
        mean = np.mean(np.stack(list(per_member.values())), axis=0)
        result = ExamResult(exam_id, by_view, mean, per_member)
        results.append(result)
        if on_result is not None:
            on_result(result)
        if progress is not None:
            progress(len(exam_items))
    return results


def breast_table(results: Sequence[ExamResult]) -> pd.DataFrame:
    """One row per breast (``breast_id, exam_id, patient_id, laterality, benign_pred, malignant_pred``, and the
    breast labels when the manifest has them), the input of
    :func:`~mammogmic.evaluation.aggregation.metarepository_breast_table`. Ensembles add each model's scores
    as ``benign_pred__<model>`` and ``malignant_pred__<model>`` (the columns of GMIC's ensemble tables)."""
    rows = []
    for result in results:
        p = dict(zip(DMV_LABELS, result.predictions.tolist(), strict=True))
        members = result.member_predictions if len(result.member_predictions) > 1 else {}
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
            row["benign_label"], row["malignant_label"] = breast_labels(views)
            for member, values in members.items():
                q = dict(zip(DMV_LABELS, np.asarray(values).tolist(), strict=True))
                row[f"benign_pred__{member}"] = q[f"{name}_benign"]
                row[f"malignant_pred__{member}"] = q[f"{name}_malignant"]
            rows.append(row)
    columns = ["breast_id", "exam_id", "patient_id", "laterality", "benign_pred", "malignant_pred"]
    extra = list(
        dict.fromkeys(k for row in rows for k in row if k.startswith(("benign_pred__", "malignant_pred__")))
    )
    table = pd.DataFrame(rows, columns=[*columns, "benign_label", "malignant_label", *extra])
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


def with_gmic_members(
    results: Sequence[ExamResult], images: Sequence[Any], gmic_names: Sequence[str]
) -> tuple[list[ExamResult], list[ExamError]]:
    """Mixed ensembles: add GMIC models' breast scores to DMV-CNN's exam results and average all models.

    A GMIC model scores a breast by the mean over its views (:func:`~mammogmic.evaluation.aggregation.breast_level`,
    the rule of GMIC's own breast tables) of its image probabilities (``images``:
    :class:`~mammogmic.evaluation.inference.ImageResult` of ``predict_items`` with the GMIC ``gmic_names`` models).
    Every model, GMIC or DMV-CNN, counts once in the mean. An exam with an image GMIC could not predict is left
    out, its other images reported.

    Returns:
        The combined results (``member_predictions``: every model's own) and the errors of exams left out.
    """
    from mammogmic.evaluation.aggregation import breast_level
    from mammogmic.evaluation.outputs import image_row, image_table

    by_id = {res.item.image_id: res for res in images}
    rows, complete, errors = [], [], []
    for result in results:
        lacking = [item for item in result.items.values() if item.image_id not in by_id]
        if lacking:
            reason = (
                f"exam {result.exam_id!r}: GMIC could not predict {', '.join(i.image_id for i in lacking)}"
            )
            errors += [
                ExamError(item, "exam", f"{item.path}: {reason}")
                for item in result.items.values()
                if item not in lacking
            ]
            continue
        complete.append(result)
        for item in result.items.values():
            res = by_id[item.image_id]
            row = image_row(item, res.view or str(item.view), res.benign, res.malignant)
            own = res.member_probs or {gmic_names[0]: (res.benign, res.malignant)}
            for name in gmic_names:
                row[f"benign_pred__{name}"], row[f"malignant_pred__{name}"] = own[name]
            rows.append(row)
    if not complete:
        return [], errors
    scores = [f"{kind}_pred__{name}" for name in gmic_names for kind in ("benign", "malignant")]
    breasts = breast_level(image_table(rows), score_columns=scores, label_columns=()).set_index("breast_id")
    combined = []
    for result in complete:
        members = dict(result.member_predictions)
        for name in gmic_names:
            values = {}
            for side, label in (("L", "left"), ("R", "right")):
                breast = result.items[f"{side}-CC"].breast_id or f"{result.exam_id}_{side}"
                for kind in ("benign", "malignant"):
                    values[f"{label}_{kind}"] = float(breasts.loc[breast, f"{kind}_pred__{name}"])
            members[name] = np.array([values[label] for label in DMV_LABELS])
        mean = np.mean(np.stack(list(members.values())), axis=0)
        combined.append(ExamResult(result.exam_id, result.items, mean, members))
    return combined, errors
