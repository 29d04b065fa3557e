"""Typed, validated model configurations."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mammogmic.errors import ConfigError

GLOBAL_ARCHS = ("resnet22", "resnet18", "resnet10")
LOCAL_ARCHS = ("resnet18", "resnet34", "resnet50")
AGGREGATIONS = ("top_t", "gap", "gmp")
PATCH_SELECTIONS = ("saliency", "random")
ATTENTIONS = ("gated", "uniform")
PREDICTIONS = ("fusion", "global", "local", "average")
OVERLAPS = ("forbid", "official")
ALIGNMENTS = ("official", "centered")
#: The mirrorings of the input whose saliency maps each ``saliency_symmetry`` combines with the input's own
#: (the tensor dims flipped: -2 the rows, -1 the columns, both a 180-degree turn; GMICConfig's docstring).
REFLECTIONS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": (),
    "point": ((-2, -1),),
    "point_at_inference": ((-2, -1),),
    "flips_at_inference": ((-1,), (-2,), (-2, -1)),
}
SYMMETRIES = tuple(REFLECTIONS)
SALIENCY_GRIDS = ("native", "fine_at_inference")
#: GMICConfig fields that add no parameters and change how a trained model reads its saliency maps, so the same
#: weights can be scored with another value (scripts/saliency_offsets.py, scripts/ablation_reread.py).
INFERENCE_SETTINGS = ("saliency_symmetry", "saliency_grid")


def check_inference_settings(settings: Mapping[str, Any]) -> None:
    """Refuse any key of ``settings`` that is not one of :data:`INFERENCE_SETTINGS` (values are checked when a
    config is built with them)."""
    unknown = sorted(set(settings) - set(INFERENCE_SETTINGS))
    if unknown:
        raise ConfigError(
            f"{', '.join(unknown)} would change what the model computes, not only how it reads its maps; "
            f"expected some of {', '.join(INFERENCE_SETTINGS)}"
        )


FUSION_POOLINGS = ("max", "top_t")
SALIENCY_HEADS = ("own", "fusion")


#: Upper bounds of the size fields. Far above every published or tuned setting (paper: widths 16 and 64,
#: K=6 patches of 256x256, attention 128); they refuse absurd values early, e.g. from an untrusted model file's
#: metadata. (Whether a file's weights fit its config is checked separately, against the file's tensors.)
MAX_GLOBAL_WIDTH = 128
MAX_LOCAL_WIDTH = 512
MAX_ATTENTION_DIM = 4096
MAX_NUM_CLASSES = 64
MAX_NUM_PATCHES = 64
MAX_CROP_SIDE = 4096
#: K patches together may cover at most the area of the official 2944x1920 input (the paper's K=6 x 256x256
#: covers 7% of it): the local network's memory grows with this area, and nothing in the weights bounds it.
MAX_PATCH_AREA = 2944 * 1920
MAX_BASELINE_IN_CHANNELS = 16
MAX_BASELINE_WIDTH = 512


def _show(value: object) -> str:
    """``repr`` of a value, cut short: values can come from untrusted files."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _choice(name: str, value: object, options: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in options:
        raise ConfigError(f"{name}: {_show(value)} is not one of {', '.join(map(repr, options))}")


