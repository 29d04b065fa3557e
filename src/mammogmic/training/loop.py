"""End-to-end GMIC training: Adam on the Eq. 13 loss, validation by AUC, early stopping, exact resume.

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

The library never draws progress bars: pass ``callback(event, info)`` (events ``"step"``, ``"epoch"``,
``"eval"``) and let the CLI render them.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mammogmic.errors import MammogmicError
from mammogmic.training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from mammogmic.training.config import TrainConfig
from mammogmic.training.data import ManifestImages, SeededSamples
from mammogmic.training.distributed import DistInfo, barrier, broadcast_flag, init_distributed, resolve_device
from mammogmic.training.finetune import InitReport, keep_frozen_in_eval, param_groups, prepare_model
from mammogmic.training.sampler import EpochSampler

__all__ = [
    "EvalResult",
    "NonFiniteLossError",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "predict",
    "train",
]

logger = logging.getLogger(__name__)

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
        }


# -- builders --------------------------------------------------------------------------------------------
def build_model(config: TrainConfig) -> nn.Module:
    """A freshly initialised GMIC for ``config.model``."""
    from mammogmic.models import GMIC

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


def _build_loss(config: TrainConfig) -> nn.Module:
    from mammogmic.training.loss import GMICLoss

    return GMICLoss(config.loss, prediction=config.model.prediction)


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

    Batch-norm running statistics are updated again during recomputation (PyTorch's usual caveat), which only
    changes their momentum average slightly.
    """
    from torch.utils.checkpoint import checkpoint

    for name in ("global_net", "local_net"):
        sub = getattr(model, name, None)
        if sub is None:
            continue
        original = sub.forward

        def wrapped(x: torch.Tensor, _f: Callable[..., torch.Tensor] = original) -> torch.Tensor:
            if torch.is_grad_enabled() and x.requires_grad is not None:
                return checkpoint(_f, x, use_reentrant=False)
            return _f(x)

        sub.forward = functools.update_wrapper(wrapped, original)


def _freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "image": torch.stack([b["image"] for b in batch]),
        "label": torch.stack([b["label"] for b in batch]),
        "index": torch.tensor([int(b["index"]) for b in batch], dtype=torch.long),
    }
    if all("mask" in b for b in batch):
        out["mask"] = torch.stack([b["mask"] for b in batch])
    return out


def _seed_worker(worker_id: int) -> None:
    # Samples carry their own RNG (SeededSamples); this only keeps stray numpy/python use deterministic.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002
    random.seed(seed)


