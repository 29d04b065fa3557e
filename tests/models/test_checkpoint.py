from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from mammogmic import GMIC, GMICConfig, load_model, load_official_checkpoint, save_model
from mammogmic.errors import CheckpointError
from mammogmic.models import BaselineConfig, ResNetBaseline, official_state_dict, save_official_checkpoint

TINY = GMICConfig(global_width=4, local_width=4, crop_size=(32, 32), attention_dim=8)


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        oa, ob = a.eval()(x), b.eval()(x)
    assert torch.equal(oa.y_fusion, ob.y_fusion)


def test_safetensors_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GMIC(TINY.replace(percent_t=0.05))
    path = save_model(model, tmp_path / "m.safetensors", metadata={"training_config": {"lr": 1e-5}})
    loaded = load_model(path)
    assert isinstance(loaded, GMIC) and loaded.config == model.config
    _same_outputs(model, loaded, torch.randn(1, 1, 256, 192))
    with pytest.raises(FileExistsError):
        save_model(model, path)


def test_baseline_round_trip(tmp_path: Path) -> None:
    model = ResNetBaseline(BaselineConfig(width=8))
    loaded = load_model(save_model(model, tmp_path / "b.safetensors"))
    assert isinstance(loaded, ResNetBaseline)
    _same_outputs(model, loaded, torch.randn(1, 1, 96, 64))


def test_official_export_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = GMIC(TINY)
    state = official_state_dict(model)
    assert "ds_net.layer_list.0.0.downsample.0.weight" in state and "fusion_dnn.bias" in state
    path = save_official_checkpoint(model, tmp_path / "model.p")
    loaded = load_official_checkpoint(path, percent_t=TINY.percent_t, config=TINY)
    _same_outputs(model, loaded, torch.randn(1, 1, 256, 192))


def test_resnet10_global_network_round_trips_but_has_no_official_form(tmp_path: Path) -> None:
    torch.manual_seed(2)
    config = TINY.replace(global_arch="resnet10")
    model = GMIC(config)
    blocks = [name for name, _ in model.global_net.named_children() if name.startswith("layer")]
    assert [len(getattr(model.global_net, name)) for name in blocks] == [1, 1, 1, 1]
    out = model.eval()(torch.randn(1, 1, 256, 192))
    assert out.saliency.shape[-2:] == (8, 6)  # stride 32, like ResNet-18
    loaded = load_model(save_model(model, tmp_path / "r10.safetensors"))
    assert loaded.config.global_arch == "resnet10"
    _same_outputs(model, loaded, torch.randn(1, 1, 256, 192))
    with pytest.raises(CheckpointError, match="resnet10 has no official equivalent"):
        save_official_checkpoint(model, tmp_path / "r10.p")
    assert not (tmp_path / "r10.p").exists()

    fine = GMIC(TINY.replace(global_arch="resnet18", global_stride=16))
    loaded = load_model(save_model(fine, tmp_path / "r18s16.safetensors"))
    assert loaded.config.global_stride == 16 and loaded.global_net.stride == 16
    _same_outputs(fine.eval(), loaded, torch.randn(1, 1, 256, 192))
    with pytest.raises(CheckpointError, match="global_stride 16 has no official equivalent"):
        save_official_checkpoint(fine, tmp_path / "r18s16.p")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("fusion_pooling", "top_t"),
        ("saliency_head", "fusion"),
        ("patch_alignment", "centered"),
        ("saliency_symmetry", "point"),
        ("saliency_symmetry", "point_at_inference"),
        ("saliency_symmetry", "flips_at_inference"),
        ("saliency_grid", "fine_at_inference"),
        ("aggregation", "gap"),
        ("attention", "uniform"),
        ("prediction", "local"),
        ("patch_selection", "random"),
    ],
)
def test_options_the_official_code_lacks_are_not_written_as_official_files(
    tmp_path: Path, field: str, value: str
) -> None:
    # A .p file holds weights only: loading it back (here or in the official code) would run them the released
    # way, e.g. max fusion pooling under weights trained with top-t pooling, and give other predictions.
    model = GMIC(TINY.replace(**{field: value}))
    with pytest.raises(CheckpointError, match=f"{field}: {value} has no official equivalent"):
        save_official_checkpoint(model, tmp_path / "m.p")
    assert not (tmp_path / "m.p").exists()
    # The official settings of the other fields still export (the round trip above covers the outputs).
    assert "fusion_dnn.weight" in official_state_dict(GMIC(TINY.replace(patch_overlap="official")))


def test_official_key_problems_are_named(tmp_path: Path) -> None:
    state = official_state_dict(GMIC(TINY))
    del state["fusion_dnn.bias"]
    state["mil_attn_V.weight"] = torch.zeros(3, 3)
    state["extra_head.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.p")
    with pytest.raises(CheckpointError, match="extra_head.weight"):
        load_official_checkpoint(tmp_path / "bad.p", config=TINY)
    del state["extra_head.weight"]
    torch.save(state, tmp_path / "bad2.p")
    with pytest.raises(
        CheckpointError,
        match=r"missing key\(s\): fusion\.bias \(fusion_dnn\.bias\).*attention\.V\.weight \(mil_attn_V\.weight\): file \(3, 3\)",
    ):
        load_official_checkpoint(tmp_path / "bad2.p", config=TINY)
    # The full-size architecture does not fit a tiny checkpoint: shapes are reported, not silently skipped.
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_official_checkpoint(tmp_path / "bad2.p")


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "sample_model_1.p"
    with open(bad, "wb") as f:
        pickle.dump({"ds_net.first_conv.weight": _Exploit(str(marker))}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_official_checkpoint(bad)
    torch.save({"model": _Exploit(str(marker))}, tmp_path / "zip.p")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_official_checkpoint(tmp_path / "zip.p")
    assert not marker.exists()


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_official_checkpoint(tmp_path / "missing.p")
    (tmp_path / "empty.p").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.p"):
        load_official_checkpoint(tmp_path / "empty.p")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_model(tmp_path / "garbage.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.p")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_official_checkpoint(tmp_path / "list.p")
