"""DMV-CNN (Wu et al. 2019, the NYU breast cancer classifier): the comparison model of the GMIC paper.

Four views of one exam go through two ResNet-22 columns, one per view angle, shared by the left and right
breast (:class:`ResNet22` with DMV-CNN's unpadded 7x7/2 stem); each column ends in BN + ReLU and a spatial mean:
256 features per view. Two heads:

* **view-wise** (``head="view"``): per view angle, ``concat(L, R)`` (512) -> FC 512 -> ReLU -> FC 8 ->
  ``(4, 2)`` log-softmax, rows :data:`DMV_LABELS` (left-benign, right-benign, left-malignant,
  right-malignant). A label's probability is ``exp`` of column 1, averaged over the CC and MLO heads.
* **image-wise** (``head="image"``): per view, its 256 features -> FC 256 -> ReLU -> FC 8 -> ``(4, 2)``
  log-softmax of which the first two rows (benign, malignant) are used, as the official single-image path
  does; a breast's probability is the mean over its CC and MLO views. :meth:`DMVModel.forward_single` runs
  one image of a given view.

Inputs have 1 channel (the standardised image) or 3 (image, benign heat map, malignant heat map). Shapes for
the official windows::

    x["L-CC"], x["R-CC"]      (N, C, 2677, 1942)
    x["L-MLO"], x["R-MLO"]    (N, C, 2974, 1748)
    features per view         (N, 256)            column + spatial mean
    log_probs["CC"|"MLO"]     (N, 4, 2)           view-wise
    log_probs["L-CC"|...]     (N, 2, 2)           image-wise (rows benign, malignant)
    predictions               (N, 4)              DMV_LABELS order

The official key names (``four_view_resnet.{cc,mlo,l_cc,r_cc,l_mlo,r_mlo}.*``, ``fc1_*``,
``output_layer_*.fc_layer.*``) map to ours with :func:`official_dmv_to_ours`; the ``l_*``/``r_*`` copies of a
shared column must equal it (:func:`dmv_state_from_official`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mammogmic.errors import CheckpointError, ConfigError
from mammogmic.models._keys import rename_key
from mammogmic.models.resnet import ResNet22

__all__ = [
    "DMV_HEADS",
    "DMV_LABELS",
    "DMV_VIEWS",
    "DMVConfig",
    "DMVModel",
    "DMVOutput",
    "dmv_state_from_official",
    "official_dmv_to_ours",
    "ours_to_official_dmv",
]

DMV_VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")
DMV_LABELS = ("left_benign", "right_benign", "left_malignant", "right_malignant")
DMV_HEADS = ("view", "image")
_ANGLES = ("CC", "MLO")


def _angle(view: str) -> str:
    if view not in DMV_VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {', '.join(DMV_VIEWS)}")
    return view.split("-")[1]


def _head_key(view: str) -> str:
    """``"L-CC"`` -> ``"lcc"`` (the official image-wise head suffix)."""
    return view.replace("-", "").lower()


@dataclass(frozen=True)
class DMVConfig:
    """Architecture of a DMV-CNN model; the defaults are the released view-wise image-only model.

    Attributes:
        head: ``"view"`` (view-wise: one head per view angle over both breasts) or ``"image"`` (image-wise:
            one head per view).
        in_channels: 1 (image) or 3 (image, benign heat map, malignant heat map).
        width: filters of each column's stem and first stage (16); doubles over the five stages.
        noise_std: standard deviation of the Gaussian noise added to the inputs in training mode (0.01).
    """

    head: str = "view"
    in_channels: int = 1
    width: int = 16
    noise_std: float = 0.01

    def __post_init__(self) -> None:
        if self.head not in DMV_HEADS:
            raise ConfigError(
                f"DMVConfig.head: {self.head!r} is not one of {', '.join(map(repr, DMV_HEADS))}"
            )
        if self.in_channels not in (1, 3):
            raise ConfigError(f"DMVConfig.in_channels: expected 1 or 3, got {self.in_channels!r}")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ConfigError(f"DMVConfig.width: expected a positive integer, got {self.width!r}")
        if (
            isinstance(self.noise_std, bool)
            or not isinstance(self.noise_std, (int, float))
            or self.noise_std < 0
        ):
            raise ConfigError(f"DMVConfig.noise_std: expected a number >= 0, got {self.noise_std!r}")

    @property
    def feature_dim(self) -> int:
        """Features per view (256 for width 16)."""
        return self.width * 16

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DMVConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"DMVConfig: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
            )
        return cls(**data)


@dataclass
class DMVOutput:
    """One forward pass: per-head log-probabilities and the four label probabilities.

    Attributes:
        log_probs: view-wise: ``{"CC": (N, 4, 2), "MLO": (N, 4, 2)}`` with rows :data:`DMV_LABELS`;
            image-wise: ``{"L-CC": (N, 2, 2), ...}`` with rows (benign, malignant). Column 1 is "present".
        predictions: ``(N, 4)`` probabilities in :data:`DMV_LABELS` order.
    """

    log_probs: dict[str, torch.Tensor]
    predictions: torch.Tensor


class DMVModel(nn.Module):
    """DMV-CNN, view-wise or image-wise (:class:`DMVConfig`)."""

    def __init__(self, config: DMVConfig | None = None) -> None:
        super().__init__()
        cfg = config or DMVConfig()
        self.config = cfg
        self.columns = nn.ModuleDict(
            {a.lower(): ResNet22(cfg.in_channels, cfg.width, stem_padding=0) for a in _ANGLES}
        )
        dim = cfg.feature_dim
        if cfg.head == "view":
            keys, fc_in = [a.lower() for a in _ANGLES], 2 * dim
        else:
            keys, fc_in = [_head_key(v) for v in DMV_VIEWS], dim
        self.fc1 = nn.ModuleDict({k: nn.Linear(fc_in, fc_in) for k in keys})
        self.output = nn.ModuleDict({k: nn.Linear(fc_in, 8) for k in keys})

    def features(self, x: torch.Tensor, view: str) -> torch.Tensor:
        """``(N, feature_dim)``: the view angle's column, then the spatial mean."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"{view}: expected input (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if self.training and self.config.noise_std > 0:
            x = x + self.config.noise_std * torch.randn_like(x)
        return self.columns[_angle(view).lower()](x).mean(dim=(2, 3))

    def _head(self, key: str, h: torch.Tensor) -> torch.Tensor:
        logits = self.output[key](F.relu(self.fc1[key](h)))
        return F.log_softmax(logits.view(-1, 4, 2), dim=-1)  # (N, 4, 2)

    def forward(self, x: Mapping[str, torch.Tensor]) -> DMVOutput:
        """Four views of each exam: ``x[view]`` is ``(N, C, H, W)`` for every view in :data:`DMV_VIEWS`."""
        missing = [v for v in DMV_VIEWS if v not in x]
        if missing:
            raise ValueError(f"DMV-CNN needs all four views; missing {', '.join(missing)}")
        h = {v: self.features(x[v], v) for v in DMV_VIEWS}
        log_probs: dict[str, torch.Tensor] = {}
        if self.config.head == "view":
            for angle in _ANGLES:
                both = torch.cat([h[f"L-{angle}"], h[f"R-{angle}"]], dim=1)  # (N, 2 * D)
                log_probs[angle] = self._head(angle.lower(), both)
            present = [log_probs[a][..., 1].exp() for a in _ANGLES]  # (N, 4) each
            return DMVOutput(log_probs, (present[0] + present[1]) / 2)
        for view in DMV_VIEWS:
            log_probs[view] = self._head(_head_key(view), h[view])[:, :2]
        side = {s: [log_probs[f"{s}-{a}"][..., 1].exp() for a in _ANGLES] for s in ("L", "R")}
        mean = {s: (p[0] + p[1]) / 2 for s, p in side.items()}  # (N, 2): benign, malignant
        predictions = torch.stack([mean["L"][:, 0], mean["R"][:, 0], mean["L"][:, 1], mean["R"][:, 1]], 1)
        return DMVOutput(log_probs, predictions)

    def forward_single(self, x: torch.Tensor, view: str) -> torch.Tensor:
        """Image-wise model on single images of ``view``: ``(N, 2, 2)`` log-probabilities, rows (benign,
        malignant); ``exp`` of column 1 is the probability."""
        if self.config.head != "image":
            raise ValueError(
                "single images need an image-wise DMV-CNN (the view-wise heads see both breasts)"
            )
        return self._head(_head_key(view), self.features(x, view))[:, :2]


