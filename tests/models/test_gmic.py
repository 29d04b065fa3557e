from __future__ import annotations

import pytest
import torch

from mammogmic import GMIC, BaselineConfig, GMICConfig, ResNetBaseline
from mammogmic.errors import ConfigError
from mammogmic.training.loss import GMICLoss, LossConfig

TINY = GMICConfig(global_width=4, local_width=4, crop_size=(32, 32), attention_dim=8)
#: A v1 global network at stride 32: a 16x10 grid at 512x320, the demo's geometry at a fraction of its width.
SMALL_V1 = GMICConfig(
    global_arch="resnet10", global_width=4, local_width=4, crop_size=(64, 64), num_patches=2
)


@pytest.mark.parametrize(("hw", "k"), [((256, 192), 6), ((320, 256), 1), ((200, 150), 3), ((512, 128), 4)])
def test_shapes_follow_input_and_k(hw: tuple[int, int], k: int) -> None:
    model = GMIC(TINY.replace(num_patches=k)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, *hw))
    h, w = out.saliency.shape[2:]
    assert out.h_g.shape == (2, 64, h, w)
    # Stride-64 grid (each stage of the chain floors or rounds up by the conv arithmetic).
    assert abs(h - hw[0] / 64) <= 1 and abs(w - hw[1] / 64) <= 1
    for name in ("y_fusion", "y_global", "y_local", "prediction"):
        assert getattr(out, name).shape == (2, 2)
    assert out.patch_locations.shape == (2, k, 2) and out.patch_locations.dtype == torch.int64
    assert out.patches.shape == (2, k, 32, 32)
    assert out.h_crops.shape == (2, k, 32)
    assert torch.allclose(out.patch_attention.sum(dim=1), torch.ones(2))
    assert ((out.saliency >= 0) & (out.saliency <= 1)).all()
    assert (out.patch_locations >= 0).all()
    assert (out.patch_locations[..., 0] <= hw[0] - 32).all() and (
        out.patch_locations[..., 1] <= hw[1] - 32
    ).all()


def test_full_size_grid_is_46_by_30() -> None:
    model = GMIC(TINY).eval()
    with torch.no_grad():
        h_g = model.global_net(torch.zeros(1, 1, 2944, 1920))
    assert h_g.shape[2:] == (46, 30)


def test_patches_are_cut_from_input() -> None:
    model = GMIC(TINY).eval()
    x = torch.randn(1, 1, 256, 192)
    with torch.no_grad():
        out = model(x)
    for k, (r, c) in enumerate(out.patch_locations[0].tolist()):
        assert torch.equal(out.patches[0, k], x[0, 0, r : r + 32, c : c + 32])


def test_every_parameter_gets_a_gradient() -> None:
    model = GMIC(TINY).train()
    out = model(torch.randn(2, 1, 256, 192))
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    GMICLoss(LossConfig(beta=1e-3)).forward(out, labels).total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    zero = [n for n, p in model.named_parameters() if float(p.grad.abs().sum()) == 0.0]
    assert zero == []
    # Documented exception: selection is an argmax - the locations are integers with no autograd history.
    assert not out.patch_locations.requires_grad


def test_three_channel_input_and_variants() -> None:
    cfg = TINY.replace(
        in_channels=3,
        attention="uniform",
        patch_selection="random",
        prediction="average",
        aggregation="gmp",
        local_arch="resnet50",
    )
    model = GMIC(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 256, 192))
    assert out.h_crops.shape[-1] == cfg.feature_dim == 128
    assert torch.allclose(out.patch_attention, torch.full((2, 6), 1 / 6))
    assert torch.allclose(out.prediction, (out.y_global + out.y_local) / 2)
    assert torch.allclose(out.y_global, out.saliency.flatten(2).amax(dim=2))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(1, 1, 256, 192))


@pytest.mark.parametrize("head", ["global", "local"])
def test_prediction_heads(head: str) -> None:
    model = GMIC(TINY.replace(prediction=head, aggregation="gap")).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 256, 192))
    assert torch.equal(out.prediction, out.y_global if head == "global" else out.y_local)
    if head == "global":
        assert torch.allclose(out.y_global, out.saliency.mean(dim=(2, 3)))


def test_global_v1_option() -> None:
    model = GMIC(TINY.replace(global_arch="resnet18")).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 256, 192))
    assert out.h_g.shape[1] == TINY.replace(global_arch="resnet18").global_dim == 32
    assert out.saliency.shape[2:] == (8, 6)


