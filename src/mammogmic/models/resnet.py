"""ResNet backbones used by GMIC.

* :class:`ResNet22` - the pre-activation ("v2") ResNet-22 global network of GMIC/DMV-CNN: a 7x7/2 stem
  (padding 3 in GMIC, 0 in DMV-CNN), a 3x3/2 max pool without padding, five stages of two :class:`PreActBlock` with strides 1, 2, 2, 2, 2 and
  width doubling per stage, and a final BN + ReLU. Total stride 64: a 2944x1920 input gives a 46x30 map.
* :class:`ResNetV1` - the classic post-activation ResNet-18/34 (:class:`BasicBlock`) and ResNet-50
  (:class:`Bottleneck`, stride on the 3x3 conv) in the torchvision parameter layout, used as the local
  network (and as the optional v1 global network and the paper's ResNet-34 baseline).

Both return the last feature map (no pooling, no classifier); ``forward(x, fine=True)`` returns it on a grid
twice as fine (:func:`finer_stage`).

The bf16 inference model ``predict --amp bf16`` runs (:func:`mammogmic.models.prepare_for_inference`: folded,
channels-last, cast) sets ``fused_epilogues`` on its blocks and ResNet-v1 stems: there each convolution that a
ReLU or a residual add follows runs them as oneDNN post-ops (:func:`conv_epilogue`), so the activation is
written once instead of three times.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def epilogue_fusable(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether :func:`conv_epilogue` can fuse here: a channels-last CPU tensor of the weights' dtype (the layout
    ``predict`` runs; in NCHW bf16 oneDNN hands an add + ReLU epilogue back to ATen, which refuses bf16), no
    autograd, no autocast, and no tracer (TorchScript, ONNX export, torch.compile), which should see the plain
    operations."""
    return (
        x.device.type == "cpu"
        and x.dtype == conv.weight.dtype
        and x.is_contiguous(memory_format=torch.channels_last)
        and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
        and torch.backends.mkldnn.is_available()
    )