# --------------------------------------------------------------------------------------------------
# Official key names

_COLUMN = r"^four_view_resnet\.(cc|mlo)\."
_OFFICIAL_TO_OURS: tuple[tuple[str, str], ...] = (
    (_COLUMN + r"first_conv\.", r"columns.\1.stem_conv."),
    (_COLUMN + r"layer_list\.(\d+)\.(\d+)\.downsample\.0\.", r"columns.\1.stages.\2.\3.downsample."),
    (_COLUMN + r"layer_list\.", r"columns.\1.stages."),
    (_COLUMN + r"final_bn\.", r"columns.\1.final_bn."),
    (r"^fc1_(cc|mlo|lcc|rcc|lmlo|rmlo)\.", r"fc1.\1."),
    (r"^output_layer_(cc|mlo|lcc|rcc|lmlo|rmlo)\.fc_layer\.", r"output.\1."),
)
_OURS_TO_OFFICIAL: tuple[tuple[str, str], ...] = (
    (r"^columns\.(cc|mlo)\.stem_conv\.", r"four_view_resnet.\1.first_conv."),
    (
        r"^columns\.(cc|mlo)\.stages\.(\d+)\.(\d+)\.downsample\.",
        r"four_view_resnet.\1.layer_list.\2.\3.downsample.0.",
    ),
    (r"^columns\.(cc|mlo)\.stages\.", r"four_view_resnet.\1.layer_list."),
    (r"^columns\.(cc|mlo)\.final_bn\.", r"four_view_resnet.\1.final_bn."),
    (r"^fc1\.(\w+)\.", r"fc1_\1."),
    (r"^output\.(\w+)\.", r"output_layer_\1.fc_layer."),
)
#: The official file repeats each shared column under the prefixes of the two views that use it.
_MIRRORS = {"l_cc": "cc", "r_cc": "cc", "l_mlo": "mlo", "r_mlo": "mlo"}
_MIRROR_KEY = re.compile(r"^four_view_resnet\.(l_cc|r_cc|l_mlo|r_mlo)\.(.+)$")