def test_batch_is_independent_in_eval() -> None:
    model = GMIC(TINY).eval()
    x = torch.randn(3, 1, 256, 192)
    with torch.no_grad():
        batched = model(x)
        single = model(x[1:2])
    assert torch.allclose(batched.y_fusion[1], single.y_fusion[0], atol=1e-6)
    assert torch.equal(batched.patch_locations[1], single.patch_locations[0])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("in_channels", 2),
        ("percent_t", 0.0),
        ("percent_t", 1.5),
        ("num_patches", 0),
        ("crop_size", (0, 8)),
        ("local_arch", "resnet101"),
        ("aggregation", "lse"),
        ("prediction", "max"),
        ("attention_dim", True),
        ("global_stride", 8),
        ("global_stride", True),
    ],
)
def test_bad_config_names_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        GMICConfig(**{field: value})


def test_config_dict_round_trip_and_unknown_field() -> None:
    cfg = TINY.replace(percent_t=0.05)
    assert GMICConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="K_patches"):
        GMICConfig.from_dict({"K_patches": 3})


def test_resnet34_baseline() -> None:
    model = ResNetBaseline(BaselineConfig(width=8)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 128, 96))
    assert out.prediction.shape == (2, 2) and torch.equal(out.y_fusion, out.prediction)
    assert torch.isfinite(out.logits).all() and ((out.prediction >= 0) & (out.prediction <= 1)).all()
    n_blocks = sum(len(getattr(model.backbone, f"layer{i}")) for i in range(1, 5))
    assert n_blocks == 16  # 3 + 4 + 6 + 3 basic blocks: ResNet-34
    with pytest.raises(ConfigError, match="arch"):
        BaselineConfig(arch="vgg")


def test_released_parameter_count() -> None:
    # facts.md: the released GMIC-ResNet-18 has 14,110,322 parameters.
    assert sum(p.numel() for p in GMIC().parameters()) == 14_110_322


@pytest.mark.parametrize("hw", [(2000, 300), (1601, 97)])
def test_banded_stem_equals_plain_stem(hw: tuple[int, int]) -> None:
    net = GMIC(TINY).global_net.eval()
    x = torch.randn(1, 1, *hw)
    with torch.no_grad():
        banded = net.stem(x, tile_rows=64)
    plain = net.stem_pool(net.stem_conv(x))  # autograd on: the plain path
    assert banded.shape == plain.shape
    assert torch.equal(banded, plain.detach())


def test_channels_last_matches_default_layout() -> None:
    model = GMIC(TINY).eval()
    x = torch.randn(2, 1, 256, 192)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x)
    assert torch.allclose(out.y_fusion, ref.y_fusion, atol=1e-5)
    assert torch.equal(out.patch_locations, ref.patch_locations)


def test_fused_inference_copy_matches_and_cannot_be_saved(tmp_path, randomize_batchnorms) -> None:  # type: ignore[no-untyped-def]
    from mammogmic import save_model
    from mammogmic.errors import CheckpointError
    from mammogmic.models import fuse_for_inference

    torch.manual_seed(0)
    model = GMIC(TINY.replace(local_arch="resnet50"))
    randomize_batchnorms(model)
    model.eval()
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.local_net.modules())
    x = torch.randn(2, 1, 256, 192)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert torch.equal(ref.patch_locations, out.patch_locations)
    assert torch.allclose(ref.y_fusion, out.y_fusion, atol=1e-5)
    assert torch.allclose(ref.h_crops, out.h_crops, atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.local_net.modules())  # original untouched
    with pytest.raises(CheckpointError, match="fused for inference"):
        save_model(fused, tmp_path / "f.safetensors")


def test_fused_baseline_matches() -> None:
    from mammogmic.models import fuse_for_inference

    model = ResNetBaseline(BaselineConfig(width=8)).eval()
    x = torch.randn(1, 1, 96, 64)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, fuse_for_inference(model)(x).logits, rtol=1e-4, atol=1e-4)


def test_compiled_inference_matches_eager() -> None:
    from mammogmic.models import compile_for_inference, fuse_for_inference

    torch.manual_seed(0)
    model = GMIC(TINY).eval()
    x = torch.randn(2, 1, 256, 192)
    with torch.no_grad():
        ref = model(x)
        compiled = compile_for_inference(fuse_for_inference(model).to(memory_format=torch.channels_last))
        out = compiled(x)
    assert torch.equal(out.patch_locations, ref.patch_locations)
    assert torch.allclose(out.y_fusion, ref.y_fusion, atol=1e-5)
    assert torch.allclose(out.saliency, ref.saliency, atol=1e-5)
    assert out.patch_attention.shape == ref.patch_attention.shape
    assert compiled.config == model.config  # attribute access reaches the wrapped model