def conv_epilogue(
    conv: nn.Conv2d,
    x: torch.Tensor,
    relu: bool = False,
    residual: torch.Tensor | None = None,
    into_residual: bool = False,
) -> torch.Tensor:
    """``relu(conv(x) + residual)`` (each part optional) as one oneDNN convolution with post-ops.

    Inference only: the caller checks :func:`epilogue_fusable` first. float32 gives the eager result bit for
    bit; in bfloat16 the residual is added to the float32 accumulator before the one rounding, where eager
    rounds the convolution's output first. GMIC at 2944x1920 on a 2-vCPU Xeon with AMX (2026-12-02, one
    process, alternated): bf16 0.17 -> 0.145 s per image; float32 0-2% slower, so only the bf16 model uses it.

    ``into_residual``: write the result into ``residual`` (the same values), for a residual the caller owns and
    no longer needs, so that no second activation of its size is allocated.
    """
    args = (conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    pointwise = torch.ops.mkldnn._convolution_pointwise
    unary = "relu" if relu else None
    if residual is None:
        return pointwise(x, *args, unary or "none", [], "")
    if not residual.is_contiguous(memory_format=torch.channels_last):
        residual = residual.contiguous(memory_format=torch.channels_last)
    if into_residual:
        return torch.ops.mkldnn._convolution_pointwise_.binary(residual, x, *args, "add", None, unary, [], "")
    return pointwise.binary(x, residual, *args, "add", None, unary, [], "")


def _max3_stride2(x: torch.Tensor, dim: int, padding: int) -> torch.Tensor:
    """Max over windows of 3 at stride 2 along ``dim`` (zero or one padded element counts as -inf)."""
    n = x.shape[dim]
    out = (n + 2 * padding - 3) // 2 + 1

    def tap(k: int) -> tuple[int, int, torch.Tensor]:
        # Output o reads input 2o + k - padding; keep the outputs for which that index exists.
        o0 = max(0, (padding - k + 1) // 2)
        o1 = min(out, (n - 1 - k + padding) // 2 + 1)
        every_other = [slice(None)] * x.dim()
        every_other[dim] = slice(None, None, 2)
        return o0, o1, x.narrow(dim, 2 * o0 + k - padding, 2 * (o1 - o0) - 1)[tuple(every_other)]

    taps = [tap(k) for k in range(3)]
    full = [t for t in taps if t[0] == 0 and t[1] == out]
    rest = [t for t in taps if not (t[0] == 0 and t[1] == out)]
    r = torch.maximum(full[0][2], full[1][2]) if len(full) > 1 else full[0][2].clone()
    for o0, o1, values in full[2:] + rest:
        part = r.narrow(dim, o0, o1 - o0)
        torch.maximum(part, values, out=part)
    return r


def finer_stage(stage: nn.Module) -> nn.Module:
    """A view of a trunk's last stage that reads every position of its input grid, not every other one.

    Its stride-2 convolutions run at stride 1 and every later convolution wider than 1x1 is dilated by 2 (its
    padding doubled), so output cell ``k`` of the view is centred on the input grid's cell ``k``: at even ``k``
    it is the stage's own output cell ``k / 2``, at odd ``k`` the output cell the stage gives for the input
    shifted by one input cell, half an output cell (shift-and-stitch, computed in one pass; only the zero
    padding at the far border differs from really shifting the image). The weights are the stage's own: the
    view is made of shallow copies that share their parameters and buffers, so it is built per call and never
    saved or trained.

    Raises:
        ValueError: the stage has no stride-2 convolution (a grid that is already fine, e.g. ``ResNetV1`` with
            ``stride=16``).
    """
    strided = [m for m in stage.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    if not strided:
        raise ValueError("the last stage does not stride, so it has no finer grid to read")

    def view(module: nn.Module) -> nn.Module:
        twin = copy.copy(module)  # shares _parameters and _buffers with the original
        twin._modules = {name: None if m is None else view(m) for name, m in module._modules.items()}
        if isinstance(twin, nn.Conv2d):
            if twin.stride == (2, 2):
                twin.stride = (1, 1)
            elif twin.kernel_size != (1, 1):
                twin.dilation = (2 * twin.dilation[0], 2 * twin.dilation[1])
                twin.padding = (2 * int(twin.padding[0]), 2 * int(twin.padding[1]))
        return twin

    return view(stage)


class _PoolChannelsLast(torch.autograd.Function):
    """ATen's max pool with argmax indices, run by its channels-last kernel for an NCHW input.

    On a CPU, ATen's NCHW kernel walks one plane at a time without vectorizing across channels: the demo's global
    stem (16x8x256x160, bf16) pools in 27 ms against 12 ms through channels-last, the conversions included, and its
    local stem (64x16x32x32) in 5.4 against 1.2 ms (a 2-vCPU Zen 4). Both kernels scan a window in the same
    order and keep its first maximum (its last NaN), so values and indices are the same bit for bit; the backward
    pass is ATen's own kernel with those indices, so a training step's gradients are too
    (``tests/models/test_inference_layout.py``).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pad: int) -> torch.Tensor:
        out, indices = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), [3, 3], [2, 2], [pad, pad]
        )
        ctx.save_for_backward(x, indices)
        ctx.pad = pad
        return out.contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, indices = ctx.saved_tensors
        pad = ctx.pad
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, [3, 3], [2, 2], [pad, pad], [1, 1], False, indices
        )
        return grad_x, None


class MaxPool3x3s2(nn.MaxPool2d):
    """``nn.MaxPool2d(3, 2, padding)`` with ATen's values and gradients, computed faster on a CPU.

    - Without autograd, the max of strided views (rows, then columns) instead of ATen's pooling kernel, which also
      computes the argmax indices. Same values, bit for bit (a max involves no rounding); on a 2-vCPU Zen 5, bf16
      channels-last, 1.5-2.3x faster (GMIC's stem at 2944x1920 and the local network's stem;
      ``tests/models/test_inference_layout.py``); float32 NCHW, as validation runs the demo's model, 6-8x (a
      2-vCPU Zen 4, 32x8x256x160: 6.4 against 49.6 ms).
    - Under autograd, ATen's kernel, whose indices the backward pass needs; an NCHW input on a CPU goes through
      its channels-last kernel (:class:`_PoolChannelsLast`), 2.3-4.5x faster with the same values and gradients.
    """

    def __init__(self, padding: int = 0) -> None:
        super().__init__(kernel_size=3, stride=2, padding=padding)
        self.pad = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Traced and exported graphs keep one MaxPool node.
        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if exporting or x.dim() != 4:
            return super().forward(x)
        if torch.is_grad_enabled() and x.requires_grad:
            nchw = x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
            if nchw and x.device.type == "cpu" and not torch.compiler.is_compiling():
                return _PoolChannelsLast.apply(x, self.pad)
            return super().forward(x)
        return _max3_stride2(_max3_stride2(x, 2, self.pad), 3, self.pad)


def with_aten_max_pools(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose :class:`MaxPool3x3s2` pools are ATen's ``nn.MaxPool2d`` again, as the official
    release pools (the same values; the benchmarks' stand-in for the release runs its operations)."""
    aten = copy.deepcopy(model)
    for module in aten.modules():
        for name, child in module.named_children():
            if isinstance(child, MaxPool3x3s2):
                setattr(module, name, nn.MaxPool2d(3, 2, child.pad))
    return aten


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus identity or 1x1 projection.

    The projection (``downsample``, no BN) acts on the *pre-activated* input, as in the reference.
    """

    fused_epilogues = False  # set by prepare_for_inference(bf16=True) (bn2 folded into conv1)

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, project: bool = False) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = conv1x1(in_ch, out_ch, stride) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        if self.fused_epilogues and epilogue_fusable(out, self.conv1):
            # Rebinding `out` frees the pre-activation before conv2, and a projected shortcut (this block's own
            # tensor) takes the sum: GMIC's first block at 2944x1920 then holds three activations of its
            # size at once instead of five.
            out = conv_epilogue(self.conv1, out, relu=True)
            return conv_epilogue(
                self.conv2, out, residual=shortcut, into_residual=self.downsample is not None
            )
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out.add_(shortcut)


class ResNet22(nn.Module):
    """GMIC's global network ``f_g`` (ResNet-22, pre-activation blocks).

    Args:
        in_channels: input channels (1: image; 3: image + two heat maps).
        width: filters of the stem and the first stage (16 in the paper); doubles per stage.
        blocks: blocks per stage.
        strides: stride of the first block of each stage.
        stem_padding: zero padding of the 7x7 stem convolution (GMIC 3, DMV-CNN 0).
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 16,
        blocks: Sequence[int] = (2, 2, 2, 2, 2),
        strides: Sequence[int] = (1, 2, 2, 2, 2),
        stem_padding: int = 3,
    ) -> None:
        super().__init__()
        if len(blocks) != len(strides):
            raise ValueError(f"blocks {tuple(blocks)} and strides {tuple(strides)} differ in length")
        self.stem_conv = nn.Conv2d(
            in_channels, width, kernel_size=7, stride=2, padding=stem_padding, bias=False
        )
        self.stem_pool = MaxPool3x3s2()
        stages = []
        in_ch = width
        for i, (n_blocks, stride) in enumerate(zip(blocks, strides, strict=True)):
            out_ch = width * 2**i
            # Every stage's first block projects its shortcut (the reference does so even for stage 0).
            layers = [PreActBlock(in_ch, out_ch, stride, project=True)]
            layers += [PreActBlock(out_ch, out_ch) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*layers))
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)
        self.final_bn = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.out_channels = in_ch
        self.stride = 4 * 2 ** sum(s == 2 for s in strides)
        # Cell i of the output is centred on input pixel stride * i + cell_origin: the stem puts stem pixel o
        # on 2o + 3 - padding and the unpadded max pool its output o on stem pixel 2o + 1, so 2 pixels for
        # GMIC (docs/localization.md, "Where a saliency cell lies"), 5 for DMV-CNN.
        self.cell_origin = 5 - stem_padding

    def stem(self, x: torch.Tensor, tile_rows: int = 96) -> torch.Tensor:
        """Stem conv + max pool. Without autograd, large inputs go through in bands of ``tile_rows`` pooled
        rows, so the full-resolution stem output (90 MB for 2944x1920) never exists at once."""
        conv = self.stem_conv
        pad = int(conv.padding[0])
        pooled_rows = (x.shape[2] + 2 * pad - 7) // 2 + 1
        pooled_rows = (pooled_rows - 3) // 2 + 1
        if torch.is_grad_enabled() or pooled_rows <= 2 * tile_rows:
            return self.stem_pool(self.stem_conv(x))
        pooled_cols = ((x.shape[3] + 2 * pad - 7) // 2 + 1 - 3) // 2 + 1
        # Allocated in its final layout: converting an empty NCHW buffer would copy 22 MB of garbage.
        layout = torch.channels_last if self._channels_last() else torch.contiguous_format
        shape = (x.shape[0], conv.out_channels, pooled_rows, pooled_cols)
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout)
        for p0 in range(0, pooled_rows, tile_rows):
            p1 = min(p0 + tile_rows, pooled_rows)
            s0, s1 = 2 * p0, 2 * (p1 - 1) + 3  # stem rows [s0, s1) feed pooled rows [p0, p1)
            i0, i1 = 2 * s0 - pad, 2 * (s1 - 1) + 7 - pad  # input rows [i0, i1) feed stem rows [s0, s1)
            band = x[:, :, max(i0, 0) : min(i1, x.shape[2])]
            band = nn.functional.pad(band, (0, 0, max(-i0, 0), max(i1 - x.shape[2], 0)))
            stem = nn.functional.conv2d(band, conv.weight, None, conv.stride, (0, pad))
            out[:, :, p0:p1] = self.stem_pool(stem)
        return out

    def _channels_last(self) -> bool:
        # The stem's 1-channel kernel is contiguous in both layouts; the first stage's kernel is not.
        first: PreActBlock = self.stages[0][0]  # type: ignore[index]
        return first.conv1.weight.is_contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, fine: bool = False) -> torch.Tensor:
        """The last feature map; ``fine``: the last stage read by :func:`finer_stage` (half the stride)."""
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = (finer_stage(stage) if fine and i == len(self.stages) - 1 else stage)(x)
        return self.relu(self.final_bn(x))