def official_dmv_to_ours(key: str) -> str | None:
    """Our parameter name for an official DMV-CNN key (``None``: a mirror copy or an unknown key)."""
    return rename_key(key, _OFFICIAL_TO_OURS)


def ours_to_official_dmv(key: str) -> str | None:
    """The official key of one of our DMV-CNN parameters."""
    return rename_key(key, _OURS_TO_OFFICIAL)


def dmv_state_from_official(
    official: Mapping[str, torch.Tensor], where: str
) -> tuple[dict[str, torch.Tensor], DMVConfig]:
    """Our state dict and the config (head, input channels) of an official DMV-CNN state dict.

    Checks that every key is known, that all six column prefixes are there and that each ``l_*``/``r_*`` copy
    equals its shared column (left and right share weights). Shapes are checked when the model loads them.

    Raises:
        CheckpointError: naming ``where`` and the offending keys.
    """
    state: dict[str, torch.Tensor] = {}
    unknown, mirrors = [], {}
    for key, value in official.items():
        match = _MIRROR_KEY.match(key)
        if match:
            mirrors[key] = (f"four_view_resnet.{_MIRRORS[match.group(1)]}.{match.group(2)}", value)
            continue
        ours = official_dmv_to_ours(key)
        if ours is None:
            unknown.append(key)
        else:
            state[ours] = value
    if unknown:
        raise CheckpointError(
            f"{where}: {len(unknown)} key(s) that belong to no DMV-CNN module: {', '.join(sorted(unknown)[:10])}"
        )
    prefixes = {"cc", "mlo", *_MIRRORS}
    present = {k.split(".")[1] for k in official if k.startswith("four_view_resnet.")}
    absent = sorted(prefixes - present)
    if absent:
        raise CheckpointError(
            f"{where}: not a DMV-CNN file: column(s) four_view_resnet.{{{','.join(absent)}}} missing "
            f"(the official files hold all six: cc, mlo, l_cc, r_cc, l_mlo, r_mlo)"
        )
    shared = {k for k in official if re.match(_COLUMN, k)}
    expected_mirrors = {
        k.replace(f".{a}.", f".{m}.", 1) for m, a in _MIRRORS.items() for k in shared if f".{a}." in k
    }
    lacking = sorted(expected_mirrors - set(mirrors))
    extra = sorted(set(mirrors) - expected_mirrors)
    differ = sorted(
        k
        for k, (base, value) in mirrors.items()
        if base in official
        and (official[base].shape != value.shape or not torch.equal(official[base], value))
    )
    if lacking or extra or differ:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for what, keys in (
                ("missing", lacking),
                ("unexpected", extra),
                ("differ from the shared column", differ),
            )
            if keys
        )
        raise CheckpointError(f"{where}: the left/right copies of the shared columns do not match ({detail})")
    heads = {k.split(".")[1] for k in state if k.startswith("fc1.")}
    if heads == {"cc", "mlo"}:
        head = "view"
    elif heads == {"lcc", "rcc", "lmlo", "rmlo"}:
        head = "image"
    else:
        raise CheckpointError(
            f"{where}: heads fc1_{{{','.join(sorted(heads))}}}: expected view-wise (fc1_cc, fc1_mlo) or "
            f"image-wise (fc1_lcc, fc1_rcc, fc1_lmlo, fc1_rmlo)"
        )
    stem = state.get("columns.cc.stem_conv.weight")
    if stem is None or stem.ndim != 4:
        raise CheckpointError(f"{where}: four_view_resnet.cc.first_conv.weight missing or not a 4-D kernel")
    channels, width = int(stem.shape[1]), int(stem.shape[0])
    try:
        config = DMVConfig(head=head, in_channels=channels, width=width)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return state, config
