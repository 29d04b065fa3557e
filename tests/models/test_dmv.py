"""DMV-CNN (four-view ResNet-22, view-wise and image-wise heads), its patch classifier (DenseNet with
TensorFlow "SAME" padding), and their checkpoint I/O, on tiny configurations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mammogmic.errors import CheckpointError, ConfigError
from mammogmic.models import (
    DMV_VIEWS,
    DMVConfig,
    DMVModel,
    PatchClassifier,
    PatchConfig,
    load_model,
    load_official_dmv_checkpoint,
    load_official_patch_classifier,
    save_model,
)
from mammogmic.models.dmv import ours_to_official_dmv
from mammogmic.models.patch import SameAvgPool2d, SameConv2d, SameMaxPool2d, same_padding
from mammogmic.models.resnet import ResNet22

TINY_PATCH = PatchConfig(growth_rate=4, block_config=(1, 2), num_init_features=8, bn_size=2)


def _views(n: int = 2, channels: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {v: torch.randn(n, channels, 96 if v.endswith("CC") else 112, 80, generator=g) for v in DMV_VIEWS}


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))  # type: ignore[union-attr]
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)  # type: ignore[union-attr]


@pytest.fixture
def view_model() -> DMVModel:
    torch.manual_seed(0)
    model = DMVModel(DMVConfig(width=2))
    _randomise_bn(model)
    return model.eval()


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="head"):
        DMVConfig(head="exam")
    with pytest.raises(ConfigError, match="in_channels"):
        DMVConfig(in_channels=2)
    assert DMVConfig.from_dict(DMVConfig(head="image").to_dict()) == DMVConfig(head="image")
    with pytest.raises(ConfigError, match="unknown field"):
        DMVConfig.from_dict({"heads": "view"})
    with pytest.raises(ConfigError, match="block_config"):
        PatchConfig(block_config=())


def test_view_wise_outputs(view_model: DMVModel) -> None:
    out = view_model(_views())
    assert set(out.log_probs) == {"CC", "MLO"}
    for lp in out.log_probs.values():
        assert lp.shape == (2, 4, 2)
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 4))
    # a label's probability: exp of column 1, averaged over the two view angles
    torch.testing.assert_close(
        out.predictions, (out.log_probs["CC"][..., 1].exp() + out.log_probs["MLO"][..., 1].exp()) / 2
    )


def test_view_wise_columns_are_shared_and_heads_see_left_then_right(view_model: DMVModel) -> None:
    x = _views(n=1)
    out = view_model(x)
    cc = torch.cat([view_model.features(x["L-CC"], "L-CC"), view_model.features(x["R-CC"], "R-CC")], 1)
    manual = F.log_softmax(view_model.output["cc"](F.relu(view_model.fc1["cc"](cc))).view(1, 4, 2), -1)
    torch.testing.assert_close(out.log_probs["CC"], manual)
    # the R-CC column is the L-CC column: the same image gives the same features on both sides
    torch.testing.assert_close(view_model.features(x["L-CC"], "R-CC"), view_model.features(x["L-CC"], "L-CC"))
    assert len(view_model.columns) == 2


def test_image_wise_outputs_and_single_images() -> None:
    torch.manual_seed(1)
    model = DMVModel(DMVConfig(head="image", width=2)).eval()
    x = _views()
    out = model(x)
    assert set(out.log_probs) == set(DMV_VIEWS)
    for view in DMV_VIEWS:
        assert out.log_probs[view].shape == (2, 2, 2)
        torch.testing.assert_close(model.forward_single(x[view], view), out.log_probs[view])
    p = {v: out.log_probs[v][..., 1].exp() for v in DMV_VIEWS}  # (N, 2): benign, malignant
    left, right = (p["L-CC"] + p["L-MLO"]) / 2, (p["R-CC"] + p["R-MLO"]) / 2
    torch.testing.assert_close(
        out.predictions, torch.stack([left[:, 0], right[:, 0], left[:, 1], right[:, 1]], 1)
    )


def test_bad_inputs_are_named(view_model: DMVModel) -> None:
    x = _views()
    del x["R-MLO"]
    with pytest.raises(ValueError, match="missing R-MLO"):
        view_model(x)
    with pytest.raises(ValueError, match=r"L-CC: expected input \(N, 1, H, W\)"):
        view_model(_views(channels=3))
    with pytest.raises(ValueError, match="image-wise"):
        view_model.forward_single(_views()["L-CC"], "L-CC")


def test_training_noise_only_in_training(view_model: DMVModel) -> None:
    x = _views(n=1)
    torch.testing.assert_close(view_model(x).predictions, view_model(x).predictions)
    view_model.train()
    view_model.columns.eval()  # BN statistics fixed: only the input noise differs between two calls
    assert not torch.equal(view_model(x).predictions, view_model(x).predictions)


def test_resnet22_banded_stem_without_padding() -> None:
    """The banded stem (no autograd) equals the plain stem for DMV-CNN's unpadded 7x7 convolution too."""
    torch.manual_seed(0)
    for pad in (0, 3):
        net = ResNet22(1, 2, stem_padding=pad).eval()
        x = torch.randn(1, 1, 203, 67)
        with torch.no_grad():
            banded = net.stem(x, tile_rows=4)
        with torch.enable_grad():
            plain = net.stem(x)
        torch.testing.assert_close(banded, plain.detach())