# -- evaluation ------------------------------------------------------------------------------------------
def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    ok = ~np.isnan(labels)
    y, s = labels[ok] > 0.5, scores[ok]
    if y.all() or not y.any():
        return float("nan")
    try:
        from mammogmic.evaluation.metrics import auroc

        return float(auroc(y.astype(int), s))
    except ImportError:  # pragma: no cover - evaluation package absent
        order = np.argsort(s, kind="mergesort")
        ranks = np.empty(len(s))
        ranks[order] = np.arange(1, len(s) + 1)
        for v in np.unique(s):  # average ranks over ties
            tie = s == v
            ranks[tie] = ranks[tie].mean()
        npos = int(y.sum())
        return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * (len(y) - npos)))


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, groups: list[str] | None = None, prefix: str = ""
) -> dict[str, float]:
    """Benign/malignant AUROC (NaN when a class is missing); with ``groups`` predictions are averaged per group
    (e.g. breast) first and the group label is the max of its members' labels."""
    if groups is not None:
        keys = sorted(set(groups))
        where = {k: i for i, k in enumerate(keys)}
        gi = np.array([where[g] for g in groups])
        gp = np.zeros((len(keys), 2))
        gl = np.full((len(keys), 2), np.nan)
        counts = np.bincount(gi, minlength=len(keys))[:, None]
        np.add.at(gp, gi, probs)
        gp /= np.maximum(counts, 1)
        for i, lab in zip(gi, labels, strict=True):
            gl[i] = np.fmax(gl[i], lab)
        probs, labels = gp, gl
    benign, malignant = _auroc(labels[:, 0], probs[:, 0]), _auroc(labels[:, 1], probs[:, 1])
    return {
        f"{prefix}benign_auroc": benign,
        f"{prefix}malignant_auroc": malignant,
        f"{prefix}mean_auroc": float(np.nanmean([benign, malignant]))
        if not (math.isnan(benign) and math.isnan(malignant))
        else float("nan"),
    }


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
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions ``model.prediction`` for every image, averaged over ``tta`` windows.

    With ``tta == 1`` the deterministic window is used; with ``tta > 1`` that many random windows (seeded by
    ``(seed, pass, index)``) are averaged, the paper's test-time augmentation.

    Args:
        on_batch: called as ``on_batch(output, batch)`` for every batch of the first pass (e.g. to collect saliency
            maps); ``output`` is the model's output object.

    Returns:
        ``probs`` (n, 2) and ``indices`` (n,) in dataset order.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    n = len(images)
    total = np.zeros((n, 2), dtype=np.float64)
    passes = max(1, tta)
    try:
        for p in range(passes):
            ds = SeededSamples(images, augment=tta > 1, seed=seed + 7919)
            order = [(i, p) for i in range(n)]
            loader = torch.utils.data.DataLoader(
                ds,
                batch_size=batch_size,
                sampler=order,
                num_workers=num_workers,
                collate_fn=_collate,
            )
            done = 0
            for batch in loader:
                x = batch["image"].to(device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with _amp_context(device, amp):
                    out = model(x)
                pred = out.prediction.float().cpu().numpy()
                total[batch["index"].numpy()] += pred
                if on_batch is not None and p == 0:
                    on_batch(out, batch)
                done += len(x)
                if callback is not None:
                    callback("eval", {"pass": p, "passes": passes, "done": done, "total": n, "batch": len(x)})
    finally:
        model.train(was_training)
    return total / passes, np.arange(n)


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
    groups = list(images.breast_ids) if label_level == "breast" else None
    metrics = classification_metrics(probs, labels, groups, prefix)
    return EvalResult(probs=probs, labels=labels, indices=idx, metrics=metrics)


# -- logging ---------------------------------------------------------------------------------------------
class _CsvLog:
    """Append-only CSV whose rows after a given step can be dropped (used on resume)."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key
        self.fields: list[str] | None = None

    def truncate_after(self, value: int) -> None:
        if not self.path.is_file():
            return
        with open(self.path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        keep = [r for r in rows if r.get(self.key, "") != "" and int(float(r[self.key])) <= value]
        fields = list(rows[0].keys()) if rows else []
        with open(self.path, "w", newline="") as fh:
            if fields:
                w = csv.DictWriter(fh, fieldnames=fields)
                w.writeheader()
                w.writerows(keep)
        self.fields = fields or None

    def write(self, row: dict[str, Any]) -> None:
        if self.fields is None:
            if self.path.is_file() and self.path.stat().st_size > 0:
                with open(self.path, newline="") as fh:
                    self.fields = next(csv.reader(fh), None)
            if not self.fields:
                self.fields = list(row.keys())
                with open(self.path, "w", newline="") as fh:
                    csv.DictWriter(fh, fieldnames=self.fields).writeheader()
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore").writerow(row)


class _Tensorboard:
    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.writer: Any = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
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
_HIGHER_IS_BETTER = {"malignant_auroc": True, "benign_auroc": True, "mean_auroc": True, "val_loss": False}


class Trainer:
    """Trains one GMIC according to a :class:`TrainConfig`.

    Args:
        config: the resolved configuration.
        run_dir: run folder (created).
        train_images, val_images, test_images: datasets (default: the manifest's splits via
            :class:`ManifestImages`). Anything with ``labels``, ``breast_ids``, ``__len__`` and ``load(i, rng)``.
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

    # .. setup ..
    def _images(self, split: str, augment: bool, with_masks: bool = False) -> Any:
        d = self.config.data
        if not d.manifest:
            raise MammogmicError(
                "data.manifest: no manifest given (set it in the YAML or with --set data.manifest=...)"
            )
        return ManifestImages(
            d.manifest,
            split=split,
            out_shape=d.out_shape,
            label_level=d.label_level,
            max_crop_noise=d.max_crop_noise if augment else (0, 0),
            max_crop_size_noise=d.max_crop_size_noise if augment else 0,
            with_masks=with_masks,
        )

    def _setup_runtime(self) -> tuple[DistInfo, torch.device]:
        rt = self.config.runtime
        info = init_distributed(rt.device)
        device = resolve_device(rt.device, info.local_rank)
        if rt.threads is not None:
            torch.set_num_threads(rt.threads)
        if rt.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if rt.amp == "fp16" and device.type != "cuda":
            raise MammogmicError("runtime.amp: fp16 autocast needs a CUDA device; use bf16 or none")
        return info, device

    def fit(self, *, resume: bool = False) -> TrainResult:
        """Train (or resume) to the end of the schedule or early stopping; then test the best model.

        Raises:
            NonFiniteLossError: the loss became NaN/inf (the last good ``last.pt`` is kept).
            MammogmicError: bad configuration, data, or an existing run folder without ``resume``.
        """
        t_start = time.perf_counter()
        cfg = self.config
        info, device = self._setup_runtime()
        run = self.run_dir
        last_path, best_path = run / "last.pt", run / "best.pt"
        if info.is_main:
            run.mkdir(parents=True, exist_ok=True)
            if not resume and last_path.exists():
                raise MammogmicError(
                    f"{run}: already holds a run (last.pt); pass --resume to continue it or choose a new --out"
                )
        barrier(info)

        ckpt = None
        if resume:
            if not last_path.exists():
                raise MammogmicError(f"{run}: nothing to resume (no last.pt)")
            ckpt = load_checkpoint(last_path)
            saved = TrainConfig.from_dict(ckpt["config"])
            if saved.model != cfg.model:
                raise MammogmicError(f"{last_path}: checkpoint model config differs from the requested one")
        # Seed before building the model so initialisation is reproducible.
        torch.manual_seed(cfg.runtime.seed)

        train_images = (
            self.train_images if self.train_images is not None else self._images(cfg.data.train_split, True)
        )
        val_images = self.val_images
        if val_images is None and cfg.data.val_split and cfg.data.manifest:
            val_images = self._images(cfg.data.val_split, False)
        if val_images is not None and len(val_images) == 0:
            logger.warning("validation split %r is empty: no early stopping", cfg.data.val_split)
            val_images = None
        if len(train_images) == 0:
            raise MammogmicError(f"data.train_split: split {cfg.data.train_split!r} has no images")

        model = build_model(cfg).to(device)
        self.init_report = prepare_model(model, cfg, run, resume=ckpt is not None, write=info.is_main)
        if cfg.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if cfg.runtime.activation_checkpointing:
            enable_activation_checkpointing(model)
        loss_fn = _build_loss(cfg)
        self.model = model  # exposed for callers/tests (the unwrapped module)
        net: nn.Module = model
        if info.enabled:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        optimizer = build_optimizer(model, cfg)

        labels = np.asarray(train_images.labels, dtype=np.float64)
        pc = cfg.data.positive_class
        pos_cols = {"benign": [0], "malignant": [1], "any": [0, 1]}[pc]
        positives = np.nan_to_num(labels[:, pos_cols], nan=0.0).max(axis=1) > 0.5
        sampler = EpochSampler(
            positives,
            balanced=cfg.data.balanced_sampling,
            seed=cfg.runtime.seed,
            rank=info.rank,
            world_size=info.world_size,
        )
        bs, accum = cfg.data.batch_size, cfg.runtime.grad_accum
        micro_per_epoch = math.ceil(len(sampler.rank_indices(0)) / bs)
        steps_per_epoch = math.ceil(micro_per_epoch / accum)
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
            logger.info("resumed %s at epoch %d, step %d", last_path, state["epoch"], state["global_step"])

        steps_log = _CsvLog(run / "steps.csv", "step")
        epochs_log = _CsvLog(run / "epochs.csv", "epoch")
        tb = _Tensorboard(run / "tensorboard", self.tensorboard and info.is_main)
        if info.is_main:
            cfg.save(run / "config.yaml")
            if ckpt is not None:
                # Rows carry the step count (1-based) and the epoch index (0-based); the checkpoint counts
                # steps and epochs done. A kill between an epoch's log row and its checkpoint leaves a row
                # that the resumed run writes again, so it goes.
                steps_log.truncate_after(state["global_step"])
                epochs_log.truncate_after(state["epoch"] - 1)

        def checkpoint_state() -> dict[str, Any]:
            return {k: (list(v) if isinstance(v, list) else v) for k, v in state.items()}

        def write_last() -> None:
            if info.is_main:
                save_checkpoint(
                    last_path,
                    config=cfg.to_dict(),
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    state=checkpoint_state(),
                    rng=capture_rng_state(),
                )
            barrier(info)

        train_ds = SeededSamples(train_images, augment=cfg.data.augment, seed=cfg.runtime.seed)
        higher = _HIGHER_IS_BETTER[cfg.schedule.val_metric]
        try:
            while not state["finished"] and state["epoch"] < cfg.schedule.epochs:
                epoch = state["epoch"]
                t_epoch = time.perf_counter()
                model.train()
                if cfg.runtime.freeze_batchnorm:
                    _freeze_batchnorm(model)
                keep_frozen_in_eval(model, cfg.finetune.freeze)
                sampler.set_epoch(epoch, start=state["batches_done"] * bs)
                loader = torch.utils.data.DataLoader(
                    train_ds,
                    batch_size=bs,
                    sampler=sampler,
                    num_workers=cfg.runtime.num_workers,
                    collate_fn=_collate,
                    worker_init_fn=_seed_worker,
                    persistent_workers=False,
                    pin_memory=device.type == "cuda",
                )
                it: Iterator[dict[str, Any]] = iter(loader)
                steps_done_epoch = state["batches_done"] // accum
                t_step, images_since = time.perf_counter(), 0
                while steps_done_epoch < steps_per_epoch:
                    micro = []
                    for _ in range(accum):
                        try:
                            micro.append(next(it))
                        except StopIteration:
                            break
                    if not micro:
                        break
                    optimizer.zero_grad(set_to_none=True)
                    step_loss, parts_sum = 0.0, dict[str, float]()
                    n_micro = len(micro)
                    for mi, batch in enumerate(micro):
                        x = batch["image"].to(device, non_blocking=True)
                        y = batch["label"].to(device, non_blocking=True)
                        if cfg.runtime.channels_last:
                            x = x.contiguous(memory_format=torch.channels_last)
                        sync = mi == n_micro - 1 or not info.enabled
                        ctx = contextlib.nullcontext() if sync else net.no_sync()  # type: ignore[operator]
                        with ctx:
                            with _amp_context(device, cfg.runtime.amp):
                                out = net(x)
                                total, parts = _loss_parts(loss_fn(out, y))
                            value = float(total.detach().float())
                            bad = broadcast_flag(not math.isfinite(value), info, device, any_rank=True)
                            if bad:
                                raise NonFiniteLossError(
                                    f"non-finite loss ({value}) at epoch {epoch}, optimizer step "
                                    f"{state['global_step'] + 1} (micro-batch {mi + 1} of {n_micro}); training "
                                    f"stopped, the last good checkpoint is {last_path if last_path.exists() else 'none (no checkpoint yet)'}"
                                )
                            loss = total / n_micro
                            if scaler is not None:
                                scaler.scale(loss).backward()
                            else:
                                loss.backward()
                        step_loss += value / n_micro
                        for k, v in parts.items():
                            parts_sum[k] = parts_sum.get(k, 0.0) + v / n_micro
                        images_since += len(x)
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    if cfg.optim.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    scheduler.step()
                    state["global_step"] += 1
                    state["batches_done"] += n_micro
                    state["epoch_loss_sum"] += step_loss
                    state["epoch_loss_count"] += 1
                    steps_done_epoch += 1
                    now = time.perf_counter()
                    info_row = {
                        "step": state["global_step"],
                        "epoch": epoch,
                        "loss": step_loss,
                        **{f"loss_{k}": v for k, v in parts_sum.items()},
                        "lr": optimizer.param_groups[0]["lr"],
                        "images_per_s": images_since * info.world_size / max(now - t_step, 1e-9),
                    }
                    if info.is_main and (
                        state["global_step"] % cfg.schedule.log_every == 0
                        or steps_done_epoch == steps_per_epoch
                    ):
                        steps_log.write(info_row)
                        tb.scalars(info_row, state["global_step"], "train")
                    if self.callback is not None and info.is_main:
                        self.callback(
                            "step",
                            {
                                **info_row,
                                "step_in_epoch": steps_done_epoch,
                                "steps_per_epoch": steps_per_epoch,
                                "images": images_since * info.world_size,
                            },
                        )
                    t_step, images_since = now, 0
                    every = cfg.schedule.checkpoint_every_steps
                    if every and state["global_step"] % every == 0 and steps_done_epoch < steps_per_epoch:
                        write_last()
                del it, loader

                # .. end of epoch: validation, early stopping, checkpoints ..
                train_loss = state["epoch_loss_sum"] / max(1, state["epoch_loss_count"])
                row: dict[str, Any] = {
                    "epoch": epoch,
                    "step": state["global_step"],
                    "train_loss": train_loss,
                    "lr": optimizer.param_groups[0]["lr"],
                }
                improved = False
                validate = val_images is not None and (
                    (epoch + 1) % cfg.schedule.val_every == 0 or epoch + 1 == cfg.schedule.epochs
                )
                if validate and info.is_main:
                    val = self._validate(model, val_images, loss_fn, device)
                    row.update({k if k.startswith("val_") else f"val_{k}": v for k, v in val.items()})
                    metric = val[cfg.schedule.val_metric]
                    best = state["best_metric"]
                    if math.isfinite(metric) and (
                        best is None or (metric > best if higher else metric < best)
                    ):
                        improved = True
                        state["best_metric"], state["best_epoch"], state["bad_validations"] = metric, epoch, 0
                    else:
                        state["bad_validations"] += 1
                    self._update_top_k(model, state, metric, epoch, higher)
                state["epoch"] = epoch + 1
                state["batches_done"] = 0
                state["epoch_loss_sum"], state["epoch_loss_count"] = 0.0, 0
                patience = cfg.schedule.patience
                stop = bool(validate and patience is not None and state["bad_validations"] >= patience)
                stop = broadcast_flag(stop, info, device)
                if stop:
                    state["stopped_early"] = True
                    state["finished"] = True
                row["seconds"] = time.perf_counter() - t_epoch
                if info.is_main:
                    epochs_log.write(row)
                    tb.scalars(row, epoch, "epoch")
                    if improved or (val_images is None):
                        save_checkpoint(
                            best_path,
                            config=cfg.to_dict(),
                            model=model,
                            state=checkpoint_state(),
                            rng=capture_rng_state(),
                        )
                        self._export_model(model, run / "best_model.safetensors", {"epoch": epoch, **row})
                if self.callback is not None and info.is_main:
                    self.callback("epoch", dict(row, epochs=cfg.schedule.epochs, stopped=stop))
                write_last()
            state["finished"] = True
            write_last()
        finally:
            tb.close()

        test_metrics: dict[str, float] = {}
        test_images = self.test_images
        if test_images is None and cfg.data.test_split and cfg.data.manifest:
            candidate = self._images(cfg.data.test_split, cfg.data.tta > 1)
            test_images = candidate if len(candidate) else None
        if test_images is not None and info.is_main:
            if best_path.exists():
                model.load_state_dict(load_checkpoint(best_path)["model"])
            res = evaluate(
                model,
                test_images,
                label_level=cfg.data.label_level,
                batch_size=cfg.data.eval_batch_size,
                device=device,
                amp=cfg.runtime.amp,
                tta=cfg.data.tta,
                seed=cfg.runtime.seed,
                channels_last=cfg.runtime.channels_last,
                num_workers=cfg.runtime.num_workers,
                callback=self.callback,
            )
            test_metrics = res.metrics
        result = TrainResult(
            run_dir=run,
            epochs_run=state["epoch"],
            global_step=state["global_step"],
            best_epoch=state["best_epoch"],
            best_metric=state["best_metric"],
            stopped_early=state["stopped_early"],
            test_metrics=test_metrics,
            seconds=time.perf_counter() - t_start,
        )
        if info.is_main:
            (run / "result.json").write_text(json.dumps(result.to_dict(), indent=2, default=_json_default))
        barrier(info)
        return result

    def _validate(
        self, model: nn.Module, images: Any, loss_fn: nn.Module, device: torch.device
    ) -> dict[str, float]:
        cfg = self.config
        losses: list[float] = []

        def collect(out: Any, batch: dict[str, Any]) -> None:
            y = batch["label"].to(device)
            if torch.isnan(y).any():
                return
            total, _ = _loss_parts(loss_fn(out, y))
            losses.append(float(total) * len(y))

        res = evaluate(
            model,
            images,
            label_level=cfg.data.label_level,
            batch_size=cfg.data.eval_batch_size,
            device=device,
            amp=cfg.runtime.amp,
            tta=1,
            seed=cfg.runtime.seed,
            channels_last=cfg.runtime.channels_last,
            num_workers=cfg.runtime.num_workers,
            on_batch=collect,
            callback=self.callback,
        )
        metrics = dict(res.metrics)
        metrics["val_loss"] = sum(losses) / max(1, len(images)) if losses else float("nan")
        return metrics

    def _export_model(self, model: nn.Module, path: Path, metadata: dict[str, Any]) -> None:
        try:
            from mammogmic.models import save_model
        except ImportError:  # pragma: no cover - model package without save_model
            return
        meta = {
            "training_config": self.config.to_dict(),
            **({"init": self.init_report.provenance()} if self.init_report is not None else {}),
            **{k: _json_default(v) if isinstance(v, np.generic | Path) else v for k, v in metadata.items()},
        }
        save_model(model, path, metadata=meta, overwrite=True)  # type: ignore[arg-type]

    def _update_top_k(
        self, model: nn.Module, state: dict[str, Any], metric: float, epoch: int, higher: bool
    ) -> None:
        k = self.config.schedule.keep_top_k
        if k <= 1 or not math.isfinite(metric):
            return
        folder = self.run_dir / "top_k"
        folder.mkdir(exist_ok=True)
        entries = [tuple(e) for e in state["top_k"]]
        entries.append((float(metric), int(epoch)))
        entries.sort(key=lambda e: e[0], reverse=higher)
        keep, drop = entries[:k], entries[k:]
        if (float(metric), int(epoch)) in keep:
            self._export_model(
                model, folder / f"epoch{epoch:03d}.safetensors", {"epoch": epoch, "metric": metric}
            )
        for _, e in drop:
            (folder / f"epoch{e:03d}.safetensors").unlink(missing_ok=True)
        state["top_k"] = [list(e) for e in keep]


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
    callback: Callback | None = None,
    **datasets: Any,
) -> TrainResult:
    """Convenience wrapper: ``Trainer(config, run_dir, ...).fit(resume=resume)``."""
    return Trainer(config, run_dir, callback=callback, **datasets).fit(resume=resume)