def test_compile_without_a_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from mammogmic.errors import MammogmicError
    from mammogmic.models import compile_for_inference

    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(MammogmicError, match="no-such-compiler-xyz.*not on PATH"):
        compile_for_inference(GMIC(TINY))


def _symmetrise_kernels(module: torch.nn.Module) -> None:
    """Make every convolution kernel equal to its left-right and its top-bottom mirror image."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                w = m.weight
                m.weight.copy_((w + w.flip(-1) + w.flip(-2) + w.flip(-2, -1)) / 4)


@pytest.mark.parametrize(
    ("arch", "stride", "fine"),
    [
        ("resnet10", None, False),
        ("resnet10", 16, False),
        ("resnet22", None, False),
        ("resnet10", None, True),
        ("resnet22", None, True),
    ],
)
def test_reflections_land_on_the_networks_own_cells(arch: str, stride: int | None, fine: bool) -> None:
    """A global network with mirror-symmetric kernels computes, on the input mirrored about cell centres (left-
    right, top-bottom, both: a 180-degree turn), its features mirrored the same way: exactly, on the cells whose
    receptive field stays inside the image. A plain flip does not (it is a cell off). This is what checks
    ``stride`` and ``cell_origin`` against the real layers; ``fine``: the same on the grid of half the stride
    (``saliency_grid: fine_at_inference``), mirrored about its own cell centres."""
    from mammogmic.models.roi import reflect_on_cells

    torch.manual_seed(0)
    width = 4 if arch == "resnet10" else 2
    config = GMICConfig(
        global_arch=arch, global_stride=stride, global_width=width, local_width=4, crop_size=(64, 64)
    )
    model = GMIC(config).eval()
    hw = (512, 320) if arch == "resnet10" else (1024, 640)
    x = torch.randn(1, 1, *hw)
    net = model.global_net
    cell = net.stride // 2 if fine else net.stride

    def disagreement(mirrored_input: torch.Tensor, dims: tuple[int, ...]) -> float:
        with torch.no_grad():
            own = net(x, fine=fine)
            back = net(mirrored_input, fine=fine).flip(dims)
        h, w = own.shape[-2:]
        # cells away from every border: as many pixels at stride 16 as at 32, and on the finer grid as on the own
        m = max(3, 96 // net.stride) * (net.stride // cell)
        inner = (slice(None), slice(None), slice(m, h - m), slice(m, w - m))
        return float((own - back)[inner].abs().max() / own[inner].abs().max())

    with torch.no_grad():
        grid = tuple(net(x, fine=fine).shape[-2:])
    all_dims = [(-2, -1), (-2,), (-1,)]
    for dims in all_dims:  # random kernels are not symmetric
        assert disagreement(reflect_on_cells(x, grid, cell, net.cell_origin, dims), dims) > 0.1
    _symmetrise_kernels(net)
    for dims in all_dims:
        mirrored = reflect_on_cells(x, grid, cell, net.cell_origin, dims)
        # ResNet-22's receptive field reaches the borders from every cell of this small input: a small remainder.
        assert disagreement(mirrored, dims) < (1e-4 if arch == "resnet10" else 1e-2)
        assert disagreement(x.flip(dims), dims) > 0.1
        if net.cell_origin:  # the 2-pixel origin matters
            assert disagreement(reflect_on_cells(x, grid, cell, 0, dims), dims) > 0.1
        if fine:  # about the network's own cell centres, the finer grid's map is half a fine cell off
            coarse = tuple(net(x).shape[-2:])
            assert disagreement(reflect_on_cells(x, coarse, net.stride, net.cell_origin, dims), dims) > 0.1


def _symmetric_and_plain(symmetry: str) -> tuple[GMIC, GMIC, torch.Tensor]:
    """A tiny GMIC with ``saliency_symmetry``, the same weights without it (the option adds no parameters), both
    in eval mode, and a batch of two 512x320 inputs (a 16x10 grid of stride 32)."""
    torch.manual_seed(0)
    cfg = SMALL_V1
    model = GMIC(cfg.replace(saliency_symmetry=symmetry)).eval()
    plain = GMIC(cfg).eval()
    plain.load_state_dict(model.state_dict())
    return model, plain, torch.randn(2, 1, 512, 320)


def test_point_symmetric_saliency_is_equivariant_and_costs_one_more_global_pass() -> None:
    from mammogmic.models.roi import point_reflect

    model, plain, x = _symmetric_and_plain("point")
    cfg = plain.config
    turned = point_reflect(x, (16, 10), 32)
    with torch.no_grad():
        own, back = model(x).saliency, model(turned).saliency.flip(-2, -1)
        single, single_back = plain(x).saliency, plain(turned).saliency.flip(-2, -1)
    inner = (slice(None), slice(None), slice(0, 12), slice(0, 6))  # cells the shifted-in edge cannot reach
    assert torch.allclose(own[inner], back[inner], atol=1e-6)  # random weights, yet equivariant
    assert not torch.allclose(single[inner], single_back[inner], atol=1e-2)
    assert torch.allclose(own, (single + single_back) / 2, atol=1e-6)
    with pytest.raises(ConfigError, match="saliency_symmetry"):
        GMICConfig(saliency_symmetry="mirror")

    # At inference only, and the geometric mean: the paper's maps while training, in eval mode only what both
    # orientations mark (still point-symmetric), same parameters.
    at_inference = GMIC(cfg.replace(saliency_symmetry="point_at_inference"))
    at_inference.load_state_dict(model.state_dict())
    with torch.no_grad():
        agreed, agreed_back = at_inference.eval()(x).saliency, at_inference(turned).saliency.flip(-2, -1)
        assert torch.allclose(agreed, (single * single_back).sqrt(), atol=1e-6)
        assert torch.allclose(agreed[inner], agreed_back[inner], atol=1e-6)
        assert torch.equal(at_inference.train().forward_global(x)[1], plain.train().forward_global(x)[1])


@pytest.mark.parametrize("grid", ["native", "fine_at_inference"])
def test_flips_at_inference_keep_what_every_mirror_image_marks(grid: str) -> None:
    from mammogmic.models.roi import reflect_on_cells

    model, plain, x = _symmetric_and_plain("flips_at_inference")
    model.config = model.config.replace(saliency_grid=grid)
    plain.config = plain.config.replace(saliency_grid=grid)
    fine = grid == "fine_at_inference"
    cells, cell = (
        ((32, 20), 16) if fine else ((16, 10), 32)
    )  # mirrored about the centres of the grid it reads
    all_dims = [(), (-1,), (-2,), (-2, -1)]
    with torch.no_grad():
        views = [plain(reflect_on_cells(x, cells, cell, 0, d)).saliency.flip(d) for d in all_dims]
        agreed = model(x).saliency
        assert agreed.shape[-2:] == cells
        assert torch.allclose(agreed, torch.stack(views).prod(dim=0) ** 0.25, atol=1e-6)
        # equivariant under each mirroring on the cells the shifted-in edges cannot reach, random weights
        inner = (slice(None), slice(None), slice(0, 12 * cells[0] // 16), slice(0, 6 * cells[1] // 10))
        for dims in all_dims[1:]:
            back = model(reflect_on_cells(x, cells, cell, 0, dims)).saliency.flip(dims)
            assert torch.allclose(agreed[inner], back[inner], atol=1e-6)
            assert not torch.allclose(views[0][inner], views[all_dims.index(dims)][inner], atol=1e-2)
        # training reads the paper's maps
        assert torch.equal(model.train().forward_global(x)[1], plain.train().forward_global(x)[1])


def test_stride_16_global_network_has_the_same_parameters_and_a_finer_grid() -> None:
    torch.manual_seed(0)
    cfg = SMALL_V1
    coarse, fine = GMIC(cfg), GMIC(cfg.replace(global_stride=16))
    assert {k: v.shape for k, v in fine.state_dict().items()} == {
        k: v.shape for k, v in coarse.state_dict().items()
    }
    fine.load_state_dict(coarse.state_dict())
    assert fine.global_net.stride == 16 and coarse.global_net.stride == 32
    x = torch.randn(2, 1, 512, 320)
    with torch.no_grad():
        out_fine, out_coarse = fine.eval()(x), coarse.eval()(x)
    assert out_fine.saliency.shape == (2, 2, 32, 20) and out_coarse.saliency.shape == (2, 2, 16, 10)
    # Up to layer3 the two networks are one network: layer4 alone changes its stride.
    net_f, net_c = fine.global_net, coarse.global_net
    with torch.no_grad():
        stem = net_f.layer3(net_f.layer2(net_f.layer1(net_f.maxpool(net_f.relu(net_f.bn1(net_f.conv1(x)))))))
        stem_c = net_c.layer3(
            net_c.layer2(net_c.layer1(net_c.maxpool(net_c.relu(net_c.bn1(net_c.conv1(x))))))
        )
    assert torch.equal(stem, stem_c)
    assert ((out_fine.patch_locations >= 0) & (out_fine.patch_locations <= torch.tensor([448, 256]))).all()
    with pytest.raises(ConfigError, match="global_stride"):
        GMICConfig(global_stride=16)  # ResNet-22 keeps the official stride 64


def _geometry(module: torch.nn.Module) -> tuple[object, ...]:
    return tuple(getattr(module, name, None) for name in ("stride", "padding", "dilation"))


@pytest.mark.parametrize("arch", ["resnet10", "resnet18", "resnet50", "resnet22"])
def test_fine_grid_is_the_trunk_on_the_input_shifted_by_half_a_cell(arch: str) -> None:
    """``forward(x, fine=True)``: even cells are the trunk's own cells (to float rounding: a stride-1 convolution
    sums in another order than a stride-2 one); odd rows / columns are the
    trunk's cells on the input shifted by half its stride (down, right, both), on the cells whose receptive field
    stays clear of the borders. Covers the stride-2 block (ResNet-10), later dilated blocks (ResNet-18),
    bottlenecks (ResNet-50) and the pre-activation global network (ResNet-22, stride 64)."""
    from mammogmic.models.resnet import ResNet22, ResNetV1

    torch.manual_seed(0)
    net = (ResNet22(1, 2) if arch == "resnet22" else ResNetV1(arch, 1, 4)).eval()
    half = net.stride // 2
    before, keys = [_geometry(m) for m in net.modules()], list(net.state_dict())
    x = torch.randn(1, 1, 32 * net.stride, 20 * net.stride)  # a 32x20 grid of the trunk's own cells
    with torch.no_grad():
        own, fine = net(x), net(x, fine=True)
        assert fine.shape[-2:] == (64, 40)
        assert torch.allclose(fine[..., ::2, ::2], own, atol=1e-5 * float(own.abs().max()))
        m = 7  # cells from every border
        for down, right in ((1, 0), (0, 1), (1, 1)):
            shifted = net(x[..., half * down :, half * right :])
            between = fine[..., down::2, right::2][..., : shifted.shape[-2], : shifted.shape[-1]]
            inner = (slice(None), slice(None), slice(m, -m), slice(m, -m))
            scale = shifted[inner].abs().max()
            assert float((between - shifted)[inner].abs().max() / scale) < 1e-5, (down, right)
            assert float((between[inner] - own[inner]).abs().max() / scale) > 0.1  # not the own cells again
    # a view: the trunk keeps its layers' geometry and its parameters
    assert [_geometry(m) for m in net.modules()] == before
    assert list(net.state_dict()) == keys
    with pytest.raises(ValueError, match="does not stride"):
        ResNetV1("resnet10", 1, 4, stride=16)(x[..., :256, :160], fine=True)


def test_fine_grid_at_inference_refines_the_maps_and_leaves_training_alone() -> None:
    from mammogmic.models import fuse_for_inference

    torch.manual_seed(0)
    cfg = SMALL_V1.replace(patch_alignment="centered")
    model, plain = GMIC(cfg.replace(saliency_grid="fine_at_inference")).eval(), GMIC(cfg).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 512, 320)
    with torch.no_grad():
        out, own = model(x), plain(x)
        assert out.saliency.shape == (2, 2, 32, 20) and out.h_g.shape[-2:] == (32, 20)
        assert torch.allclose(out.saliency[..., ::2, ::2], own.saliency, atol=1e-6)
        # patches are cut where the finer map points: inside the image, on the 16-pixel grid
        assert ((out.patch_locations >= 0) & (out.patch_locations <= torch.tensor([448, 256]))).all()
        assert not torch.equal(out.patch_locations, own.patch_locations)
        assert torch.allclose(fuse_for_inference(model)(x).saliency, out.saliency, atol=1e-5)
        assert torch.equal(model.train().forward_global(x)[1], plain.train().forward_global(x)[1])
    with pytest.raises(ConfigError, match="saliency_grid: fine_at_inference halves"):
        cfg.replace(global_stride=16, saliency_grid="fine_at_inference")
    with pytest.raises(ConfigError, match="saliency_grid"):
        GMICConfig(saliency_grid="fine")


def test_top_t_fusion_pooling_trains_every_top_cell_of_a_feature(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``fusion_pooling: top_t`` feeds the fusion head each feature's mean over its top ``t·h·w`` cells, so its
    gradient reaches those cells; ``max`` (the paper) reaches one cell per feature."""
    from mammogmic import load_model, save_model
    from mammogmic.models.roi import top_t_count, top_t_pool

    torch.manual_seed(0)
    cfg = SMALL_V1.replace(percent_t=0.1)
    x = torch.randn(2, 1, 512, 320)
    k = top_t_count(16, 10, 0.1)
    for pooling, cells in (("max", 1), ("top_t", k)):
        model = GMIC(cfg.replace(fusion_pooling=pooling)).eval()
        out = model(x)
        out.h_g.retain_grad()
        out.logits_fusion.sum().backward()
        grad = out.h_g.grad
        assert grad is not None
        touched = (grad != 0).flatten(2).sum(dim=2)  # (N, D_g) cells per feature
        # features whose top `cells` cells are unambiguous (a ReLU-dead feature ties everywhere)
        top = out.h_g.detach().flatten(2).sort(dim=2, descending=True).values
        clear = top[:, :, cells - 1] > top[:, :, cells]
        assert int(clear.sum()) >= 20
        assert torch.equal(touched[clear], torch.full_like(touched[clear], cells)), pooling
        if pooling == "top_t":
            pooled = top_t_pool(out.h_g.detach(), 0.1)
            expected = model.fusion(torch.cat([pooled, out.z.detach()], dim=1))
            assert torch.allclose(out.logits_fusion.detach(), expected, atol=1e-6)
            path = save_model(model, tmp_path / "m.safetensors")
            assert load_model(path).config.fusion_pooling == "top_t"
    assert GMICConfig().fusion_pooling == "max"  # the released models
    with pytest.raises(ConfigError, match="fusion_pooling"):
        GMICConfig(fusion_pooling="mean")


