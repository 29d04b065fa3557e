"""Inference-only speed-ups: BatchNorm folding (:func:`fuse_for_inference`) and TorchInductor compilation
(:func:`compile_for_inference`).

Folding: every BatchNorm that directly follows a convolution goes into that convolution.

In eval mode ``BN(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` and
``b' = (b - m) * g / sqrt(v + eps) + beta``, so one full pass over each activation disappears. In GMIC's
pre-activation global network only ``bn2`` (after ``conv1``) follows a convolution; ``bn1`` and ``final_bn``
act on residual sums and stay. Every BN of the local ResNet folds, and for 1-channel inputs the local stem's
kernel is summed over its three (identical) input channels. Results agree with the unfused model to float32
rounding (measured on the fixture checkpoint: y_fusion 1.5e-7, saliency 3e-7, h_crops 1.5e-5).

:func:`prepare_for_inference`, which also makes the fused copy channels-last, has the blocks of its bf16 copy
run each ReLU and residual add that follows a convolution as a oneDNN post-op of that convolution on the CPU
(:func:`mammogmic.models.resnet.conv_epilogue`).
"""

from __future__ import annotations

import copy
import os
import shutil
from typing import Any

import torch
from torch import nn

from mammogmic.errors import MammogmicError
from mammogmic.models.gmic import GMIC, ResNetBaseline
from mammogmic.models.resnet import BasicBlock, Bottleneck, PreActBlock, ResNetV1


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new convolution equal to ``bn(conv(x))`` for a BN in eval mode."""
    mean, var = bn.running_mean, bn.running_var
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        raise ValueError("cannot fold a BatchNorm without running statistics")
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(var + bn.eps)
        weight = conv.weight * scale.view(-1, 1, 1, 1)
        if conv.weight.is_contiguous(memory_format=torch.channels_last):
            weight = weight.contiguous(memory_format=torch.channels_last)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        fused = copy.deepcopy(conv)
        fused.weight = nn.Parameter(weight)
        fused.bias = nn.Parameter((bias - mean) * scale + bn.bias)
    return fused


def _fold_v1(net: ResNetV1) -> None:
    net.conv1, net.bn1 = fold_conv_bn(net.conv1, net.bn1), nn.Identity()  # type: ignore[assignment]
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in layer:
            if not isinstance(block, (BasicBlock, Bottleneck)):
                raise TypeError(f"unexpected block type {type(block).__name__}")
            block.conv1, block.bn1 = fold_conv_bn(block.conv1, block.bn1), nn.Identity()  # type: ignore[assignment]
            block.conv2, block.bn2 = fold_conv_bn(block.conv2, block.bn2), nn.Identity()  # type: ignore[assignment]
            if isinstance(block, Bottleneck):
                block.conv3, block.bn3 = fold_conv_bn(block.conv3, block.bn3), nn.Identity()  # type: ignore[assignment]
            if block.downsample is not None:
                conv, bn = block.downsample[0], block.downsample[1]  # type: ignore[index]
                block.downsample = nn.Sequential(fold_conv_bn(conv, bn))


def fuse_for_inference(model: GMIC | ResNetBaseline) -> GMIC | ResNetBaseline:
    """An eval-mode copy of ``model`` with BatchNorms folded into convolutions (the original is untouched).

    The copy is for inference only: its parameters differ in layout from a trainable model, so it cannot be
    trained further or saved with :func:`mammogmic.save_model`.
    """
    fused = copy.deepcopy(model).eval()
    if isinstance(fused, GMIC):
        for module in fused.global_net.modules():
            if isinstance(module, PreActBlock):
                module.conv1, module.bn2 = fold_conv_bn(module.conv1, module.bn2), nn.Identity()  # type: ignore[assignment]
        if isinstance(fused.global_net, ResNetV1):
            _fold_v1(fused.global_net)
        _fold_v1(fused.local_net)
        if fused.config.in_channels == 1:
            # The patch is repeated over the 3 input channels, so summing the kernel over them is the same
            # convolution at a third of the cost.
            stem = fused.local_net.conv1
            one = copy.deepcopy(stem)
            summed = stem.weight.detach().sum(dim=1, keepdim=True)
            if stem.weight.is_contiguous(memory_format=torch.channels_last):
                # A 1-channel kernel is "contiguous" in both layouts, but oneDNN picks the output layout from
                # its strides: without channels-last strides the local stem, its max pool and the first
                # residual adds run NCHW (the max pool alone 9x slower, 2026-12-01 profile).
                summed = summed.clone(memory_format=torch.channels_last)
            one.weight = nn.Parameter(summed)
            one.in_channels = 1
            fused.local_net.conv1 = one
    else:
        _fold_v1(fused.backbone)
    object.__setattr__(fused, "inference_only", True)
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused


def compile_for_inference(model: GMIC | ResNetBaseline) -> Any:
    """``torch.compile`` (TorchInductor, weights frozen as constants) of ``model`` (put in eval mode), for
    fp32 CPU inference at a fixed input size.

    The convolutions stay oneDNN's; Inductor generates C++ kernels for the BatchNorm, ReLU, pooling and
    residual work between them. Measured on a 2-vCPU CPU at 2944x1920: 1.1-1.5x faster than the fused
    channels-last eager model, outputs equal to float32 rounding (benchmarks/README.md).
    The first call of each input shape compiles (20-50 s on 2 cores; Inductor caches the result on disk, so
    later processes take a few seconds) and the compiled model holds a second copy of the weights.
    Use it for runs over many images; it runs under ``torch.no_grad()`` or ``torch.inference_mode()`` only.

    Raises:
        MammogmicError: no C++ compiler for Inductor (``$CXX`` or ``g++``) on ``PATH``.
    """
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise MammogmicError(
            f"compiling the model needs a C++ compiler for TorchInductor and {compiler!r} is not on PATH: "
            "install g++ (or set CXX), or run without compilation"
        )
    model.eval()
    return torch.compile(model, options={"freezing": True}, dynamic=False)


def cast_for_bf16(model: GMIC | ResNetBaseline, copy_model: bool = True) -> GMIC | ResNetBaseline:
    """A copy of an inference model whose convolutional backbones hold bfloat16 weights, for bf16 inference
    without autocast (``copy_model=False``: the model itself, cast in place, for a caller that owns a copy
    already and would otherwise hold a second float32 one while casting).

    Autocast re-casts every weight on every pass and returns to float32 around each layer it does not list;
    here the weights are cast once and the activations stay bfloat16 from the input of a backbone to its
    output, so oneDNN runs its bf16 kernels (AMX or AVX512-BF16 where the CPU has them) back to back. What
    needs float32 stays float32: the 1x1 saliency head and its sigmoid, top-t pooling, the gated attention
    and its softmax, the classifiers and their sigmoids (the model converts the backbones' outputs back to
    float32 before them). Use it on a :func:`fuse_for_inference` model; run it without autocast.
    Accuracy on the official fixture images:
    ``tests/models/test_conformance.py::test_bf16_inference_path_holds_accuracy``.
    """
    cast = (copy.deepcopy(model) if copy_model else model).eval()
    nets = [cast.global_net, cast.local_net] if isinstance(cast, GMIC) else [cast.backbone]
    for net in nets:
        net.to(torch.bfloat16)
    for p in cast.parameters():
        p.requires_grad_(False)
    return cast


def prepare_for_inference(
    model: nn.Module, fuse: bool = True, bf16: bool = False, compile: bool = False
) -> nn.Module:
    """The model ``predict`` runs, in eval mode: with ``fuse``, a copy with BatchNorms folded
    (:func:`fuse_for_inference`) and weights channels-last (the caller's model keeps its mode), else the model;
    with ``bf16``, a GMIC or baseline model's backbones cast to bfloat16 (:func:`cast_for_bf16`; other models stay
    float32); with ``compile``, then compiled
    (:func:`compile_for_inference`). With ``fuse`` and ``bf16`` the blocks also run their ReLUs and residual adds
    as oneDNN post-ops of the convolutions (:func:`mammogmic.models.resnet.conv_epilogue`; the plain operations
    under autograd, autocast, tracing, ``torch.compile`` and off the CPU): 13-17% faster in bf16 on a 2-vCPU
    Xeon with AMX, 0-2% slower in float32, which therefore keeps the plain operations (2026-12-02). The one
    recipe for ``predict`` and ``benchmarks/bench_model.py``, so that the benchmark times the layouts ``predict``
    gets.
    """
    if fuse:  # a copy: the caller's model keeps its mode
        model = fuse_for_inference(model).to(memory_format=torch.channels_last)  # type: ignore[arg-type, call-overload]
    else:
        model.eval()
    if bf16 and isinstance(model, (GMIC, ResNetBaseline)):
        model = cast_for_bf16(model, copy_model=not fuse)  # the fused model is our own copy: cast it in place
        if fuse:  # folded and channels-last: oneDNN takes the ReLUs and residual adds as post-ops
            for module in model.modules():
                if isinstance(module, (PreActBlock, BasicBlock, Bottleneck, ResNetV1)):
                    module.fused_epilogues = True
    if compile:
        model = compile_for_inference(model)  # type: ignore[arg-type]
    return model


def scoring_copy(model: nn.Module) -> nn.Module:
    """What ``mammogmic predict`` and ``mammogmic evaluate`` run, in float32, for a GMIC or baseline model being
    trained: :func:`prepare_for_inference`'s fused, channels-last copy (the model itself keeps its mode and
    weights). Other models (DMV-CNN, the patch classifier) are returned as they are (the scoring functions put
    them in eval mode and back).

    The trainer validates and tests with it and the demo scores with it, so a run's figures are those the
    exported model gives in ``predict`` (probabilities within float32 rounding of the unfused model's, about
    5e-7), and validation runs faster (a demo model's 360 validation images on a 2-vCPU Zen 4: 9.0 against 12.1 s).
    """
    if isinstance(model, (GMIC, ResNetBaseline)):
        return prepare_for_inference(model)
    return model