class BasicBlock(nn.Module):
    expansion = 1
    fused_epilogues = False  # set by prepare_for_inference(bf16=True) (every BN folded)

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.fused_epilogues and epilogue_fusable(x, self.conv1):
            out = conv_epilogue(self.conv1, x, relu=True)
            return conv_epilogue(self.conv2, out, relu=True, residual=shortcut)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    expansion = 4
    fused_epilogues = False  # set by prepare_for_inference(bf16=True) (every BN folded)

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.fused_epilogues and epilogue_fusable(x, self.conv1):
            out = conv_epilogue(self.conv2, conv_epilogue(self.conv1, x, relu=True), relu=True)
            return conv_epilogue(self.conv3, out, relu=True, residual=shortcut)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


_V1_LAYOUTS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, ...]]] = {
    "resnet10": (BasicBlock, (1, 1, 1, 1)),
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNetV1(nn.Module):
    """Post-activation ResNet in torchvision's layout (``conv1, bn1, layer1..4``), without pooling/head.

    Args:
        arch: ``"resnet10"`` (one block per stage: a receptive field of 195 pixels instead of ResNet-18's
            435), ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        in_channels: input channels of ``conv1``.
        width: channels of ``layer1`` (64 in the standard nets); doubles per layer.
        stride: total stride, 32 (the standard nets) or 16 (``layer4`` keeps ``layer3``'s resolution: the
            same parameters, a saliency grid twice as fine; see docs/localization.md).
    """

    fused_epilogues = False  # set by prepare_for_inference(bf16=True) (bn1 folded into conv1)

    def __init__(self, arch: str, in_channels: int = 3, width: int = 64, stride: int = 32) -> None:
        super().__init__()
        if arch not in _V1_LAYOUTS:
            raise ValueError(f"unknown ResNet architecture {arch!r}; expected one of {sorted(_V1_LAYOUTS)}")
        if stride not in (16, 32):
            raise ValueError(f"ResNetV1 stride must be 16 or 32, got {stride!r}")
        block, layers = _V1_LAYOUTS[arch]
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = MaxPool3x3s2(padding=1)
        in_ch = width
        stages: list[nn.Sequential] = []
        for i, n_blocks in enumerate(layers):
            planes = width * 2**i
            step = 1 if i == 0 or (i == 3 and stride == 16) else 2
            downsample = None
            if step != 1 or in_ch != planes * block.expansion:
                downsample = nn.Sequential(
                    conv1x1(in_ch, planes * block.expansion, step), nn.BatchNorm2d(planes * block.expansion)
                )
            blocks: list[nn.Module] = [block(in_ch, planes, step, downsample)]
            in_ch = planes * block.expansion
            blocks += [block(in_ch, planes) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = in_ch
        self.stride = stride
        self.cell_origin = 0  # cell i is centred on input pixel stride * i ("same" padding throughout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, fine: bool = False) -> torch.Tensor:
        """The last feature map; ``fine``: ``layer4`` read by :func:`finer_stage` (half the stride)."""
        if self.fused_epilogues and epilogue_fusable(x, self.conv1):
            x = self.maxpool(conv_epilogue(self.conv1, x, relu=True))
        else:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return (finer_stage(self.layer4) if fine else self.layer4)(x)
