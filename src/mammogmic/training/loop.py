"""End-to-end GMIC training: Adam on the Eq. 13 loss, validation by AUC, early stopping, exact resume.

The same loop trains DMV-CNN (``model.type: dmv``: four-view exams, :class:`~mammogmic.training.loss.DMVLoss`)
and its patch classifier (``model.type: patch``); only the model, the loss, the samples and the scores differ.

Run folder layout (written by rank 0 only)::

    RUN_DIR/config.yaml        resolved TrainConfig
    RUN_DIR/last.pt            latest training checkpoint (atomic; resume point)
    RUN_DIR/best.pt            checkpoint with the best validation metric
    RUN_DIR/best_model.safetensors   weights + config of the best model (mammogmic.load_model)
    RUN_DIR/top_k/             the keep_top_k best models (safetensors), for ensembling
    RUN_DIR/steps.csv          one row per logged optimizer step
    RUN_DIR/epochs.csv         one row per epoch (train loss, validation metrics, lr, seconds)
    RUN_DIR/tensorboard/       the same scalars for TensorBoard
    RUN_DIR/result.json        final summary (best epoch/metric, test metrics)
    RUN_DIR/test_predictions.csv   GMIC: the best model's test-split predictions, as ``mammogmic predict`` writes
                               them (its ``image_predictions.csv`` columns; scored in ``runtime.eval_amp``)
    RUN_DIR/replaced-<time>/   an earlier run's files, moved aside by ``fit(overwrite=True)``

A fresh run never starts among another run's files (refused, or moved aside with ``overwrite``); SIGINT, SIGTERM
and SIGUSR1 stop it after an optimizer step with ``last.pt`` written (:class:`TrainingInterrupted`). Under DDP
the logged losses are means over ranks, and validation and test are split across the ranks.

The library never draws progress bars: pass ``callback(event, info)`` (events ``"step"``, ``"epoch"``,
``"eval"``) and let the CLI render them.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from numpy.typing import NDArray
from torch import nn

from mammogmic.errors import MammogmicError
from mammogmic.training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from mammogmic.training.config import TrainConfig
from mammogmic.training.data import SeededSamples, TTASamples, input_contract, split_dataset
from mammogmic.training.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_flag,
    broadcast_state,
    init_distributed,
    resolve_device,
    shard_indices,
)
from mammogmic.training.finetune import InitReport, keep_frozen_in_eval, param_groups, prepare_model
from mammogmic.training.interrupt import StopSignals, TrainingInterrupted, ignore_stop_signals
from mammogmic.training.sampler import EpochSampler

__all__ = [
    "EvalResult",
    "NonFiniteLossError",
    "TrainResult",
    "Trainer",
    "TrainingInterrupted",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "predict",
    "train",
]

logger = logging.getLogger(__name__)

TEST_PREDICTIONS = "test_predictions.csv"

Callback = Callable[[str, dict[str, Any]], None]


class NonFiniteLossError(MammogmicError, FloatingPointError):
    """The loss became NaN/inf; the run stopped and its last good checkpoint is kept."""


@dataclass
class EvalResult:
    """Predictions and metrics of one evaluation pass."""

    probs: np.ndarray  # (n, 2) benign, malignant
    labels: np.ndarray  # (n, 2), NaN = unknown
    indices: np.ndarray  # dataset row of each prediction
    metrics: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """Summary of a finished (or early-stopped) run."""

    run_dir: Path
    epochs_run: int
    global_step: int
    best_epoch: int | None
    best_metric: float | None
    stopped_early: bool
    test_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    best_dice: float | None = None
    best_dice_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "epochs_run": self.epochs_run,
            "global_step": self.global_step,
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
            "stopped_early": self.stopped_early,
            "test_metrics": self.test_metrics,
            "seconds": self.seconds,
            "best_dice": self.best_dice,
            "best_dice_epoch": self.best_dice_epoch,
        }


# -- builders --------------------------------------------------------------------------------------------
def build_model(config: TrainConfig) -> nn.Module:
    """A freshly initialised model for ``config.model``: GMIC, DMV-CNN or the patch classifier."""
    from mammogmic.models import GMIC, DMVModel, PatchClassifier

    kind = config.model_type
    if kind == "dmv":
        return DMVModel(config.model)
    if kind == "patch":
        return PatchClassifier(config.model)
    return GMIC(config.model)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the paper), AdamW or SGD over all trainable parameters (fine-tuning: two lr groups)."""
    o = config.optim
    params = param_groups(model, config)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step LR multiplier: linear warm-up, then constant, cosine or step decay."""
    o = config.optim
    total = max(1, steps_per_epoch * config.schedule.epochs)

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.scheduler == "cosine":
            progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if o.scheduler == "step":
            return float(o.gamma ** ((step // max(1, steps_per_epoch)) // o.step_epochs))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_percent_t(progress: float, percent_t: float) -> float | None:
    """The t of ``schedule.t_warmup_epochs`` at ``progress`` (0 = first step, 1 = end of the warm-up): from 1
    down to ``percent_t`` geometrically, then ``None`` (the model's own pooling)."""
    if progress >= 1:
        return None
    return float(percent_t ** max(progress, 0.0))


def _build_loss(config: TrainConfig) -> nn.Module:
    from mammogmic.training.loss import DMVLoss, GMICLoss, PatchLoss

    if config.model_type == "dmv":
        return DMVLoss()
    if config.model_type == "patch":
        return PatchLoss()
    return GMICLoss(config.loss, prediction=config.model.prediction)


def _scores(out: Any) -> torch.Tensor:
    """The probabilities ``predict`` averages, ``(N, K)``: GMIC's ``prediction`` (benign, malignant),
    DMV-CNN's four breast labels (``DMV_LABELS``), the patch classifier's class probabilities."""
    from mammogmic.models import DMVOutput

    if isinstance(out, DMVOutput):
        return out.predictions
    if isinstance(out, torch.Tensor):  # the patch classifier's logits
        return torch.softmax(out.float(), dim=1)
    return out.prediction


def _num_scores(model: nn.Module) -> int:
    """Columns of :func:`_scores` for ``model``."""
    from mammogmic.models import DMV_LABELS, DMVModel

    if isinstance(model, DMVModel):
        return len(DMV_LABELS)
    return int(getattr(model.config, "num_classes", 2))


def _to_device(x: Any, device: torch.device, channels_last: bool) -> Any:
    """A batch's inputs (a tensor, or DMV-CNN's ``{view: tensor}``) on ``device``."""
    if isinstance(x, dict):
        return {k: _to_device(v, device, channels_last) for k, v in x.items()}
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _loss_parts(loss_out: Any) -> tuple[torch.Tensor, dict[str, float]]:
    total = loss_out.total if hasattr(loss_out, "total") else loss_out
    parts: dict[str, float] = {}
    if hasattr(loss_out, "as_floats"):
        parts = {k: v for k, v in loss_out.as_floats().items() if k != "total"}
    return total, parts


def _amp_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute the global and local backbones' activations in backward (state-dict keys are unchanged).

    Each backbone becomes an instance of a subclass of its own class whose ``forward`` checkpoints the class's
    (:func:`_checkpointed`), so a copy of the model (``copy.deepcopy``, the fused model that validation scores)
    runs its own weights, not the original's. Batch-norm running statistics are updated again during
    recomputation (PyTorch's usual caveat), which only changes their momentum average slightly.
    """
    for name in ("global_net", "local_net"):
        sub = getattr(model, name, None)
        if sub is not None and not getattr(type(sub), "checkpointed", False):
            sub.__class__ = _checkpointed(type(sub))  # type: ignore[arg-type]


@functools.cache
def _checkpointed(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` whose forward pass is recomputed in backward (:func:`enable_activation_checkpointing`)."""
    from torch.utils.checkpoint import checkpoint

    def forward(self: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        # kwargs: the backbones' own (fine=, for a finer grid in eval mode)
        if torch.is_grad_enabled():
            return checkpoint(cls.forward, self, x, use_reentrant=False, **kwargs)
        return cls.forward(self, x, **kwargs)

    return type(
        cls.__name__, (cls,), {"forward": forward, "checkpointed": True, "__module__": cls.__module__}
    )


def _freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    images = [b["image"] for b in batch]
    out: dict[str, Any] = {
        "image": (
            {k: torch.stack([x[k] for x in images]) for k in images[0]}
            if isinstance(images[0], dict)
            else torch.stack(images)
        ),
        "labels": torch.stack([b["labels"] for b in batch]),
        "index": torch.tensor([int(b["index"]) for b in batch], dtype=torch.long),
    }
    if all("masks" in b for b in batch):
        out["masks"] = torch.stack([b["masks"] for b in batch])
    return out


def _seed_worker(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: a worker that died of it would fail the step the main process
    # is finishing before it saves. The main process decides when to stop and shuts the workers down.
    ignore_stop_signals()
    # Samples carry their own RNG (SeededSamples); this only keeps stray numpy/python use deterministic.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002
    random.seed(seed)


# -- evaluation ------------------------------------------------------------------------------------------
def prediction_table(images: Any, probs: np.ndarray) -> pd.DataFrame:
    """The image table ``mammogmic predict`` would write for these predictions (same rows, same ids).

    Datasets with ``items`` (:class:`~mammogmic.data.dataset.MammogramDataset`) give the manifest's ids, views
    and labels; in-memory datasets give one pseudo-view per image grouped by ``breast_ids``.
    """
    from mammogmic.evaluation.outputs import image_row, image_table

    items = getattr(images, "items", None)
    if items is not None:
        return image_table(
            [
                image_row(item, item.view or "", float(p[0]), float(p[1]))
                for item, p in zip(items, probs, strict=True)
            ]
        )
    labels = np.asarray(images.labels, dtype=np.float64)
    breasts = list(getattr(images, "breast_ids", range(len(labels))))
    rows = [
        {
            "image_index": str(i),
            "benign_pred": float(probs[i, 0]),
            "malignant_pred": float(probs[i, 1]),
            "benign_label": labels[i, 0],
            "malignant_label": labels[i, 1],
            "exam_id": str(breasts[i]),
            "breast_id": str(breasts[i]),
            "laterality": "L",
            "view": str(i),
        }
        for i in range(len(labels))
    ]
    return image_table(rows)


def classification_metrics(
    images: Any, probs: np.ndarray, level: str = "image", prefix: str = ""
) -> dict[str, float]:
    """Benign/malignant/mean AUROC of predictions on ``images``: exactly what ``mammogmic evaluate --group LEVEL``
    reports on ``predict``'s table for the same images (:func:`mammogmic.evaluation.table.auroc_summary`).

    DMV-CNN exams (``probs`` ``(n, 4)``): per breast, on the table ``predict`` writes for DMV-CNN models
    (``breast_predictions.csv``), whatever ``level``. Patches (``probs`` ``(n, 4)`` class probabilities):
    malignant (class 0) and benign (class 1) each against the other patches.
    """
    from mammogmic.data.dmv import ExamDataset, PatchDataset
    from mammogmic.evaluation.table import auroc_summary

    if isinstance(images, ExamDataset):
        from mammogmic.evaluation.dmv import ExamResult, breast_table

        results = [
            ExamResult(exam_id, views, np.asarray(p, dtype=np.float64))
            for (exam_id, views), p in zip(images.exams, probs, strict=True)
        ]
        return auroc_summary(breast_table(results), "breast", prefix)
    if isinstance(images, PatchDataset):
        from mammogmic.models.patch import BENIGN_CLASS, MALIGNANT_CLASS

        probs = probs[:, [BENIGN_CLASS, MALIGNANT_CLASS]]
        level = "image"
    return auroc_summary(prediction_table(images, probs), level, prefix)


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: Any,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    amp: str = "none",
    tta: int = 1,
    seed: int = 0,
    channels_last: bool = False,
    num_workers: int = 0,
    on_batch: Callable[[Any, dict[str, Any]], None] | None = None,
    callback: Callback | None = None,
    dist: DistInfo | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions ``model.prediction`` for every image, averaged over ``tta`` windows.

    With ``tta == 1`` the deterministic window is used; with ``tta > 1`` the images' own TTA windows
    (``images.windows``: the ones ``mammogmic predict --tta N --seed S`` averages), probabilities averaged.

    Args:
        on_batch: called as ``on_batch(output, batch)`` for every batch of deterministic windows (e.g. to
            collect saliency maps); ``output`` is the model's output object. Under ``dist``, for this rank's
            batches only.
        callback: progress events; under ``dist`` they count this rank's share.
        dist: with several ranks, every rank predicts its share (rows ``rank::world_size``) and receives all
            the others' (an all-reduce), so every rank returns the same complete array. The model must be the
            same on every rank (:func:`~mammogmic.training.distributed.broadcast_state`). A sample's input
            depends only on its index (and the seed), not on the batch it is in.

    Returns:
        ``probs`` (n, K) float64 (:func:`_scores`: K = 2 for GMIC, 4 for DMV-CNN and the patch classifier) and
        ``indices`` (n,) in dataset order.
    """
    device = torch.device(device)
    info = dist or DistInfo()
    was_training = model.training
    model.eval()
    n = len(images)
    probs = np.zeros((n, _num_scores(model)), dtype=np.float64)
    if tta > 1 and not hasattr(images, "windows"):
        raise MammogmicError("test-time augmentation needs a dataset with TTA windows (MammogramDataset)")
    dataset: Any = TTASamples(images, tta, seed) if tta > 1 else SeededSamples(images, augment=False)
    share = shard_indices(n, info)
    if info.enabled:
        dataset = torch.utils.data.Subset(dataset, share.tolist())
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        shuffle=False,
        worker_init_fn=_seed_worker,
    )
    done = 0
    try:
        for batch in loader:
            x = batch["image"]
            windows = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 5 else 1
            if windows > 1:
                x = x.reshape(-1, *x.shape[-3:])  # (B·T, C, H, W)
            x = _to_device(x, device, channels_last)
            with _amp_context(device, amp):
                out = model(x)
            pred = _scores(out).float().cpu().double()
            pred = pred.reshape(-1, windows, pred.shape[-1]).mean(1)
            probs[batch["index"].numpy()] = pred.numpy()
            if on_batch is not None and windows == 1:
                on_batch(out, batch)
            done += len(batch["index"])
            if callback is not None:
                callback(
                    "eval",
                    {"pass": 0, "passes": 1, "done": done, "total": len(share), "batch": len(batch["index"])},
                )
    finally:
        model.train(was_training)
    return all_reduce_sum(probs, info, device), np.arange(n)


def evaluate(
    model: nn.Module,
    images: Any,
    *,
    label_level: str = "image",
    prefix: str = "",
    **kwargs: Any,
) -> EvalResult:
    """:func:`predict` plus benign/malignant AUROC (per breast when ``label_level == "breast"``)."""
    probs, idx = predict(model, images, **kwargs)
    labels = np.asarray(images.labels, dtype=np.float64)
    level = "breast" if label_level == "breast" else "image"
    metrics = classification_metrics(images, probs, level, prefix)
    return EvalResult(probs=probs, labels=labels, indices=idx, metrics=metrics)


# -- logging ---------------------------------------------------------------------------------------------
class _CsvLog:
    """Append-only CSV keyed by ``key`` (step or epoch) whose rows after a given value can be dropped (resume).

    The header grows when a row brings a new column (an epoch with validation after one without): the file is
    rewritten with the wider header, so no value is ever dropped.
    """

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key
        self.fields: list[str] | None = None

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return [], []
        with open(self.path, newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            fields = list(reader.fieldnames or [])
        if fields and self.key not in fields:
            raise MammogmicError(
                f"{self.path}: not a training log of this run (no {self.key!r} column; columns: "
                f"{', '.join(fields[:6])}{', ...' if len(fields) > 6 else ''}); move it out of the run folder"
            )
        return fields, rows

    def _rewrite(self, fields: list[str], rows: list[dict[str, Any]]) -> None:
        with open(self.path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        self.fields = fields

    def truncate_after(self, value: int) -> None:
        """Drop the rows whose key is above ``value`` (written after the checkpoint a run resumes from)."""
        fields, rows = self._read()
        if not fields:
            return
        keep = [r for r in rows if r.get(self.key, "") != "" and int(float(r[self.key])) <= value]
        self._rewrite(fields, keep)

    def write(self, row: dict[str, Any]) -> None:
        fields = self.fields if self.fields is not None else self._read()[0]
        if not fields:
            fields = list(row)
            self._rewrite(fields, [])
        elif any(k not in fields for k in row):
            fields, rows = self._read()
            fields += [k for k in row if k not in fields]
            self._rewrite(fields, rows)
        self.fields = fields
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore").writerow(row)


class _Tensorboard:
    """Scalars for TensorBoard, all on the optimizer-step axis.

    ``purge_step`` (a resumed run: its first new step) tells TensorBoard to discard the events of earlier files
    at that step and later ones: what the interrupted process logged after its checkpoint, which the resumed run
    logs again.
    """

    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None = None) -> None:
        self.writer: Any = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        except Exception as exc:  # tensorboard missing or broken: CSV logs remain
            logger.warning("TensorBoard logging disabled: %s", exc)

    def scalars(self, values: dict[str, Any], step: int, prefix: str) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v)):
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# -- the trainer -----------------------------------------------------------------------------------------
_HIGHER_IS_BETTER = {
    "malignant_auroc": True,
    "benign_auroc": True,
    "mean_auroc": True,
    "val_loss": False,
    "malignant_dice": True,
    "benign_dice": True,
    "malignant_specific_dice": True,
    "benign_specific_dice": True,
}


@dataclass
class _Run:
    """Everything one :meth:`Trainer.fit` call works with (built by :meth:`Trainer._setup`)."""

    info: DistInfo
    device: torch.device
    model: nn.Module
    net: nn.Module  # the model, or its DDP wrapper
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Any
    sampler: EpochSampler
    steps_per_epoch: int
    train_ds: SeededSamples
    val_images: Any
    state: dict[str, Any]
    steps_log: _CsvLog
    epochs_log: _CsvLog
    tb: _Tensorboard


class Trainer:
    """Trains one model according to a :class:`TrainConfig`: GMIC, or (``model.type``) DMV-CNN or its patch
    classifier.

    :meth:`fit` = :meth:`_setup` (data, model, optimizer, resume), then per epoch :meth:`train_one_epoch`,
    :meth:`validate` and :meth:`_end_epoch` (early stopping, checkpoints, logs), then :meth:`test`.

    Args:
        config: the resolved configuration.
        run_dir: run folder (created).
        train_images, val_images, test_images: datasets (default: the manifest's splits as
            :class:`~mammogmic.data.dataset.MammogramDataset` under the run's input contract). Anything with
            ``labels``, ``breast_ids``, ``__len__`` and ``load(i, rng)``.
        callback: ``callback(event, info)`` for progress display.
        tensorboard: also write TensorBoard event files.
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        train_images: Any = None,
        val_images: Any = None,
        test_images: Any = None,
        callback: Callback | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.callback = callback
        self.tensorboard = tensorboard
        self.train_images = train_images
        self.val_images = val_images
        self.test_images = test_images
        self.model: nn.Module | None = None
        self.init_report: InitReport | None = None  # where --init weights came from (finetune.init)
        self.last_path = self.run_dir / "last.pt"
        self.best_path = self.run_dir / "best.pt"
        # This process's rank layout, known after setup (the CLI prints on rank 0 only).
        self.dist = DistInfo()
        self._stop = StopSignals()  # entered by fit(); outside it no signal is ever recorded

    def _needs_dice(self) -> bool:
        s = self.config.schedule
        return s.keep_best_dice or s.val_metric.endswith("_dice")

    # .. setup ..
    def _setup_runtime(self) -> tuple[DistInfo, torch.device]:
        rt = self.config.runtime
        info = init_distributed(rt.device, rt.dist_timeout_minutes)
        device = resolve_device(rt.device, info.local_rank)
        if rt.threads is not None:
            torch.set_num_threads(rt.threads)
        if rt.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        for key in ("amp", "eval_amp"):
            if getattr(rt, key) == "fp16" and device.type != "cuda":
                raise MammogmicError(f"runtime.{key}: fp16 autocast needs a CUDA device; use bf16 or none")
        return info, device

    def _datasets(self) -> tuple[Any, Any]:
        cfg = self.config
        train_images = self.train_images
        if train_images is None:
            train_images = split_dataset(cfg, cfg.data.train_split)
        val_images = self.val_images
        if val_images is None and cfg.data.val_split and cfg.data.manifest:
            val_images = split_dataset(cfg, cfg.data.val_split, masks=self._needs_dice())
        if val_images is not None and len(val_images) == 0:
            logger.warning("validation split %r is empty: no early stopping", cfg.data.val_split)
            val_images = None
        if len(train_images) == 0:
            raise MammogmicError(f"data.train_split: split {cfg.data.train_split!r} has no images")
        return train_images, val_images

    def _check_run_dir(self, resume: bool, overwrite: bool) -> str | None:
        """Main rank: create the run folder and check that it suits a fresh run; the refusal, if any.

        A fresh run never appends to another run's logs: files of an earlier run (a killed run with or without
        ``last.pt``, or unrelated ``steps.csv``/``epochs.csv``) refuse the start, or with ``overwrite`` are moved
        to ``RUN/replaced-<time>/``.
        """
        run = self.run_dir
        run.mkdir(parents=True, exist_ok=True)
        if resume:
            return None
        found = [name for name in _RUN_OUTPUTS if (run / name).exists()]
        if not found:
            return None
        if overwrite:
            aside = _move_aside(run, [*found, *(["config.yaml"] if (run / "config.yaml").exists() else [])])
            logger.warning("%s: files of the earlier run moved to %s", run, aside)
            return None
        if "last.pt" in found:
            return (
                f"{run}: already holds a run (last.pt); pass --resume to continue it, --overwrite to start again "
                f"(its files are moved to {run / 'replaced-<time>'}), or choose a new --out"
            )
        listed = ", ".join(f"{name}/" if (run / name).is_dir() else name for name in found)
        return (
            f"{run}: holds files of an earlier run ({listed}) but no last.pt to resume from (it stopped before "
            f"its first checkpoint, or the files are not a mammogmic run's); a new run here would mix its logs "
            f"with them. Pass --overwrite to move them to {run / 'replaced-<time>'} and start afresh, or choose "
            f"a new --out"
        )

    def _setup(self, resume: bool, overwrite: bool = False) -> _Run:
        cfg = self.config
        info, device = self._setup_runtime()
        self.dist = info
        run = self.run_dir
        _agree(self._check_run_dir(resume, overwrite) if info.is_main else None, info, device)
        ckpt = None
        if resume:
            if not self.last_path.exists():
                raise MammogmicError(f"{run}: nothing to resume (no last.pt)")
            ckpt = load_checkpoint(self.last_path)
            saved = TrainConfig.from_dict(ckpt["config"])
            if saved.model != cfg.model:
                raise MammogmicError(
                    f"{self.last_path}: checkpoint model config differs from the requested one"
                )
        # Seed before building the model so initialisation is reproducible.
        torch.manual_seed(cfg.runtime.seed)
        train_images, val_images = self._datasets()

        model = build_model(cfg).to(device)
        self.init_report = prepare_model(model, cfg, run, resume=ckpt is not None, write=info.is_main)
        if cfg.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if cfg.runtime.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.model = model  # exposed for callers/tests (the unwrapped module)
        net: nn.Module = model
        if info.enabled:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        optimizer = build_optimizer(model, cfg)

        labels = np.asarray(train_images.labels, dtype=np.float64)
        pos_cols = {"benign": [0], "malignant": [1], "any": [0, 1]}[cfg.data.positive_class]
        positives = np.nan_to_num(labels[:, pos_cols], nan=0.0).max(axis=1) > 0.5
        sampler = EpochSampler(
            positives,
            balanced=cfg.data.balanced_sampling,
            seed=cfg.runtime.seed,
            rank=info.rank,
            world_size=info.world_size,
        )
        micro_per_epoch = math.ceil(len(sampler.rank_indices(0)) / cfg.data.batch_size)
        steps_per_epoch = math.ceil(micro_per_epoch / cfg.runtime.grad_accum)
        if cfg.schedule.max_steps_per_epoch is not None:
            steps_per_epoch = min(steps_per_epoch, cfg.schedule.max_steps_per_epoch)
        scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
        scaler = torch.amp.GradScaler("cuda") if cfg.runtime.amp == "fp16" else None

        state: dict[str, Any] = {
            "epoch": 0,
            "batches_done": 0,
            "global_step": 0,
            "best_metric": None,
            "best_epoch": None,
            "bad_validations": 0,
            "stopped_early": False,
            "finished": False,
            "top_k": [],
            "best_dice": None,
            "best_dice_epoch": None,
            "epoch_loss_sum": 0.0,
            "epoch_loss_count": 0,
        }
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            if ckpt.get("optimizer") is not None:
                optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scheduler") is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
            if scaler is not None and ckpt.get("scaler") is not None:
                scaler.load_state_dict(ckpt["scaler"])
            state.update(ckpt["state"])
            restore_rng_state(ckpt["rng"])
            logger.info(
                "resumed %s at epoch %d, step %d", self.last_path, state["epoch"], state["global_step"]
            )

        steps_log = _CsvLog(run / "steps.csv", "step")
        epochs_log = _CsvLog(run / "epochs.csv", "epoch")
        problem = None
        if info.is_main:
            cfg.save(run / "config.yaml")
            if ckpt is not None:
                # Rows carry the step count (1-based) and the epoch index (0-based); the checkpoint counts
                # steps and epochs done. Rows written after the checkpoint (a kill between a log row and the
                # next checkpoint) are written again by the resumed run, so they go.
                try:
                    steps_log.truncate_after(state["global_step"])
                    epochs_log.truncate_after(state["epoch"] - 1)
                except MammogmicError as exc:
                    problem = str(exc)
        _agree(problem, info, device)
        # TensorBoard likewise forgets what was logged after the checkpoint (all scalars are on the step axis).
        tb = _Tensorboard(
            run / "tensorboard",
            self.tensorboard and info.is_main,
            purge_step=state["global_step"] + 1 if ckpt is not None else None,
        )
        return _Run(
            info=info,
            device=device,
            model=model,
            net=net,
            loss_fn=_build_loss(cfg),
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            sampler=sampler,
            steps_per_epoch=steps_per_epoch,
            train_ds=SeededSamples(train_images, augment=cfg.data.augment, seed=cfg.runtime.seed),
            val_images=val_images,
            state=state,
            steps_log=steps_log,
            epochs_log=epochs_log,
            tb=tb,
        )

    def fit(self, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
        """Train (or resume) to the end of the schedule or early stopping; then test the best model.

        While training, SIGINT (Ctrl-C), SIGTERM and SIGUSR1 stop the run after the current optimizer step:
        ``last.pt`` is written and :class:`TrainingInterrupted` raised; ``fit(resume=True)`` continues exactly
        there. A second signal aborts at once. (Handlers are installed only when called from the main thread,
        and the previous ones are restored.)

        Args:
            resume: continue the run in ``run_dir`` from its ``last.pt``.
            overwrite: start afresh in a ``run_dir`` that holds files of an earlier run, moving them to
                ``run_dir/replaced-<time>/`` (without it such a folder is refused).

        Raises:
            TrainingInterrupted: a stop signal; ``last.pt`` holds the state after the last optimizer step.
            NonFiniteLossError: the loss became NaN/inf (the last good ``last.pt`` is kept).
            MammogmicError: bad configuration, data, or a run folder holding another run's files.
        """
        if resume and overwrite:
            raise MammogmicError(
                "resume continues the run in the folder, overwrite replaces it: pass only one"
            )
        t_start = time.perf_counter()
        r = self._setup(resume, overwrite)
        state = r.state
        try:
            with StopSignals() as self._stop:
                while not state["finished"] and state["epoch"] < self.config.schedule.epochs:
                    t_epoch = time.perf_counter()
                    self.train_one_epoch(r)
                    self._end_epoch(r, t_epoch)  # writes last.pt
                    self._stop_if_requested(r, saved=True)
                state["finished"] = True
                self._write_last(r)
        finally:
            r.tb.close()
            self._stop = StopSignals()
        test_metrics = self.test(r)
        result = TrainResult(
            run_dir=self.run_dir,
            epochs_run=state["epoch"],
            global_step=state["global_step"],
            best_epoch=state["best_epoch"],
            best_metric=state["best_metric"],
            stopped_early=state["stopped_early"],
            test_metrics=test_metrics,
            seconds=time.perf_counter() - t_start,
            best_dice=state.get("best_dice"),
            best_dice_epoch=state.get("best_dice_epoch"),
        )
        if r.info.is_main:
            (self.run_dir / "result.json").write_text(
                json.dumps(_finite(result.to_dict()), indent=2, default=_json_default, allow_nan=False)
            )
        barrier(r.info)
        return result

    # .. one epoch of optimizer steps ..
    def train_one_epoch(self, r: _Run) -> None:
        """The optimizer steps of the current epoch (from where a resumed run stopped), logged per step."""
        cfg, state, info = self.config, r.state, r.info
        epoch = state["epoch"]
        bs, accum = cfg.data.batch_size, cfg.runtime.grad_accum
        r.model.train()
        if cfg.runtime.freeze_batchnorm:
            _freeze_batchnorm(r.model)
        keep_frozen_in_eval(r.model, cfg.finetune.freeze)
        r.sampler.set_epoch(epoch, start=state["batches_done"] * bs)
        loader = torch.utils.data.DataLoader(
            r.train_ds,
            batch_size=bs,
            sampler=r.sampler,
            num_workers=cfg.runtime.num_workers,
            collate_fn=_collate,
            worker_init_fn=_seed_worker,
            persistent_workers=False,
            pin_memory=r.device.type == "cuda",
        )
        it: Iterator[dict[str, Any]] = iter(loader)
        steps_done = state["batches_done"] // accum
        t_step, images_since = time.perf_counter(), 0
        while steps_done < r.steps_per_epoch:
            micro = [b for b in itertools.islice(it, accum)]
            if not micro:
                break
            step_loss, parts, images = self._optimizer_step(r, micro)
            if info.enabled:
                # Each rank's loss is the mean over its shard of the step's batch (equal shard sizes): the step's
                # loss is their mean. Every rank gets it, so epoch means and checkpoints agree across ranks.
                step_loss, *part_values = all_reduce_mean([step_loss, *parts.values()], info, r.device)
                parts = dict(zip(parts, part_values, strict=True))
            images_since += images
            steps_done += 1
            state["global_step"] += 1
            state["batches_done"] += len(micro)
            state["epoch_loss_sum"] += step_loss
            state["epoch_loss_count"] += 1
            now = time.perf_counter()
            row = {
                "step": state["global_step"],
                "epoch": epoch,
                "loss": step_loss,
                **{f"loss_{k}": v for k, v in parts.items()},
                "lr": r.optimizer.param_groups[0]["lr"],
                "images_per_s": images_since * info.world_size / max(now - t_step, 1e-9),
            }
            if info.is_main and (
                state["global_step"] % cfg.schedule.log_every == 0 or steps_done == r.steps_per_epoch
            ):
                r.steps_log.write(row)
                r.tb.scalars(row, state["global_step"], "train")
            if self.callback is not None and info.is_main:
                extra = {"step_in_epoch": steps_done, "steps_per_epoch": r.steps_per_epoch}
                self.callback("step", {**row, **extra, "images": images_since * info.world_size})
            t_step, images_since = now, 0
            self._stop_if_requested(r, saved=False)
            every = cfg.schedule.checkpoint_every_steps
            if every and state["global_step"] % every == 0 and steps_done < r.steps_per_epoch:
                self._write_last(r)
        del it, loader

    def _stop_if_requested(self, r: _Run, *, saved: bool) -> None:
        """After an optimizer step (or an epoch): if any rank got a stop signal, save and raise on every rank."""
        signum = int(all_reduce_max(self._stop.signum or 0, r.info, r.device))
        if not signum:
            return
        if not saved:
            self._write_last(r)
        state = r.state
        if state["batches_done"]:
            where = (
                f"optimizer step {state['global_step']} (epoch {state['epoch'] + 1}, "
                f"{state['batches_done']} micro-batches into it)"
            )
        else:
            where = f"epoch {state['epoch']} (optimizer step {state['global_step']})"
        name = signal.Signals(signum).name
        config = self.run_dir / "config.yaml"
        raise TrainingInterrupted(
            f"{name}: training stopped after {where}; saved {self.last_path}. Resume with: "
            f"mammogmic train {config} --out {self.run_dir} --resume (or rerun the same command with --resume; "
            f"in Python Trainer(...).fit(resume=True))",
            signum=signum,
            checkpoint=self.last_path,
            global_step=state["global_step"],
        )

    def _optimizer_step(self, r: _Run, micro: list[dict[str, Any]]) -> tuple[float, dict[str, float], int]:
        """Forward/backward over the micro-batches, then one optimizer and scheduler step."""
        cfg, info, state = self.config, r.info, r.state
        if cfg.schedule.t_warmup_epochs > 0:
            r.loss_fn.percent_t = warmup_percent_t(  # type: ignore[assignment]
                state["global_step"] / (cfg.schedule.t_warmup_epochs * r.steps_per_epoch), cfg.model.percent_t
            )
        r.optimizer.zero_grad(set_to_none=True)
        step_loss, parts_sum, images = 0.0, dict[str, float](), 0
        for mi, batch in enumerate(micro):
            x = _to_device(batch["image"], r.device, cfg.runtime.channels_last)
            y = batch["labels"].to(r.device, non_blocking=True)
            sync = mi == len(micro) - 1 or not info.enabled
            ctx = contextlib.nullcontext() if sync else r.net.no_sync()  # type: ignore[operator]
            with ctx:
                with _amp_context(r.device, cfg.runtime.amp):
                    total, parts = _loss_parts(r.loss_fn(r.net(x), y))
                value = float(total.detach().float())
                if broadcast_flag(not math.isfinite(value), info, r.device, any_rank=True):
                    last = self.last_path if self.last_path.exists() else "none (no checkpoint yet)"
                    raise NonFiniteLossError(
                        f"non-finite loss ({value}) at epoch {state['epoch']}, optimizer step "
                        f"{state['global_step'] + 1} (micro-batch {mi + 1} of {len(micro)}); training "
                        f"stopped, the last good checkpoint is {last}"
                    )
                loss = total / len(micro)
                (r.scaler.scale(loss) if r.scaler is not None else loss).backward()
            step_loss += value / len(micro)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / len(micro)
            images += len(batch["index"])
        if cfg.schedule.t_warmup_epochs > 0:
            r.loss_fn.percent_t = None  # type: ignore[assignment]  # validation pools like the model
        if r.scaler is not None:
            r.scaler.unscale_(r.optimizer)
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(r.model.parameters(), cfg.optim.grad_clip)
        if r.scaler is not None:
            r.scaler.step(r.optimizer)
            r.scaler.update()
        else:
            r.optimizer.step()
        r.scheduler.step()
        return step_loss, parts_sum, images

    # .. end of an epoch: validation, early stopping, checkpoints ..
    def _end_epoch(self, r: _Run, t_epoch: float) -> None:
        cfg, state, info = self.config, r.state, r.info
        epoch = state["epoch"]
        row: dict[str, Any] = {
            "epoch": epoch,
            "step": state["global_step"],
            "train_loss": state["epoch_loss_sum"] / max(1, state["epoch_loss_count"]),
            "lr": r.optimizer.param_groups[0]["lr"],
        }
        improved = False
        validate = r.val_images is not None and (
            (epoch + 1) % cfg.schedule.val_every == 0 or epoch + 1 == cfg.schedule.epochs
        )
        if validate:
            # Every rank validates its share; all get the same complete predictions, hence the same metrics
            # and the same early-stopping state. The model is rank 0's (its batch-norm statistics included).
            broadcast_state(r.model, info, buffers_only=True)
            val = self.validate(r.model, r.val_images, r.loss_fn, r.device, dist=info)
            row.update({k if k.startswith("val_") else f"val_{k}": v for k, v in val.items()})
            metric = val[cfg.schedule.val_metric]
            best = state["best_metric"]
            higher = _HIGHER_IS_BETTER[cfg.schedule.val_metric]
            if math.isfinite(metric) and (best is None or (metric > best if higher else metric < best)):
                improved = True
                state["best_metric"], state["best_epoch"], state["bad_validations"] = metric, epoch, 0
            else:
                state["bad_validations"] += 1
            self._update_top_k(r.model, state, metric, epoch, higher, write=info.is_main)
            if cfg.schedule.keep_best_dice:
                dice = val.get(cfg.schedule.best_dice_metric, float("nan"))
                best_dice = state.get("best_dice")
                if math.isfinite(dice) and (best_dice is None or dice > best_dice):
                    state["best_dice"], state["best_dice_epoch"] = dice, epoch
                    if info.is_main:
                        self._export_model(
                            r.model, self.run_dir / "best_dice_model.safetensors", {"epoch": epoch, **row}
                        )
        state["epoch"] = epoch + 1
        state["batches_done"] = 0
        state["epoch_loss_sum"], state["epoch_loss_count"] = 0.0, 0
        patience = cfg.schedule.patience
        stop = bool(validate and patience is not None and state["bad_validations"] >= patience)
        if broadcast_flag(stop, info, r.device):
            state["stopped_early"] = True
            state["finished"] = True
        row["seconds"] = time.perf_counter() - t_epoch
        if info.is_main:
            r.epochs_log.write(row)
            r.tb.scalars(row, state["global_step"], "epoch")
            if improved or r.val_images is None:
                save_checkpoint(
                    self.best_path,
                    config=cfg.to_dict(),
                    model=r.model,
                    state=_plain_state(state),
                    rng=capture_rng_state(),
                )
                self._export_model(r.model, self.run_dir / "best_model.safetensors", {"epoch": epoch, **row})
        if self.callback is not None and info.is_main:
            self.callback("epoch", dict(row, epochs=cfg.schedule.epochs, stopped=state["stopped_early"]))
        self._write_last(r)

    def _write_last(self, r: _Run) -> None:
        if r.info.is_main:
            save_checkpoint(
                self.last_path,
                config=self.config.to_dict(),
                model=r.model,
                optimizer=r.optimizer,
                scheduler=r.scheduler,
                scaler=r.scaler,
                state=_plain_state(r.state),
                rng=capture_rng_state(),
            )
        barrier(r.info)

    def validate(
        self,
        model: nn.Module,
        images: Any,
        loss_fn: nn.Module,
        device: torch.device,
        *,
        dist: DistInfo | None = None,
    ) -> dict[str, float]:
        """Validation metrics (AUROCs as ``mammogmic evaluate`` computes them), the validation loss and, when
        needed, the saliency Dice (``mammogmic.evaluation.localization``).

        ``val_loss`` is the mean loss of the images whose labels are all known (independent of batching, so the
        same with any number of ranks). Under ``dist`` every rank predicts its share and returns the metrics of
        all images.
        """
        from mammogmic.evaluation.localization import dice_scores, negative_marks, specific_dice
        from mammogmic.models import scoring_copy

        cfg = self.config
        info = dist or DistInfo()
        sums = np.zeros(2)  # loss summed over fully-labelled images, their count
        dice: list[NDArray[np.float64]] = []  # (n, 4): Dice of the images with a lesion, negative_marks

        def collect(out: Any, batch: dict[str, Any]) -> None:
            if "masks" in batch:
                up = cfg.schedule.dice_upsample
                lesion = dice_scores(out.saliency, batch["masks"], upsample=up).hard
                marked = negative_marks(out.saliency, batch["masks"], batch["labels"], upsample=up)
                dice.append(np.concatenate([lesion, marked], axis=1))
            y = batch["labels"].to(device)
            known = ~torch.isnan(y).any(dim=1)
            if not bool(known.any()):
                return
            if not bool(known.all()):
                out = _select_rows(out, known)
                y = y[known]
            total, _ = _loss_parts(loss_fn(out, y))
            sums[0] += float(total) * len(y)
            sums[1] += len(y)

        res = evaluate(
            scoring_copy(model),
            images,
            label_level=cfg.data.label_level,
            batch_size=cfg.data.eval_batch_size,
            device=device,
            amp=cfg.runtime.eval_amp,
            tta=1,
            channels_last=cfg.runtime.channels_last,
            num_workers=cfg.runtime.num_workers,
            on_batch=collect,
            callback=self.callback if info.is_main else None,
            dist=info,
        )
        metrics = dict(res.metrics)
        loss_sum, count = all_reduce_sum(sums, info, device)
        metrics["val_loss"] = float(loss_sum / count) if count else float("nan")
        if self._needs_dice():
            # Means over every rank's images: sums and counts per column, added over ranks. Columns: Dice of
            # the images with a lesion, then the share of the negative images marked (per class).
            values = np.concatenate(dice) if dice else np.full((0, 4), np.nan)
            totals = np.concatenate([np.nansum(values, axis=0), np.isfinite(values).sum(axis=0)])
            totals = all_reduce_sum(totals.astype(np.float64), info, device)
            means = [float(totals[j] / totals[4 + j]) if totals[4 + j] else float("nan") for j in range(4)]
            for c, name in enumerate(("benign", "malignant")):
                metrics[f"{name}_dice"] = means[c]
                metrics[f"{name}_negatives_marked"] = means[2 + c]
                metrics[f"{name}_specific_dice"] = specific_dice(means[c], means[2 + c])
        return metrics

    def test(self, r: _Run) -> dict[str, float]:
        """Metrics of the best checkpoint on the test split (with the configured TTA); ``{}`` without one."""
        from mammogmic.models import scoring_copy

        cfg = self.config
        test_images = self.test_images
        if test_images is None and cfg.data.test_split and cfg.data.manifest:
            candidate = split_dataset(cfg, cfg.data.test_split)
            test_images = candidate if len(candidate) else None
        if test_images is None:
            return {}
        # Every rank tests its share of the images with rank 0's best weights (read once, then broadcast).
        if broadcast_flag(self.best_path.exists(), r.info, r.device):
            if r.info.is_main:
                r.model.load_state_dict(load_checkpoint(self.best_path)["model"])
            broadcast_state(r.model, r.info)
        else:
            broadcast_state(r.model, r.info, buffers_only=True)
        res = evaluate(
            scoring_copy(r.model),
            test_images,
            label_level=cfg.data.label_level,
            batch_size=cfg.data.eval_batch_size,
            device=r.device,
            amp=cfg.runtime.eval_amp,
            tta=cfg.data.tta,
            seed=cfg.runtime.seed,
            channels_last=cfg.runtime.channels_last,
            num_workers=cfg.runtime.num_workers,
            callback=self.callback if r.info.is_main else None,
            dist=r.info,
        )
        if r.info.is_main and res.probs.shape[1] == 2 and hasattr(test_images, "items"):
            from mammogmic._outdir import atomic_write_text
            from mammogmic.evaluation.outputs import FLOAT_FORMAT, table_csv

            table = prediction_table(test_images, res.probs)
            atomic_write_text(self.run_dir / TEST_PREDICTIONS, table_csv(table, float_format=FLOAT_FORMAT))
        return res.metrics

    def _export_model(self, model: nn.Module, path: Path, metadata: dict[str, Any]) -> None:
        """A model file that carries what prediction needs: weights, config, input contract, provenance."""
        from mammogmic.models import save_model

        meta = {
            "input_contract": input_contract(self.config).to_dict(),
            **_heatmap_grid(self.config),
            "training_config": self.config.to_dict(),
            "training_manifest_sha256": self._manifest_sha256(),
            **({"init": self.init_report.provenance()} if self.init_report is not None else {}),
            **{k: _json_default(v) if isinstance(v, np.generic | Path) else v for k, v in metadata.items()},
        }
        save_model(model, path, metadata=_finite(meta), overwrite=True)  # type: ignore[arg-type]

    def _manifest_sha256(self) -> str | None:
        if not hasattr(self, "_manifest_hash"):
            from mammogmic.data.cache import sha256_file

            manifest = Path(self.config.data.manifest) if self.config.data.manifest else None
            self._manifest_hash = sha256_file(manifest) if manifest and manifest.is_file() else None
        return self._manifest_hash

    def _update_top_k(
        self, model: nn.Module, state: dict[str, Any], metric: float, epoch: int, higher: bool, *, write: bool
    ) -> None:
        """Update the top-k list in ``state`` (every rank) and, with ``write`` (rank 0), the files."""
        k = self.config.schedule.keep_top_k
        if k <= 1 or not math.isfinite(metric):
            return
        entries = [tuple(e) for e in state["top_k"]]
        entries.append((float(metric), int(epoch)))
        entries.sort(key=lambda e: e[0], reverse=higher)
        keep, drop = entries[:k], entries[k:]
        state["top_k"] = [list(e) for e in keep]
        if not write:
            return
        folder = self.run_dir / "top_k"
        folder.mkdir(exist_ok=True)
        if (float(metric), int(epoch)) in keep:
            self._export_model(
                model, folder / f"epoch{epoch:03d}.safetensors", {"epoch": epoch, "metric": metric}
            )
        for _, e in drop:
            (folder / f"epoch{e:03d}.safetensors").unlink(missing_ok=True)


#: What a run writes into its folder besides config.yaml: a fresh run starts only where none of them is.
_RUN_OUTPUTS = (
    "last.pt",
    "best.pt",
    "best_model.safetensors",
    "top_k",
    "steps.csv",
    "epochs.csv",
    "tensorboard",
    "result.json",
    TEST_PREDICTIONS,
    "init.json",
)


def _move_aside(run: Path, names: list[str]) -> Path:
    """Move ``run/NAME`` for each name into a new ``run/replaced-<time>/`` (nothing is deleted); return it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = run / f"replaced-{stamp}", 1
    while dest.exists():
        dest, n = run / f"replaced-{stamp}-{n}", n + 1
    dest.mkdir()
    for name in names:
        os.replace(run / name, dest / name)
    return dest


def _agree(problem: str | None, info: DistInfo, device: torch.device) -> None:
    """Raise ``MammogmicError(problem)`` on every rank when rank 0 found one (the others would wait forever)."""
    if broadcast_flag(problem is not None, info, device):
        raise MammogmicError(problem or "rank 0 refused to start (see its message)")


def _heatmap_grid(config: TrainConfig) -> dict[str, Any]:
    """A patch classifier's heat-map grid for its model file (``mammogmic heatmaps`` reads it); else nothing."""
    if config.model_type != "patch":
        return {}
    return {"heatmap_grid": {"patch_size": config.patches.size, "stride": config.patches.stride}}


def _select_rows(out: Any, keep: torch.Tensor) -> Any:
    """The rows ``keep`` of a model output: a batch-first tensor, a dict of them or a dataclass of them."""
    if isinstance(out, torch.Tensor):
        return out[keep]
    if isinstance(out, dict):
        return {k: _select_rows(v, keep) for k, v in out.items()}
    return type(out)(**{f.name: _select_rows(getattr(out, f.name), keep) for f in dataclasses.fields(out)})


def _plain_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in state.items()}


def _finite(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by ``None`` (valid JSON: ``null``, never ``NaN``)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float | np.floating) and not math.isfinite(float(obj)):
        return None
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callback | None = None,
    **datasets: Any,
) -> TrainResult:
    """Convenience wrapper: ``Trainer(config, run_dir, ...).fit(resume=resume, overwrite=overwrite)``."""
    return Trainer(config, run_dir, callback=callback, **datasets).fit(resume=resume, overwrite=overwrite)