def _official_state(model: DMVModel) -> dict[str, torch.Tensor]:
    """``model`` in the official layout: shared columns under cc/mlo and again under l_*/r_*."""
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        name = ours_to_official_dmv(key)
        assert name is not None, key
        state[name] = value.clone()
        for side in ("l", "r"):
            for angle in ("cc", "mlo"):
                prefix = f"four_view_resnet.{angle}."
                if name.startswith(prefix):
                    state[f"four_view_resnet.{side}_{angle}." + name[len(prefix) :]] = value.clone()
    return state


@pytest.mark.parametrize("head,channels", [("view", 1), ("image", 3)])
def test_official_dmv_file_round_trip(tmp_path: Path, head: str, channels: int) -> None:
    torch.manual_seed(2)
    model = DMVModel(DMVConfig(head=head, in_channels=channels, width=2)).eval()
    path = tmp_path / "dmv.p"
    torch.save({"model": _official_state(model)}, path)
    loaded = load_official_dmv_checkpoint(path)
    assert loaded.config == DMVConfig(head=head, in_channels=channels, width=2)
    x = _views(channels=channels)
    torch.testing.assert_close(loaded(x).predictions, model(x).predictions, rtol=0, atol=0)


def test_official_dmv_file_errors(tmp_path: Path, view_model: DMVModel) -> None:
    good = _official_state(view_model)

    def load(state: dict[str, torch.Tensor]) -> None:
        path = tmp_path / "bad.p"
        torch.save({"model": state}, path)
        load_official_dmv_checkpoint(path)

    with pytest.raises(CheckpointError, match=r"four_view_resnet\.\{l_mlo\} missing"):
        load({k: v for k, v in good.items() if not k.startswith("four_view_resnet.l_mlo.")})
    differ = dict(good)
    differ["four_view_resnet.r_cc.final_bn.weight"] = differ["four_view_resnet.r_cc.final_bn.weight"] + 1
    with pytest.raises(
        CheckpointError, match=r"differ from the shared column: four_view_resnet\.r_cc\.final_bn\.weight"
    ):
        load(differ)
    with pytest.raises(CheckpointError, match="belong to no DMV-CNN module: extra.weight"):
        load({**good, "extra.weight": torch.zeros(1)})
    shape = dict(good)
    shape["fc1_cc.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"\(fc1_cc\.bias\): file \(3,\) vs model \(64,\)"):
        load(shape)
    with pytest.raises(CheckpointError, match="expected view-wise"):
        load({k: v for k, v in good.items() if not k.startswith("fc1_mlo")})
    missing = dict(good)
    del missing["output_layer_mlo.fc_layer.bias"]
    with pytest.raises(CheckpointError, match=r"missing key\(s\): \S+ \(output_layer_mlo\.fc_layer\.bias\)"):
        load(missing)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_official_dmv_checkpoint(tmp_path / "absent.p")


class _Exploit:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_official_files_are_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.p"
    torch.save({"model": _Exploit(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_official_dmv_checkpoint(path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_official_patch_classifier(path)
    assert not marker.exists()


def test_safetensors_round_trip(tmp_path: Path, view_model: DMVModel) -> None:
    save_model(view_model, tmp_path / "dmv.safetensors")
    loaded = load_model(tmp_path / "dmv.safetensors")
    assert isinstance(loaded, DMVModel) and loaded.config == view_model.config
    x = _views()
    torch.testing.assert_close(loaded(x).predictions, view_model(x).predictions, rtol=0, atol=0)
    torch.manual_seed(3)
    patch = PatchClassifier(TINY_PATCH).eval()
    save_model(patch, tmp_path / "patch.safetensors")
    loaded_patch = load_model(tmp_path / "patch.safetensors")
    assert isinstance(loaded_patch, PatchClassifier) and loaded_patch.config == TINY_PATCH
    p = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(loaded_patch(p), patch(p), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Patch classifier


@pytest.mark.parametrize(
    "size,kernel,stride,expected",
    [
        (256, 7, 2, (2, 3)),
        (128, 3, 2, (0, 1)),
        (64, 3, 1, (1, 1)),
        (64, 2, 2, (0, 0)),
        (65, 2, 2, (0, 1)),
        (65, 7, 2, (3, 3)),
        (8, 1, 1, (0, 0)),
    ],
)
def test_same_padding(size: int, kernel: int, stride: int, expected: tuple[int, int]) -> None:
    assert same_padding(size, kernel, stride) == expected
    out = (size + sum(expected) - kernel) // stride + 1
    assert out == -(-size // stride)  # "SAME": ceil(size / stride) outputs


def test_same_layers_pad_more_at_the_bottom_right() -> None:
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, 7, stride=2)
    x = torch.randn(1, 2, 32, 33)
    expected = F.conv2d(F.pad(x, (3, 3, 2, 3)), conv.weight, stride=2)  # W 33: (3, 3); H 32: (2, 3)
    torch.testing.assert_close(conv(x), expected)
    y = -torch.rand(1, 1, 4, 4) - 1  # all negative: a zero-padded max pool would return 0 at the border
    pooled = SameMaxPool2d(3, 2)(y)
    assert pooled.shape == (1, 1, 2, 2) and (pooled < 0).all()
    ones = torch.ones(1, 1, 5, 5)
    avg = SameAvgPool2d(2, 2)(ones)  # 5 -> 3, one padded row/column at the bottom/right, left out of the mean
    torch.testing.assert_close(avg, torch.ones(1, 1, 3, 3))


def test_patch_classifier_and_official_loader(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PatchClassifier(TINY_PATCH).eval()
    x = torch.randn(3, 1, 64, 64)
    assert model(x).shape == (3, 4)
    torch.testing.assert_close(model(x), model(x.expand(-1, 3, -1, -1)))  # 1 channel is repeated
    full = PatchClassifier()
    assert full.num_features == 1024 and full.classifier.out_features == 4
    keys = list(full.state_dict())
    assert keys[0] == "features.conv0.weight" and "features.denseblock4.denselayer16.conv2.weight" in keys
    assert sum(p.numel() for p in full.parameters()) == 6_957_956  # torchvision's DenseNet-121 with 4 classes
    # the official loader reads our names; num_batches_tracked may be absent (older files)
    state = {k: v for k, v in full.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "patch.p")
    loaded = load_official_patch_classifier(tmp_path / "patch.p")
    torch.testing.assert_close(loaded.classifier.weight, full.classifier.weight)
    state["features.conv0.weight"] = state["features.conv0.weight"][:, :1]
    torch.save(state, tmp_path / "bad.p")
    with pytest.raises(CheckpointError, match=r"features\.conv0\.weight: file \(64, 1, 7, 7\)"):
        load_official_patch_classifier(tmp_path / "bad.p")