def _positive_int(name: str, value: object, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ConfigError(f"{name}: expected an integer from 1 to {maximum}, got {_show(value)}")


def _from_dict(cls: Any, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - names))
    if unknown:
        shown = ", ".join(name[:60] for name in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise ConfigError(f"{where}: unknown field(s) {shown}; valid fields: {', '.join(sorted(names))}")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
    return cls(**kwargs)


@dataclass(frozen=True)
class GMICConfig:
    """Architecture of a GMIC model. The defaults are the released GMIC-ResNet-18 (model 1).

    Attributes:
        in_channels: 1 (image) or 3 (image + benign and malignant heat maps).
        global_arch: ``"resnet22"`` (paper, pre-activation), ``"resnet18"`` (v1 blocks, the official
            ``use_v1_global`` option) or ``"resnet10"`` (v1, one block per stage: a smaller receptive field for
            reduced-size inputs, see docs/localization.md; no official equivalent).
        global_width: filters of the global network's first stage (16 in the paper).
        global_stride: ``None`` (the architecture's own: 64 for ResNet-22, 32 for the v1 nets) or ``16`` for a
            v1 global network whose last stage keeps the resolution of the one before: the same parameters, a
            saliency grid twice as fine in each direction, for reduced inputs (tried on the demo; docs/localization.md).
        local_arch: local network ``f_l``: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        local_width: channels of the local network's first layer (64 in the paper); the patch feature width is
            ``8 * local_width`` (ResNet-18/34) or ``32 * local_width`` (ResNet-50).
        num_classes: saliency maps / outputs (2: benign, malignant).
        aggregation: ``"top_t"`` (top-t% pooling), ``"gap"`` or ``"gmp"`` (its two special cases).
        percent_t: t of top-t% pooling (released models: 0.02, 0.03, 0.03, 0.05, 0.10).
        num_patches: K, patches retrieved per image.
        crop_size: ``(height, width)`` of each patch in input pixels.
        patch_selection: ``"saliency"`` (retrieve_roi) or ``"random"`` (ablation).
        patch_overlap: ``"forbid"`` or ``"official"``; see :func:`mammogmic.models.roi.greedy_windows`.
        patch_alignment: where a patch is cut for the chosen window of saliency cells: ``"official"`` (the
            released models: upper-left pixel = stride × upper-left cell, so the patch lies half a cell below and
            right of the cells it was chosen for) or ``"centered"`` (the patch centred on those cells'
            receptive-field centres; see :func:`mammogmic.models.roi.grid_to_pixels`).
        saliency_symmetry: ``"none"`` (the paper) or ``"point"``: the saliency maps are the mean of the global
            network's maps on the input and on the input rotated by 180 degrees about a cell centre (rotated
            back), so a map that lies to one side of a lesion is halved and mirrored to the other side, and only
            a map centred on the lesion keeps its full height (docs/localization.md). Costs a second global pass.
            ``"point_at_inference"``: in eval mode only (a test-time augmentation; training sees the paper's
            maps), the *geometric* mean of the two maps, so a cell stays high only where both orientations mark
            it: a map leaning to one side of a lesion keeps the lesion's cell, and a mark the network makes on
            the turned image alone (a breast lying the way no training image did, e.g. along its skin line)
            vanishes, where the plain mean would keep half of it. Validation, prediction and the figures read it.
            ``"flips_at_inference"``: the same with four orientations: the geometric mean of the maps of the
            input, of its left-right and top-bottom mirror images and of its 180-degree turn (each about cell
            centres, mapped back): a map leaning any way from a lesion keeps the lesion's cell. Costs three
            more global passes in eval mode.
        saliency_grid: ``"native"`` (the paper: one cell per stride of the global network) or
            ``"fine_at_inference"``: in eval mode only, the global network's last stage reads every cell of its
            input grid instead of every other (:func:`mammogmic.models.resnet.finer_stage`), so the maps, ``h_g``
            and the patch windows lie on a grid of half the stride: the network's own cells at even indices, its
            maps of the input shifted by half a cell in between (shift-and-stitch). The argmax peak can then
            fall between two of the network's cells. Training is unchanged; with ``saliency_symmetry`` the
            mirrorings are about the finer grid's cell centres. Needs a global network whose last stage strides
            (not ``global_stride: 16``).
        attention: ``"gated"`` attention MIL or ``"uniform"`` weights (ablation).
        attention_dim: M, hidden size of the gated attention.
        prediction: which head is the model's prediction: ``"fusion"`` (paper), ``"global"``, ``"local"`` or
            ``"average"`` of global and local.
        fusion_pooling: how the fusion head pools the global features ``h_g`` over the cells: ``"max"`` (the
            paper and the released models) or ``"top_t"``: each channel's mean over its ``t·h·w`` highest cells
            (:func:`mammogmic.models.roi.top_t_pool` with ``percent_t``), so that the fusion head's gradient
            reaches every cell that sees a lesion, not only each channel's argmax (docs/localization.md).
        saliency_head: ``"own"`` (the paper: a 1x1 convolution of its own on ``h_g``) or ``"fusion"``: the
            saliency maps are the fusion head's class-activation maps, its weights for the global features
            applied to each cell's features (a 1x1 convolution sharing the fusion layer's weights; no parameters
            of its own). The maps then show, cell by cell, the evidence the fusion head reads from ``h_g``, and
            the fusion loss trains them from the first step: with a head of its own, the fusion head can learn
            from ``h_g`` while the maps stay dark (docs/localization.md, "The fusion head's own maps").

    Every field is type- and range-checked on construction (the ``MAX_*`` bounds of this module), so a config
    read from an untrusted file is refused with the field named before anything is built from it.
    """

    in_channels: int = 1
    global_arch: str = "resnet22"
    global_width: int = 16
    global_stride: int | None = None
    local_arch: str = "resnet18"
    local_width: int = 64
    num_classes: int = 2
    aggregation: str = "top_t"
    percent_t: float = 0.02
    num_patches: int = 6
    crop_size: tuple[int, int] = (256, 256)
    patch_selection: str = "saliency"
    patch_overlap: str = "forbid"
    patch_alignment: str = "official"
    saliency_symmetry: str = "none"
    saliency_grid: str = "native"
    attention: str = "gated"
    attention_dim: int = 128
    prediction: str = "fusion"
    fusion_pooling: str = "max"
    saliency_head: str = "own"

    def __post_init__(self) -> None:
        c = self.in_channels
        if isinstance(c, bool) or not isinstance(c, int) or c not in (1, 3):
            raise ConfigError(f"in_channels: expected 1 or 3, got {_show(self.in_channels)}")
        _choice("global_arch", self.global_arch, GLOBAL_ARCHS)
        _choice("local_arch", self.local_arch, LOCAL_ARCHS)
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        _choice("patch_selection", self.patch_selection, PATCH_SELECTIONS)
        _choice("patch_overlap", self.patch_overlap, OVERLAPS)
        _choice("patch_alignment", self.patch_alignment, ALIGNMENTS)
        _choice("saliency_symmetry", self.saliency_symmetry, SYMMETRIES)
        _choice("saliency_grid", self.saliency_grid, SALIENCY_GRIDS)
        _choice("attention", self.attention, ATTENTIONS)
        _choice("prediction", self.prediction, PREDICTIONS)
        _choice("fusion_pooling", self.fusion_pooling, FUSION_POOLINGS)
        _choice("saliency_head", self.saliency_head, SALIENCY_HEADS)
        _positive_int("global_width", self.global_width, MAX_GLOBAL_WIDTH)
        stride = self.global_stride
        if stride is not None and (
            isinstance(stride, bool) or stride != 16 or self.global_arch == "resnet22"
        ):
            raise ConfigError(
                f"global_stride: expected null (the architecture's own) or 16 for a v1 global network "
                f"(resnet18, resnet10), got {_show(stride)} with global_arch {self.global_arch!r}"
            )
        if stride is not None and self.saliency_grid != "native":
            raise ConfigError(
                f"saliency_grid: {self.saliency_grid} halves the last stage's stride, and global_stride 16 "
                "has already removed it; use one of them"
            )
        _positive_int("local_width", self.local_width, MAX_LOCAL_WIDTH)
        _positive_int("num_classes", self.num_classes, MAX_NUM_CLASSES)
        _positive_int("num_patches", self.num_patches, MAX_NUM_PATCHES)
        _positive_int("attention_dim", self.attention_dim, MAX_ATTENTION_DIM)
        t = self.percent_t
        # `not 0 < t <= 1` also refuses NaN.
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
            raise ConfigError(f"percent_t: expected a number in (0, 1], got {_show(t)}")
        crop = self.crop_size
        if not isinstance(crop, (tuple, list)) or len(crop) != 2:
            raise ConfigError(f"crop_size: expected (height, width), got {_show(crop)}")
        for value in crop:
            _positive_int("crop_size", value, MAX_CROP_SIDE)
        if self.num_patches * crop[0] * crop[1] > MAX_PATCH_AREA:
            raise ConfigError(
                f"num_patches x crop_size: {self.num_patches} patches of {crop[0]}x{crop[1]} cover more than "
                f"{MAX_PATCH_AREA} pixels (the area of a 2944x1920 input)"
            )
        object.__setattr__(self, "crop_size", tuple(crop))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["crop_size"] = list(self.crop_size)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GMICConfig:
        return _from_dict(cls, data, "GMICConfig")

    def replace(self, **changes: Any) -> GMICConfig:
        return dataclasses.replace(self, **changes)

    @property
    def feature_dim(self) -> int:
        """Width of a patch feature vector h~_k."""
        return self.local_width * (32 if self.local_arch == "resnet50" else 8)

    @property
    def global_dim(self) -> int:
        """Channels of ``h_g``."""
        return self.global_width * (16 if self.global_arch == "resnet22" else 8)


@dataclass(frozen=True)
class BaselineConfig:
    """The paper's ResNet-34 baseline: a ResNet on the full-resolution image, global pooling, sigmoid outputs.

    Attributes:
        arch: ``"resnet34"`` (paper), ``"resnet18"`` or ``"resnet50"``.
        in_channels: input channels.
        width: channels of the first layer (64 standard).
        num_classes: outputs (2: benign, malignant).
        pooling: ``"gap"`` (average) or ``"gmp"`` (max) over the last feature map.
    """

    arch: str = "resnet34"
    in_channels: int = 1
    width: int = 64
    num_classes: int = 2
    pooling: str = "gap"

    def __post_init__(self) -> None:
        _choice("arch", self.arch, LOCAL_ARCHS)
        _choice("pooling", self.pooling, ("gap", "gmp"))
        _positive_int("in_channels", self.in_channels, MAX_BASELINE_IN_CHANNELS)
        _positive_int("width", self.width, MAX_BASELINE_WIDTH)
        _positive_int("num_classes", self.num_classes, MAX_NUM_CLASSES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaselineConfig:
        return _from_dict(cls, data, "BaselineConfig")
