"""The inference path's memory layout and pooling: what keeps ``predict`` on oneDNN's fast kernels.

A 1-channel tensor is "contiguous" in both layouts, and oneDNN picks a convolution's output layout from the
strides of its input and kernel. A local stem whose summed 1-channel kernel lost its channels-last strides ran
the local network's stem, max pool and first residual adds in NCHW: the max pool alone took 19 ms instead of
2 ms per image (bf16, 2026-12-01 profile), and the benchmark, which fused a channels-last model, timed that
slow path while ``predict`` did not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mammogmic import GMIC, GMICConfig
from mammogmic.models import fuse_for_inference, prepare_for_inference
from mammogmic.models.resnet import MaxPool3x3s2, with_aten_max_pools

TINY = GMICConfig(global_width=4, local_width=8, crop_size=(32, 32), attention_dim=8, num_patches=2)


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_strided_max_pool_equals_atens(padding: int, dtype: torch.dtype, channels_last: bool) -> None:
    pool = MaxPool3x3s2(padding)
    torch.manual_seed(0)
    with torch.no_grad():
        for h in range(3, 12):
            for w in (3, 4, 7, 10):
                x = torch.randn(2, 5, h, w, dtype=dtype)
                x[0, 1, h // 2, w // 2] = float("nan")  # NaN propagates as in ATen
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                ours, aten = pool(x), F.max_pool2d(x, 3, 2, padding)
                assert ours.shape == aten.shape
                assert torch.equal(ours.nan_to_num(7.0), aten.nan_to_num(7.0)), (h, w)
                assert torch.equal(ours.isnan(), aten.isnan())
                if channels_last and x.shape[2] > 3:
                    assert ours.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_pool_trains_with_atens_values_and_gradients(
    padding: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under autograd an NCHW input pools through ATen's channels-last kernel: the same values, and the same
    gradients, as ATen's NCHW pooling, with ties (a window's gradient goes to its first maximum; a maximum of views
    would split it), NaN (to the window's last NaN) and infinities."""
    from mammogmic.models import resnet

    calls = []
    real = resnet._PoolChannelsLast.apply
    monkeypatch.setattr(resnet._PoolChannelsLast, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    for h in range(3, 12):
        for w in (3, 4, 7, 10):
            x = torch.randint(0, 3, (2, 5, h, w)).float()  # ties, as after a ReLU or in bf16
            x[0, 1, h // 2, w // 2] = float("nan")
            x[1, 2, 0, :2] = float("nan")
            x[1, 3] = -float("inf")
            x[1, 4, h - 1, w - 1] = float("inf")
            x = x.to(dtype).requires_grad_(True)
            ref = x.detach().clone().requires_grad_(True)
            ours, aten = MaxPool3x3s2(padding)(x), F.max_pool2d(ref, 3, 2, padding)
            grad = torch.randn(aten.shape, dtype=dtype)
            ours.backward(grad)
            aten.backward(grad)
            assert torch.equal(ours.nan_to_num(7.0), aten.nan_to_num(7.0)) and ours.is_contiguous(), (h, w)
            assert torch.equal(x.grad.nan_to_num(7.0), ref.grad.nan_to_num(7.0)), (h, w)  # type: ignore[union-attr]
    assert len(calls) == 9 * 4


def _local_stem_output(model: torch.nn.Module) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.local_net.maxpool.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(torch.randn(1, 1, 128, 96))
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("order", ["channels-last, then fused", "fused, then channels-last", "prepare"])
def test_fused_local_stem_runs_channels_last_whatever_the_order(order: str) -> None:
    torch.manual_seed(0)
    model = GMIC(TINY).eval()
    if order == "channels-last, then fused":
        fused = fuse_for_inference(model.to(memory_format=torch.channels_last))
    elif order == "fused, then channels-last":
        fused = fuse_for_inference(model).to(memory_format=torch.channels_last)
    else:
        fused = prepare_for_inference(model)
    stem = fused.local_net.conv1.weight
    assert stem.shape[1] == 1  # summed over the 3 identical input channels
    assert stem.stride()[1] == 1, "the 1-channel stem kernel lost its channels-last strides"
    act = _local_stem_output(fused)
    assert act.shape[1] == 8 and act.stride()[1] == 1, "the local stem's output is NCHW"


def test_prepare_for_inference_is_predicts_bf16_model() -> None:
    torch.manual_seed(0)
    model = GMIC(TINY).eval()
    prepared = prepare_for_inference(model, bf16=True)
    assert next(prepared.global_net.parameters()).dtype == torch.bfloat16
    assert next(prepared.local_net.parameters()).dtype == torch.bfloat16
    assert prepared.saliency_head.weight.dtype == torch.float32
    with torch.no_grad():
        x = torch.randn(2, 1, 128, 96)
        assert torch.allclose(prepared(x).y_fusion, model(x).y_fusion, atol=0.02)


@pytest.mark.parametrize("fuse", [True, False])
def test_bf16_preparation_copies_the_float32_model_once(fuse: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fusing makes a copy; casting it to bf16 then works on that copy instead of a second float32 one, which
    held another 56 MiB at the peak of ``predict --amp bf16``'s model loading (2026-12-03, ResNet-18 local
    network). Without fusion the cast makes the one copy. The caller's model keeps its float32 weights."""
    from mammogmic.models import fuse as fuse_module

    copies: list[int] = []
    real_deepcopy = fuse_module.copy.deepcopy

    def counting(obj, memo=None):  # type: ignore[no-untyped-def]
        if isinstance(obj, GMIC):
            copies.append(id(obj))
        return real_deepcopy(obj, memo)

    monkeypatch.setattr(fuse_module.copy, "deepcopy", counting)
    model = GMIC(TINY).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare_for_inference(model, fuse=fuse, bf16=True)
    assert len(copies) == 1
    assert prepared is not model
    assert next(prepared.global_net.parameters()).dtype == torch.bfloat16
    assert all(
        v.dtype == before[k].dtype and torch.equal(v, before[k]) for k, v in model.state_dict().items()
    )


@pytest.mark.parametrize("amp", ["none", "bf16"])
@pytest.mark.parametrize("global_arch", ["resnet22", "resnet10"])
def test_every_backbone_pools_with_the_strided_max_and_trains_as_before(global_arch: str, amp: str) -> None:
    """Trainable and fused models pool with MaxPool3x3s2: evaluation gives ATen's values bit for bit, and a
    training step (float32, or bf16 autocast as the demo trains) the same gradients."""
    torch.manual_seed(0)
    net = GMIC(TINY.replace(global_arch=global_arch))
    for model in (net, fuse_for_inference(net)):
        pools = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool2d)]
        assert len(pools) == 2 and all(type(m) is MaxPool3x3s2 for m in pools)
    aten = with_aten_max_pools(net)
    x = torch.randn(2, 1, 128, 96)
    with torch.no_grad():
        ours, theirs = net.eval()(x), aten.eval()(x)
    assert torch.equal(ours.saliency, theirs.saliency) and torch.equal(ours.y_fusion, theirs.y_fusion)
    for model in (net.train(), aten.train()):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            out = model(x)
        (out.y_fusion + out.y_global + out.y_local).float().sum().backward()
    for (name, p), q in zip(net.named_parameters(), aten.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert torch.equal(p.grad, q.grad), name


def _epilogues(model: torch.nn.Module, on: bool) -> torch.nn.Module:
    for m in model.modules():
        if hasattr(m, "fused_epilogues"):
            m.fused_epilogues = on
    return model


@pytest.mark.parametrize("local_arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("global_arch", ["resnet22", "resnet10"])
def test_fused_epilogues_run_and_give_the_eager_result(
    global_arch: str,
    local_arch: str,
    monkeypatch: pytest.MonkeyPatch,
    randomize_batchnorms,  # type: ignore[no-untyped-def]
) -> None:
    """The bf16 inference model runs its ReLUs and residual adds as convolution post-ops, within bf16 rounding of
    the same model's plain operations, for every block kind (pre-activation, basic, bottleneck, the v1 stem),
    also on the fine grid's dilated last stage; the float32 model keeps the plain operations, and the post-ops
    give its result to float32 rounding when switched on."""
    from mammogmic.models import resnet

    torch.manual_seed(0)
    cfg = TINY.replace(global_arch=global_arch, local_arch=local_arch, saliency_grid="fine_at_inference")
    model = GMIC(cfg).eval()
    randomize_batchnorms(model)
    calls: list[bool] = []
    real = resnet.conv_epilogue

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(kwargs.get("residual") is not None)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(resnet, "conv_epilogue", spy)
    x = torch.randn(2, 1, 160, 128).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fp32 = prepare_for_inference(model)
        plain32 = fp32(x)
        assert not calls, "the float32 model should keep the plain operations"
        ours32 = _epilogues(fp32, True)(x)
        assert calls and any(calls) and not all(calls)
        assert torch.allclose(ours32.y_fusion, plain32.y_fusion, atol=1e-5)
        assert torch.allclose(ours32.saliency, plain32.saliency, atol=1e-5)
        assert torch.equal(ours32.patch_locations, plain32.patch_locations)

        bf16 = prepare_for_inference(model, bf16=True)
        calls.clear()
        ours = bf16(x)
        assert calls and any(calls) and not all(calls), "the bf16 model did not use its epilogues"
        plain = _epilogues(bf16, False)(x)
        assert torch.allclose(ours.y_fusion, plain.y_fusion, atol=0.02)
        assert torch.allclose(ours.saliency, plain.saliency, atol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_epilogue_into_the_residual_gives_the_same_values_in_its_buffer(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``into_residual`` writes relu(conv(x) + residual) into the residual's own memory, bit for bit the values
    of the out-of-place post-op; the pre-activation block uses it for its projected shortcut only."""
    from mammogmic.models import resnet

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, bias=True).to(dtype).eval().requires_grad_(False)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 20, 12, dtype=dtype).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 16, 20, 12, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for relu in (False, True):
            apart = resnet.conv_epilogue(conv, x, relu=relu, residual=residual)
            target = residual.clone()
            inside = resnet.conv_epilogue(conv, x, relu=relu, residual=target, into_residual=True)
            assert inside.data_ptr() == target.data_ptr()
            assert torch.equal(inside, apart) and torch.equal(target, apart)

    calls: list[bool] = []
    real = resnet.conv_epilogue

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(bool(kwargs.get("into_residual")))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(resnet, "conv_epilogue", spy)
    for project in (False, True):
        block = resnet.PreActBlock(8, 8, project=project).eval().to(dtype)
        block = block.to(memory_format=torch.channels_last).requires_grad_(False)
        block.fused_epilogues = True
        x_in = x.clone()
        with torch.no_grad():
            block(x_in)
        assert torch.equal(x_in, x), "the block's input was overwritten"
    assert calls == [False, False, False, True]


def test_epilogues_stay_out_of_training_autocast_and_tracing() -> None:
    """Autograd, autocast, tracers and NCHW tensors get the plain operations (the post-op kernels have no
    backward, no autocast rule and no ONNX symbolic, and NCHW bf16 add + ReLU fails inside oneDNN's fallback)."""
    from mammogmic.models.resnet import epilogue_fusable

    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert epilogue_fusable(x, conv)
        assert not epilogue_fusable(x.contiguous(), conv)  # NCHW
        assert not epilogue_fusable(x.bfloat16(), conv)  # dtypes differ
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not epilogue_fusable(x, conv)
    assert not epilogue_fusable(x, conv)  # grad mode, trainable weights
    conv.requires_grad_(False)
    assert epilogue_fusable(x, conv)
    assert not epilogue_fusable(x.requires_grad_(True), conv)
