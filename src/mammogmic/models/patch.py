"""DMV-CNN's patch classifier: DenseNet-121 with TensorFlow "SAME" padding and four classes.

The NYU breast cancer classifier (Wu et al. 2019) makes its benign and malignant heat maps with a DenseNet-121
applied to 256x256 patches. Its layers are torchvision's DenseNet-121 (same parameter names, so the official
file loads key for key), but every convolution and pooling pads the TensorFlow way: the total padding of a
dimension of size ``n`` is ``max(0, k - s)`` when ``s`` divides ``n``, else ``max(0, k - n mod s)``, and the
smaller half goes on top/left. For a 256x256 patch that means: the 7x7/2 stem pads 2 above and 3 below, the
3x3/2 max pool 0 and 1, every 3x3/1 convolution 1 and 1, and the 2x2/2 average pools nothing.

Max pools pad with ``-inf`` and average pools leave the padding out of the mean (TensorFlow's rule; at the
patch size used, 256, no average pool pads at all).

Classes (:data:`PATCH_CLASSES`): index 0 malignant, 1 benign, 2 and 3 the two classes without a lesion.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mammogmic.errors import ConfigError

__all__ = [
    "BENIGN_CLASS",
    "MALIGNANT_CLASS",
    "PATCH_CLASSES",
    "PatchClassifier",
    "PatchConfig",
    "same_padding",
]

PATCH_CLASSES = ("malignant", "benign", "other_2", "other_3")
MALIGNANT_CLASS = 0
BENIGN_CLASS = 1


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding ``(before, after)`` of one dimension (the larger half after)."""
    total = max(0, kernel - stride) if size % stride == 0 else max(0, kernel - size % stride)
    return total // 2, total - total // 2


def _pads(x: torch.Tensor, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """``F.pad`` order ``(left, right, top, bottom)`` for a square kernel on ``x`` (N, C, H, W)."""
    top, bottom = same_padding(int(x.shape[-2]), kernel, stride)
    left, right = same_padding(int(x.shape[-1]), kernel, stride)
    return left, right, top, bottom


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` (no bias) with TensorFlow "SAME" padding computed from each input's size."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = _pads(x, self.kernel_size[0], self.stride[0])
        if left == right and top == bottom:  # symmetric: let the convolution pad (no copy)
            return F.conv2d(x, self.weight, None, self.stride, (top, left))
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, None, self.stride)


class SameMaxPool2d(nn.Module):
    """Max pool with "SAME" padding (padded cells never win)."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = _pads(x, self.kernel_size, self.stride)
        if any(pads):
            x = F.pad(x, pads, value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


class SameAvgPool2d(nn.Module):
    """Average pool with "SAME" padding; the mean is over the real cells only (TensorFlow's rule)."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = _pads(x, self.kernel_size, self.stride)
        if not any(pads):
            return F.avg_pool2d(x, self.kernel_size, self.stride)
        sums = F.avg_pool2d(F.pad(x, pads), self.kernel_size, self.stride)
        ones = torch.ones((1, 1, *x.shape[-2:]), dtype=x.dtype, device=x.device)
        return sums / F.avg_pool2d(F.pad(ones, pads), self.kernel_size, self.stride)


@dataclass(frozen=True)
class PatchConfig:
    """Architecture of the patch classifier; the defaults are the released DenseNet-121.

    Attributes:
        in_channels: input channels (3: the patch repeated, as released).
        num_classes: outputs (4 released; index 0 malignant, 1 benign).
        growth_rate: channels each dense layer adds (32).
        block_config: dense layers per block ((6, 12, 24, 16) for DenseNet-121).
        num_init_features: channels of the stem (64).
        bn_size: bottleneck width multiplier of the 1x1 convolutions (4).
    """

    in_channels: int = 3
    num_classes: int = 4
    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_classes", "growth_rate", "num_init_features", "bn_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"PatchConfig.{name}: expected a positive integer, got {value!r}")
        blocks = tuple(self.block_config)
        if not blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks):
            raise ConfigError(
                f"PatchConfig.block_config: expected positive integers, got {self.block_config!r}"
            )
        if self.num_classes < 2:
            raise ConfigError(
                f"PatchConfig.num_classes: at least 2 (malignant, benign), got {self.num_classes}"
            )
        object.__setattr__(self, "block_config", blocks)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_config"] = list(self.block_config)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"PatchConfig: unknown field(s) {', '.join(unknown)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


class _DenseLayer(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3; returns the ``growth_rate`` new channels."""

    def __init__(self, in_ch: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.conv1 = SameConv2d(in_ch, bn_size * growth_rate, 1)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.conv2 = SameConv2d(bn_size * growth_rate, growth_rate, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(out)))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, n_layers: int, in_ch: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        for i in range(n_layers):
            self[f"denselayer{i + 1}"] = _DenseLayer(in_ch + i * growth_rate, growth_rate, bn_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class _Transition(nn.Module):
    """BN-ReLU-conv1x1 halving the channels, then a 2x2/2 average pool."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.conv = SameConv2d(in_ch, out_ch, 1)
        self.pool = SameAvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(F.relu(self.norm(x))))


class PatchClassifier(nn.Module):
    """DenseNet patch classifier; ``forward`` returns logits ``(N, num_classes)`` (softmax: probabilities).

    Parameter names are torchvision's (``features.conv0``, ``features.denseblock1.denselayer1.norm1``, ...,
    ``classifier``), as in the official file.
    """

    def __init__(self, config: PatchConfig | None = None) -> None:
        super().__init__()
        cfg = config or PatchConfig()
        self.config = cfg
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv0"] = SameConv2d(cfg.in_channels, cfg.num_init_features, 7, stride=2)
        layers["norm0"] = nn.BatchNorm2d(cfg.num_init_features)
        layers["relu0"] = nn.ReLU(inplace=True)
        layers["pool0"] = SameMaxPool2d(3, 2)
        channels = cfg.num_init_features
        for i, n_layers in enumerate(cfg.block_config):
            layers[f"denseblock{i + 1}"] = _DenseBlock(n_layers, channels, cfg.growth_rate, cfg.bn_size)
            channels += n_layers * cfg.growth_rate
            if i != len(cfg.block_config) - 1:
                layers[f"transition{i + 1}"] = _Transition(channels, channels // 2)
                channels //= 2
        layers["norm5"] = nn.BatchNorm2d(channels)
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(channels, cfg.num_classes)
        self.num_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` (N, in_channels, H, W); a 1-channel ``x`` is repeated to the model's channels."""
        if x.shape[1] == 1 and self.config.in_channels != 1:
            x = x.expand(-1, self.config.in_channels, -1, -1)
        h = F.relu(self.features(x))  # (N, C, H/32, W/32)
        return self.classifier(h.mean(dim=(2, 3)))
