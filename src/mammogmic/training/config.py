"""Training configuration: typed, frozen, validated dataclasses loaded from YAML plus ``--set`` overrides.

A :class:`TrainConfig` nests the model's :class:`~mammogmic.GMICConfig`, the loss's
:class:`~mammogmic.training.loss.LossConfig` and five training sections (``optim``, ``data``, ``schedule``,
``runtime``, ``finetune``). Every invalid value raises :class:`~mammogmic.errors.ConfigError` whose message starts with the
dotted field name (``optim.lr: must be > 0, got -1``), so a user can find the line in the YAML file.

Layering (highest wins): dataclass defaults < YAML file < ``--set key.sub=value`` overrides. The resolved config
is written to the run folder (``config.yaml``) and stored in every checkpoint (:meth:`TrainConfig.to_dict`).

Paths: a relative ``data.manifest`` in a YAML file is relative to that file's folder; one given on the command
line (``--set``) or in a mapping is relative to the working folder. :func:`load_config` makes it absolute at
once and :meth:`TrainConfig.save` only writes absolute paths, so a saved ``config.yaml`` works from any folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from mammogmic.errors import ConfigError
from mammogmic.runtime import SCORING_AMP

__all__ = [
    "FREEZE_PARTS",
    "DataConfig",
    "FinetuneConfig",
    "MODEL_TYPES",
    "OptimConfig",
    "PatchesConfig",
    "RuntimeConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "available_cpus",
    "list_presets",
    "load_config",
    "loader_workers",
    "parse_override",
    "preset_path",
]

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"

AmpMode = Literal["none", "bf16", "fp16"]
LabelLevel = Literal["image", "breast"]
ValMetric = Literal[
    "malignant_auroc",
    "benign_auroc",
    "mean_auroc",
    "val_loss",
    "malignant_dice",
    "benign_dice",
    "malignant_specific_dice",
    "benign_specific_dice",
]
#: What ``schedule.keep_best_dice`` selects on: Dice of the images with a lesion (the paper), or that Dice times
#: the share of negative images whose maps stay dark.
DiceMetric = Literal["malignant_dice", "malignant_specific_dice"]

#: Parts of GMIC that ``finetune.freeze`` accepts -> the GMIC submodule each one names.
FREEZE_PARTS: dict[str, str] = {
    "global": "global_net",  # f_g, the global network (ResNet-22); its 1x1 saliency conv is "saliency"
    "saliency": "saliency_head",
    "local": "local_net",  # f_l, the local network on the patches
    "attention": "attention",  # gated attention MIL
    "local_classifier": "local_classifier",
    "fusion": "fusion",
}


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}" if path else message)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule.

    Attributes:
        name: ``adam`` (the paper), ``adamw`` or ``sgd`` (with ``momentum``).
        lr: learning rate (the paper searched 10^[-5.5, -4]).
        weight_decay: L2 (adam) or decoupled (adamw) weight decay.
        betas: Adam betas.
        eps: Adam epsilon.
        scheduler: ``constant`` (the paper), ``cosine`` (decays to ``min_lr_ratio * lr`` over all steps) or
            ``step`` (multiplies by ``gamma`` every ``step_epochs`` epochs).
        warmup_steps: linear warm-up length in optimizer steps (0 = none).
        min_lr_ratio: final lr / lr for the cosine schedule.
        step_epochs: period of the step schedule.
        gamma: factor of the step schedule.
        grad_clip: max global gradient norm (``None`` = no clipping).
        momentum: SGD momentum (only for ``sgd``).
        backbone_lr_ratio: with ``finetune.init``, parameters loaded from the checkpoint train at
            ``lr * backbone_lr_ratio`` and re-initialised ones (``finetune.init_exclude``) at ``lr``; the
            schedule scales both. No effect without ``finetune.init``.
    """

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    step_epochs: int = 10
    gamma: float = 0.1
    grad_clip: float | None = None
    momentum: float = 0.9
    backbone_lr_ratio: float = 1.0

    def __post_init__(self) -> None:
        _check_positive("lr", self.lr)
        _check_nonneg("backbone_lr_ratio", self.backbone_lr_ratio)
        if not 0.0 <= self.momentum < 1.0:
            raise _fail("momentum", f"must be in [0, 1), got {self.momentum}")
        _check_nonneg("weight_decay", self.weight_decay)
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise _fail(f"betas[{i}]", f"must be in [0, 1), got {b}")
        _check_positive("eps", self.eps)
        _check_nonneg("warmup_steps", self.warmup_steps)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise _fail("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check_positive("step_epochs", self.step_epochs)
        _check_positive("gamma", self.gamma)
        if self.grad_clip is not None:
            _check_positive("grad_clip", self.grad_clip)


@dataclass(frozen=True)
class DataConfig:
    """What to train on and how images are fed.

    Attributes:
        manifest: path of the manifest CSV. :func:`load_config` makes it absolute (a relative one in a YAML
            file is relative to the file's folder, one from ``--set`` to the working folder).
        out_shape: (height, width) of the network input after the best-center window and resize.
        window_shape: (height, width) of the window cut around the optimal centre in source pixels, resized to
            ``out_shape`` (``null``: the same as ``out_shape``, the official behaviour).
        crop_iterations: erosion/dilation iterations of the breast crop for rows cropped on the fly (official
            100, for full-field images; :func:`mammogmic.data.sample.scaled_crop_settings` for smaller ones).
        crop_buffer: crop margin in pixels (official 50).
        label_level: ``image`` (each view carries its own label) or ``breast`` (each view gets its breast's label).
        balanced_sampling: each epoch uses all positive images plus an equal number of negatives drawn at random
            (seeded by ``runtime.seed`` and the epoch), as in the paper.
        positive_class: which label defines "positive" for balanced sampling (``malignant``, ``benign``, ``any``).
        batch_size: images per optimizer micro-batch (per process under DDP).
        eval_batch_size: images per evaluation batch.
        augment: random window position and size noise during training (``max_crop_noise``,
            ``max_crop_size_noise``) and, when their probabilities are set, flips.
        hflip_prob: probability of mirroring a training sample left-right (0 = the official recipe, where every
            breast faces the same way; see docs/localization.md for why the demo uses 0.5).
        vflip_prob: probability of flipping a training sample upside down (0 = the official recipe).
        max_crop_noise: maximal random shift (rows, cols) of the window in raw pixels when augmenting.
        max_crop_size_noise: maximal random change of the window size in raw pixels when augmenting.
        keep_in_memory: keep each image's read, cropped and centred source in memory after the first epoch
            (:class:`~mammogmic.data.dataset.MammogramDataset`); for small datasets such as the demo's, where
            PNG decoding and cropping otherwise cost more than the model. With ``runtime.num_workers > 0``
            each worker process keeps its own copy for one epoch only, so it helps with ``num_workers: 0``.
        tta: number of random windows averaged at test time (1 = the deterministic window only).
        train_split: value of the manifest ``split`` column used for training.
        val_split: split used for validation / early stopping (empty = no validation).
        test_split: split evaluated after training with the best checkpoint (empty = none).
        heatmaps_dir: folder of ``mammogmic heatmaps`` outputs (``<image_id>.npz``) for rows without a
            ``heatmap_path`` manifest column; read by models with heat-map channels (``model.in_channels: 3``).
            Made absolute like ``manifest``.
    """

    manifest: str = ""
    out_shape: tuple[int, int] = (2944, 1920)
    window_shape: tuple[int, int] | None = None
    crop_iterations: int = 100
    crop_buffer: int = 50
    label_level: LabelLevel = "image"
    balanced_sampling: bool = False
    positive_class: Literal["malignant", "benign", "any"] = "malignant"
    batch_size: int = 4
    eval_batch_size: int = 8
    augment: bool = True
    max_crop_noise: tuple[int, int] = (100, 100)
    max_crop_size_noise: int = 100
    hflip_prob: float = 0.0
    vflip_prob: float = 0.0
    keep_in_memory: bool = False
    tta: int = 1
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    heatmaps_dir: str = ""

    def __post_init__(self) -> None:
        for i, s in enumerate(self.out_shape):
            if s < 32:
                raise _fail(f"out_shape[{i}]", f"must be >= 32 pixels, got {s}")
        for i, s in enumerate(self.window_shape or ()):
            if s < 32:
                raise _fail(f"window_shape[{i}]", f"must be >= 32 pixels, got {s}")
        _check_positive("crop_iterations", self.crop_iterations)
        _check_nonneg("crop_buffer", self.crop_buffer)
        _check_positive("batch_size", self.batch_size)
        _check_positive("eval_batch_size", self.eval_batch_size)
        for i, s in enumerate(self.max_crop_noise):
            _check_nonneg(f"max_crop_noise[{i}]", s)
        _check_nonneg("max_crop_size_noise", self.max_crop_size_noise)
        for name in ("hflip_prob", "vflip_prob"):
            prob = getattr(self, name)
            if not 0.0 <= prob <= 1.0:  # also refuses NaN
                raise _fail(name, f"must be a probability in [0, 1], got {prob}")
        _check_positive("tta", self.tta)
        if not self.train_split:
            raise _fail("train_split", "must not be empty")


@dataclass(frozen=True)
class ScheduleConfig:
    """How long to train and how to pick the best model.

    Attributes:
        epochs: maximal number of epochs.
        patience: stop after this many validations without improvement of ``val_metric`` (``None`` = never).
        val_metric: validation metric used for early stopping and best-checkpoint selection; ``malignant_dice`` /
            ``benign_dice`` select on the saliency Dice of validation images with lesion masks (the paper's model
            selection for localization); ``malignant_specific_dice`` / ``benign_specific_dice`` on that Dice times
            the share of the validation images labelled negative for the class whose map marks no pixel at 0.5
            (:func:`mammogmic.evaluation.localization.specific_dice`).
        keep_best_dice: also keep the model with the best validation ``best_dice_metric``
            (``best_dice_model.safetensors``) beside the one selected by ``val_metric``, as the paper does.
        best_dice_metric: ``malignant_dice`` (the paper: the images with a lesion) or
            ``malignant_specific_dice`` (so that maps that also mark the negative images are not the ones kept;
            docs/localization.md, "Selecting maps that stay dark on negative images").
        dice_upsample: saliency upsampling of the validation Dice: ``nearest`` (the paper) or ``aligned``
            (:mod:`mammogmic.evaluation.localization`).
        val_every: validate every this many epochs.
        max_steps_per_epoch: cap the optimizer steps of an epoch (``None`` = full epoch; handy for smoke runs).
        checkpoint_every_steps: also write ``last.pt`` every this many optimizer steps (``None`` = per epoch only),
            so that a killed run resumes mid-epoch.
        log_every: write a per-step CSV/TensorBoard row every this many optimizer steps.
        keep_top_k: keep this many best checkpoints (``top_k/``) for ensembling.
        t_warmup_epochs: GMIC only, not in the paper: over the first this many epochs the global head's loss
            pools the saliency maps with a t that falls geometrically from 1 (global average pooling, which gives
            every cell a gradient) to ``model.percent_t``; 0 (default) pools with ``model.percent_t`` throughout.
            The model's own outputs always use ``model.percent_t`` (docs/localization.md, "Maps stuck on a
            corner").
    """

    epochs: int = 40
    patience: int | None = 10
    val_metric: ValMetric = "malignant_auroc"
    keep_best_dice: bool = False
    best_dice_metric: DiceMetric = "malignant_dice"
    dice_upsample: Literal["nearest", "aligned"] = "nearest"
    val_every: int = 1
    max_steps_per_epoch: int | None = None
    checkpoint_every_steps: int | None = None
    log_every: int = 10
    keep_top_k: int = 1
    t_warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        _check_positive("epochs", self.epochs)
        _check_nonneg("t_warmup_epochs", self.t_warmup_epochs)
        if self.patience is not None:
            _check_positive("patience", self.patience)
        _check_positive("val_every", self.val_every)
        if self.max_steps_per_epoch is not None:
            _check_positive("max_steps_per_epoch", self.max_steps_per_epoch)
        if self.checkpoint_every_steps is not None:
            _check_positive("checkpoint_every_steps", self.checkpoint_every_steps)
        _check_positive("log_every", self.log_every)
        _check_positive("keep_top_k", self.keep_top_k)


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the computation runs. Nothing here changes the model's mathematics (except AMP rounding).

    Attributes:
        device: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        amp: autocast dtype of training: ``none``, ``bf16`` (GPU, or CPUs that support it) or ``fp16`` (GPU
            only, with a gradient scaler).
        eval_amp: autocast dtype of validation and test scoring. Default ``none`` (float32,
            :data:`mammogmic.runtime.SCORING_AMP`): what ``mammogmic predict`` runs by default, so the figures a
            run reports (and the checkpoint it selects) are the ones ``predict`` gives its model, whatever
            ``amp`` trained it in. ``bf16`` scores faster and reports bf16 figures.
        grad_accum: micro-batches accumulated per optimizer step.
        channels_last: use the channels-last memory format (faster convolutions on recent GPUs).
        activation_checkpointing: recompute backbone activations in backward (less memory, ~30% slower).
        num_workers: most DataLoader worker processes. The value used (this attribute after construction) is
            capped by :func:`loader_workers` at the CPUs this process may use minus one (per process under
            DDP), so a preset's 8 becomes 1 on a 2-core machine; :meth:`TrainConfig.to_dict` keeps the
            requested value, so a saved config still asks for 8 on a larger machine.
        seed: seed of every random choice (init, sampling, augmentation).
        deterministic: request deterministic kernels (``torch.use_deterministic_algorithms``); needed for
            bit-exact resume on GPU.
        threads: CPU threads for torch (``None`` = torch's default).
        freeze_batchnorm: keep batch-norm layers in eval mode while training (running statistics fixed); useful
            for fine-tuning with tiny per-device batches, and it makes a DDP step equal a single-process step.
        dist_timeout_minutes: under ``torchrun``, how long a rank waits for the others at a collective
            (all-reduce, barrier) before the run fails; PyTorch's NCCL default is 10 minutes.
    """

    device: str = "auto"
    amp: AmpMode = "none"
    eval_amp: AmpMode = SCORING_AMP
    grad_accum: int = 1
    channels_last: bool = False
    activation_checkpointing: bool = False
    num_workers: int = 0
    seed: int = 0
    deterministic: bool = False
    threads: int | None = None
    freeze_batchnorm: bool = False
    dist_timeout_minutes: float = 60.0

    def __post_init__(self) -> None:
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise _fail("device", f"must be auto, cpu, mps, cuda or cuda:N, got {dev!r}")
        _check_positive("grad_accum", self.grad_accum)
        _check_positive("dist_timeout_minutes", self.dist_timeout_minutes)
        _check_nonneg("num_workers", self.num_workers)
        _check_nonneg("seed", self.seed)
        if self.threads is not None:
            _check_positive("threads", self.threads)
        # The loops read ``num_workers`` directly, so the field holds the value to use; the request is kept
        # beside it for saving (not a dataclass field: equality compares what runs).
        object.__setattr__(self, "_requested_workers", self.num_workers)
        object.__setattr__(self, "num_workers", loader_workers(self.num_workers))

    @property
    def requested_workers(self) -> int:
        """``num_workers`` as configured, before the cap of :func:`loader_workers`."""
        return int(getattr(self, "_requested_workers", self.num_workers))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_workers(requested: int) -> int:
    """DataLoader workers to start: ``min(requested, CPUs per local process - 1)``, at least 0.

    One CPU stays with the training process itself; under ``torchrun`` the machine's CPUs are shared by its
    ``LOCAL_WORLD_SIZE`` processes. More workers than that only add memory (each holds a copy of the dataset
    and its decoding buffers) and contention.
    """
    try:
        local_processes = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    except ValueError:
        local_processes = 1
    return max(min(requested, available_cpus() // local_processes - 1), 0)


@dataclass(frozen=True)
class FinetuneConfig:
    """Start from pretrained weights, optionally with some parts frozen (``mammogmic train --init``).

    Attributes:
        init: checkpoint to start from: an official release ``.p`` file (``sample_model_1.p``), a mammogmic
            ``.safetensors`` model or a training checkpoint (``best.pt``). Loaded strictly: every tensor of the
            model must be in the file with the same shape, and the file may hold nothing else, except names
            matched by ``init_exclude``. Empty = train from scratch. Read only on a fresh start, not on resume.
        init_exclude: patterns of our parameter/buffer names (``fusion.weight``) that keep their fresh
            initialisation instead of the file's values: a glob (``fnmatch``; a module name such as ``fusion``
            or ``global_net.stem_conv`` matches everything under it) or ``re:REGEX`` (searched anywhere in the
            name). Matching names need not be in the file nor have its shape (a new head, another stem).
        percent_t: t of the checkpoint's model, which official ``.p`` files do not record (released models:
            0.02, 0.03, 0.03, 0.05, 0.10). It is the model's top-t% pooling t, so it sets ``model.percent_t``
            when the model section does not set it, and must equal it otherwise (``--percent-t`` sets both).
        freeze: parts whose parameters get ``requires_grad=False`` and that stay in eval mode while training
            (their batch-norm running statistics do not move): ``global``, ``saliency``, ``local``,
            ``attention``, ``local_classifier``, ``fusion``. ``model.freeze`` in YAML or ``--set`` is an alias.
    """

    init: str = ""
    init_exclude: tuple[str, ...] = ()
    percent_t: float | None = None
    freeze: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for i, pattern in enumerate(self.init_exclude):
            if not pattern or pattern == "re:":
                raise _fail(f"init_exclude[{i}]", "empty pattern")
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    message = f"invalid regular expression {pattern[3:]!r}: {exc}"
                    raise _fail(f"init_exclude[{i}]", message) from None
        if self.init_exclude and not self.init:
            raise _fail("init_exclude", "only used with finetune.init (the checkpoint to start from)")
        if self.percent_t is not None:
            if not (math.isfinite(self.percent_t) and 0.0 < self.percent_t <= 1.0):
                raise _fail("percent_t", f"must be in (0, 1], got {self.percent_t!r}")
            if not self.init:
                raise _fail(
                    "percent_t", "only used with finetune.init; without a checkpoint set model.percent_t"
                )
        _check_parts("freeze", self.freeze)


def _check_parts(path: str, parts: Iterable[str]) -> None:
    for i, part in enumerate(parts):
        if part not in FREEZE_PARTS:
            close = difflib.get_close_matches(str(part), list(FREEZE_PARTS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _fail(f"{path}[{i}]", f"unknown part {part!r}{hint} (valid: {', '.join(FREEZE_PARTS)})")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise _fail(name, f"must be > 0, got {value!r}")


def _check_nonneg(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise _fail(name, f"must be >= 0, got {value!r}")


#: ``model.type`` of a training config -> what it trains (GMIC, DMV-CNN view-wise, the patch classifier).
MODEL_TYPES = ("gmic", "dmv", "patch")


def _model_config_cls(kind: str = "gmic") -> type:
    from mammogmic.models import DMVConfig, GMICConfig, PatchConfig

    return {"gmic": GMICConfig, "dmv": DMVConfig, "patch": PatchConfig}[kind]


def model_type(model: Any) -> str:
    """``gmic``, ``dmv`` or ``patch``: the ``model.type`` of a model config object."""
    from mammogmic.models import DMVConfig, PatchConfig

    if isinstance(model, DMVConfig):
        return "dmv"
    if isinstance(model, PatchConfig):
        return "patch"
    return "gmic"


@dataclass(frozen=True)
class PatchesConfig:
    """How the patch classifier's training patches are drawn (``model.type: patch``) and the heat-map grid
    its model file records for ``mammogmic heatmaps``.

    Each image gives, per epoch, ``per_class`` patches of each class it has: centred on a malignant-mask pixel
    (class 0), a benign-mask pixel (class 1), breast tissue at least ``size / 2`` pixels from any lesion
    (class 2) and background outside the breast (class 3). Patches are cut from the whole cropped image,
    oriented and standardised as ``mammogmic heatmaps`` cuts them.

    Attributes:
        size: patch side in pixels (256: the released classifier's; scale it with smaller images).
        stride: heat-map stride stored in the model file (``mammogmic heatmaps`` default; 70 for 256).
        per_class: patches of each class drawn per image and epoch.
    """

    size: int = 256
    stride: int = 70
    per_class: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 16:
            raise _fail("size", f"must be an integer >= 16, got {self.size!r}")
        _check_positive("stride", self.stride)
        _check_positive("per_class", self.per_class)


def _loss_config_cls() -> type:
    from mammogmic.training.loss import LossConfig

    return LossConfig


@dataclass(frozen=True)
class TrainConfig:
    """The whole training configuration (see the module docstring for the layering rules).

    Attributes:
        model: the GMIC architecture (:class:`mammogmic.GMICConfig`).
        loss: the Eq. 13 loss settings (:class:`mammogmic.training.loss.LossConfig`).
        optim: optimizer and learning-rate schedule.
        data: manifest, input size, labels, sampling, augmentation.
        schedule: epochs, early stopping, checkpoint and logging frequency.
        runtime: device, mixed precision, accumulation, memory options, workers, seeding.
        finetune: pretrained weights to start from, re-initialised tensors, frozen parts.
        patches: the patch classifier's training patches (``model.type: patch`` only).

    ``model.type`` picks what is trained: ``gmic`` (the default; :class:`~mammogmic.GMICConfig`), ``dmv``
    (DMV-CNN view-wise, :class:`~mammogmic.models.DMVConfig`: four-view exams, breast labels, NLL of the
    heads' log-softmax) or ``patch`` (DMV-CNN's patch classifier, :class:`~mammogmic.models.PatchConfig`).
    DMV-CNN's windows follow ``data.out_shape`` (:func:`mammogmic.data.sample.dmv_contracts`). The ``loss``
    and ``finetune`` sections are GMIC's; ``to_dict`` writes ``type`` only for the other two.
    """

    model: Any = field(default_factory=lambda: _model_config_cls()())
    loss: Any = field(default_factory=lambda: _loss_config_cls()())
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    patches: PatchesConfig = field(default_factory=PatchesConfig)

    @property
    def model_type(self) -> str:
        """``gmic``, ``dmv`` or ``patch`` (``model.type``)."""
        return model_type(self.model)

    def __post_init__(self) -> None:
        kind = self.model_type
        if kind != "gmic":
            if self.finetune != FinetuneConfig():
                raise _fail("finetune", f"fine-tuning options are for GMIC, not model.type {kind}")
            if self.schedule.val_metric.endswith("_dice") or self.schedule.keep_best_dice:
                raise _fail(
                    "schedule.val_metric", f"saliency Dice is GMIC's; model.type {kind} has no saliency"
                )
            if self.data.tta != 1:
                raise _fail(
                    "data.tta", f"test-time windows are GMIC's in training; model.type {kind} needs 1"
                )
        if kind == "dmv" and self.model.head != "view":
            raise _fail("model.head", "training takes the view-wise DMV-CNN (head: view)")
        if kind == "patch" and self.model.num_classes != 4:
            raise _fail(
                "model.num_classes",
                "the patch classifier's classes are 4 (malignant, benign, tissue, background)",
            )
        t = self.finetune.percent_t
        model_t = getattr(self.model, "percent_t", None)
        if t is not None and model_t is not None and not math.isclose(t, model_t, rel_tol=0.0, abs_tol=1e-12):
            raise _fail(
                "finetune.percent_t",
                f"{t} differs from model.percent_t {model_t}; both are the t of top-t% pooling (--percent-t "
                "sets both)",
            )
        for key in ("amp", "eval_amp"):
            if getattr(self.runtime, key) == "fp16" and self.runtime.device == "cpu":
                raise _fail(f"runtime.{key}", "fp16 autocast needs a GPU; use bf16 or none on CPU")
        if self.schedule.t_warmup_epochs > 0 and getattr(self.model, "aggregation", None) != "top_t":
            raise _fail(
                "schedule.t_warmup_epochs", "warms up top-t% pooling; it needs a GMIC with aggregation top_t"
            )
        h, w = self.data.out_shape
        crop = getattr(self.model, "crop_size", None)
        if crop is not None and (crop[0] > h or crop[1] > w):
            raise _fail("model.crop_size", f"{tuple(crop)} is larger than data.out_shape {(h, w)}")

    # -- conversion -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (YAML/JSON-safe) nested dict of every field (``runtime.num_workers`` as requested)."""
        runtime = _plain(self.runtime)
        runtime["num_workers"] = self.runtime.requested_workers
        model = _plain(self.model.to_dict() if hasattr(self.model, "to_dict") else self.model)
        if self.model_type != "gmic":
            model = {"type": self.model_type, **model}
        out = {
            "model": model,
            "loss": _plain(self.loss),
            "optim": _plain(self.optim),
            "data": _plain(self.data),
            "schedule": _plain(self.schedule),
            "runtime": runtime,
            "finetune": _plain(self.finetune),
        }
        if self.patches != PatchesConfig():
            out["patches"] = _plain(self.patches)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build and validate from a nested mapping; missing fields take their defaults.

        ``model.freeze`` is accepted as an alias of ``finetune.freeze``; ``finetune.percent_t`` fills in a
        missing ``model.percent_t``.

        Raises:
            ConfigError: an unknown key or an invalid value; the message names the dotted field.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be a mapping of sections, got {type(data).__name__}")
        data = _resolve_finetune_aliases(data)
        sections = {"model", "loss", "optim", "data", "schedule", "runtime", "finetune", "patches"}
        for key in data:
            if key not in sections:
                raise _unknown_key("", str(key), sections)
        kwargs: dict[str, Any] = {}
        if "model" in data:
            model = data["model"]
            kind = "gmic"
            if isinstance(model, Mapping) and "type" in model:
                model = dict(model)
                kind = model.pop("type")
                if kind not in MODEL_TYPES:
                    raise _fail("model.type", f"must be one of {', '.join(MODEL_TYPES)}, got {kind!r}")
            kwargs["model"] = _build_foreign(_model_config_cls(kind), model, "model")
        if "loss" in data:
            kwargs["loss"] = _build_foreign(_loss_config_cls(), data["loss"], "loss")
        for name, sub_cls in (
            ("optim", OptimConfig),
            ("data", DataConfig),
            ("schedule", ScheduleConfig),
            ("runtime", RuntimeConfig),
            ("finetune", FinetuneConfig),
            ("patches", PatchesConfig),
        ):
            if name in data:
                kwargs[name] = _build_dataclass(sub_cls, data[name], name)
        try:
            return cls(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
            raise ConfigError(str(exc)) from exc

    def replace(self, **overrides: Any) -> TrainConfig:
        """Apply dotted overrides (``{"optim.lr": 1e-4}``) and re-validate."""
        return TrainConfig.from_dict(apply_overrides(self.to_dict(), overrides))

    def to_yaml(self) -> str:
        """The resolved config as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        """Write the resolved config as YAML (atomically) and return the path.

        A relative ``data.manifest`` (possible in a config built in Python) is written as the absolute path it
        means here, relative to the working folder: the file must not change meaning when read from its own
        folder.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        for key in ("manifest", "heatmaps_dir"):
            data["data"][key] = _absolute_path(data["data"][key], Path.cwd())
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        os.replace(tmp, path)
        return path


def _move_freeze_alias(data: Mapping[str, Any]) -> dict[str, Any]:
    """Move ``model.freeze`` (the spelling of issue 9) to ``finetune.freeze``; a bare string is one part.

    Returns a shallow copy of ``data`` with copied ``model``/``finetune`` sections; the input is not changed.
    """
    out = dict(data)
    model, finetune = out.get("model"), out.get("finetune")
    if isinstance(finetune, Mapping):
        finetune = out["finetune"] = dict(finetune)
        if isinstance(finetune.get("freeze"), str):  # --set finetune.freeze=global
            finetune["freeze"] = [finetune["freeze"]]
    if not (isinstance(model, Mapping) and "freeze" in model):
        return out
    model = out["model"] = dict(model)
    parts = _alias_parts(model.pop("freeze"))
    if finetune is None:
        finetune = out["finetune"] = {}
    if not isinstance(finetune, dict):
        raise _fail("finetune", f"must be a mapping, got {type(finetune).__name__}")
    given = finetune.get("freeze")
    if given and list(given) != parts:
        raise _fail(
            "model.freeze",
            f"alias of finetune.freeze, which is set to a different value ({list(given)} vs {parts})",
        )
    finetune["freeze"] = parts
    return out


def _alias_parts(value: Any) -> list[str]:
    parts = [value] if isinstance(value, str) else value
    if not isinstance(parts, list | tuple) or not all(isinstance(p, str) for p in parts):
        raise _fail("model.freeze", f"must be a list of part names, got {value!r}")
    _check_parts("model.freeze", parts)
    return list(parts)


def _resolve_finetune_aliases(data: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`_move_freeze_alias`, then copy ``finetune.percent_t`` into a missing ``model.percent_t``."""
    out = _move_freeze_alias(data)
    finetune, model = out.get("finetune"), out.get("model")
    if isinstance(finetune, Mapping) and finetune.get("percent_t") is not None:
        if model is None:
            model = {}
        if isinstance(model, Mapping) and "percent_t" not in model:
            out["model"] = {**model, "percent_t": finetune["percent_t"]}
    return out


# -- generic dataclass building with dotted error paths --------------------------------------------------
def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _unknown_key(prefix: str, key: str, valid: Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    where = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}: unknown field{hint} (valid: {', '.join(valid)})")


def _build_foreign(cls: type, value: Any, prefix: str) -> Any:
    """Build another module's config class; prefix its error messages with our section name."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise _fail(prefix, f"must be a mapping, got {type(value).__name__}")
    if dataclasses.is_dataclass(cls):
        names = {f.name for f in dataclasses.fields(cls)}
        for key in value:
            if key not in names:
                raise _unknown_key(prefix, str(key), names)
    try:
        if dataclasses.is_dataclass(cls):
            return _build_dataclass(cls, value, prefix)
        return cls.from_dict(dict(value))  # type: ignore[attr-defined]
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(prefix + ".") else f"{prefix}.{msg}") from exc


def _build_dataclass(cls: type, value: Any, prefix: str) -> Any:
    if not isinstance(value, Mapping):
        raise _fail(prefix, f"must be a mapping, got {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, raw in value.items():
        if key not in fields:
            raise _unknown_key(prefix, str(key), fields)
        kwargs[key] = _coerce(raw, hints[key], f"{prefix}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(prefix + ".") else f"{prefix}.{msg}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix}: {exc}") from exc


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check/convert one YAML value against a type annotation; raise ConfigError naming ``path``."""
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise _fail(path, f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _fail(path, "must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _fail(path, f"must be a list of {len(args)} values, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _fail(path, f"must have {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(path, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise _fail(path, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            raise _fail(path, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(path, f"must be a string, got {value!r}")
        return value
    return value


# -- YAML + overrides ------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value`` (the value is read as YAML: ``1e-4``, ``true``, ``[512, 320]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY.SUB=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from exc
    return key, value


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with dotted overrides applied (strings are parsed by parse_override).

    ``model.freeze`` is written to ``finetune.freeze`` (its alias; see :class:`FinetuneConfig`).
    """
    import copy

    out: dict[str, Any] = copy.deepcopy(dict(data))
    items = (
        list(overrides.items()) if isinstance(overrides, Mapping) else [parse_override(s) for s in overrides]
    )
    # The alias is resolved before overriding, so that an override of either spelling wins over the file.
    out = _move_freeze_alias(out)
    items = [("finetune.freeze", _alias_parts(v)) if k == "model.freeze" else (k, v) for k, v in items]
    for key, value in items:
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key}")
            node = nxt
        node[parts[-1]] = value
    return out


def preset_path(name: str) -> Path:
    """Path of a packaged preset (``gmic_resnet18``, ``tiny_cpu``...)."""
    stem = name[:-5] if name.endswith(".yaml") else name
    path = PRESET_DIR / f"{stem}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r} (available: {', '.join(list_presets())})")
    return path


def list_presets() -> list[str]:
    """Names of the packaged presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(
    source: str | Path | Mapping[str, Any] | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()
) -> TrainConfig:
    """Load a config from a YAML path, a preset name or a mapping, then apply overrides.

    The returned ``data.manifest`` is absolute: a relative one in a YAML file is resolved against that file's
    folder, one from ``overrides`` or a mapping against the working folder.

    Args:
        source: YAML file path, packaged preset name (``tiny_cpu``), mapping, or ``None`` for the defaults.
        overrides: ``["optim.lr=1e-4", ...]`` strings or a ``{"optim.lr": 1e-4}`` mapping.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown field or invalid value (the message names the field).
    """
    base_dir: Path | None = None
    data: Any
    if source is None:
        data = {}
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file() and not path.suffix:
            path = preset_path(str(source))
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read YAML: {exc}") from exc
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        base_dir = path.parent
    data = _with_absolute_paths(data, base_dir or Path.cwd())
    # Overrides come from the command line: a relative manifest there is relative to the working folder.
    data = _with_absolute_paths(apply_overrides(data, overrides), Path.cwd())
    return TrainConfig.from_dict(data)


def _absolute_path(value: Any, base_dir: Path) -> Any:
    """``value`` resolved against ``base_dir`` if it is a non-empty relative path string, else unchanged."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def _with_absolute_paths(data: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """``data.manifest``, ``data.heatmaps_dir`` and ``finetune.init`` made absolute against ``base_dir`` (the
    paths a config holds)."""
    out = dict(data)
    for name, key in (("data", "manifest"), ("data", "heatmaps_dir"), ("finetune", "init")):
        section = out.get(name)
        if isinstance(section, Mapping) and key in section:
            out[name] = {**section, key: _absolute_path(section[key], base_dir)}
    return out