def test_fusion_saliency_head_maps_are_the_fusion_heads_class_activation_maps(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``saliency_head: fusion``: each map is the fusion layer's weights for ``h_g`` applied cell by cell, the
    global loss trains those weights, and copies (save/load, inference preparation) keep the tie."""
    import copy

    from mammogmic import load_model, save_model
    from mammogmic.models.fuse import prepare_for_inference
    from mammogmic.training.finetune import apply_freeze

    torch.manual_seed(0)
    cfg = SMALL_V1.replace(fusion_pooling="top_t", saliency_head="fusion")
    model = GMIC(cfg).eval()
    assert not any(k.startswith("saliency_head") for k in model.state_dict())
    x = torch.randn(2, 1, 512, 320)
    out = model(x)
    d = cfg.global_dim
    cam = torch.einsum("cd,ndhw->nchw", model.fusion.weight[:, :d], out.h_g)
    assert torch.allclose(out.saliency, torch.sigmoid(cam), atol=1e-6)
    # the maps' loss reaches the fusion layer's global columns, and only those
    out.y_global.sum().backward()
    grad = model.fusion.weight.grad
    assert grad is not None and bool((grad[:, :d] != 0).any()) and bool((grad[:, d:] == 0).all())
    # with a head of its own, the global loss never reaches the fusion layer
    own = GMIC(cfg.replace(saliency_head="own")).eval()
    own(x).y_global.sum().backward()
    assert own.fusion.weight.grad is None and own.saliency_head.weight.grad is not None

    loaded = load_model(save_model(model, tmp_path / "m.safetensors"))
    assert loaded.config.saliency_head == "fusion"
    with torch.no_grad():
        assert torch.equal(loaded(x).saliency, model(x).saliency)
        for copied in (copy.deepcopy(model), prepare_for_inference(model, bf16=True)):
            assert copied.saliency_head.__dict__["_fusion"] is copied.fusion  # type: ignore[union-attr]
            before = copied(x).saliency
            model.fusion.weight.add_(1.0)  # the original's weights are not the copy's
            assert torch.equal(copied(x).saliency, before)
            copied.fusion.weight.mul_(-1.0)  # the copy's own are
            assert not torch.allclose(copied(x).saliency, before)
    with pytest.raises(ConfigError, match="no weights of its own.*freeze 'fusion'"):
        apply_freeze(model, ["saliency"])
    with pytest.raises(ConfigError, match="saliency_head"):
        GMICConfig(saliency_head="shared")
