"""ONNX export: the whole GMIC graph (patch retrieval included) run by onnxruntime equals PyTorch.

One export of the official-format fixture model through ``mammogmic export`` (the slow part: 1-1.5 minutes
on 2 shared cores), then the exported file is compared with our PyTorch model and with the official
release's recorded outputs on two fixture images, in one batch (the batch dimension is dynamic).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mammogmic import GMIC, BaselineConfig, GMICConfig, ResNetBaseline, save_model
from mammogmic.cli.main import main
from mammogmic.data.cache import sha256_file
from mammogmic.data.sample import OFFICIAL_CONTRACT
from mammogmic.errors import MammogmicError
from mammogmic.evaluation.inference import PrepareSettings, items_from_paths, load_member, prepare_item
from mammogmic.models import fuse_for_inference
from mammogmic.models.export import GMIC_OUTPUTS, OnnxSession, check_onnx, export_onnx, torch_outputs

IMAGES = ("0_L-CC", "1_R_CC")  # margins >= 1.9e-5 at every selection step (fixture README)
PROBABILITIES = ("y_fusion", "y_global", "y_local")


def _fixture_batch(fixtures_dir: Path) -> np.ndarray:
    """The two fixture images as predict prepares them: ``(2, 1, 2944, 1920)``."""
    paths = [fixtures_dir / "images" / "original" / f"{name}.png" for name in IMAGES]
    inputs = []
    for item in items_from_paths(paths):
        prepared = prepare_item(item, [OFFICIAL_CONTRACT], PrepareSettings())
        assert prepared.error is None, prepared.error
        inputs.append(prepared.inputs[0][0])  # (C, H, W) of the first (only) window
    return np.stack(inputs)


def _assert_report_of_a_passed_check(path: Path, report: dict) -> None:
    assert path.is_file() and report["onnx"] == str(path)
    assert report["input_shape"] == [2944, 1920] and report["outputs"] == list(GMIC_OUTPUTS)
    check = report["check"]
    assert check["images"] == 1 and check["same_patch_locations"] is True
    assert max(check["max_abs_difference"].values()) <= 1e-4


def _assert_matches_pytorch_and_official(session: OnnxSession, batch: np.ndarray, fixtures_dir: Path) -> None:
    got = session(batch)  # batch 2 here; the export's own check ran a batch of 1 (the batch is dynamic)
    model = load_member(fixtures_dir / "official_format_seed0.p", percent_t=0.02).model
    ref = torch_outputs(model, batch)
    for name in PROBABILITIES:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-4, rtol=0, err_msg=f"vs PyTorch: {name}")
    np.testing.assert_array_equal(got["patch_locations"], ref["patch_locations"])
    for i, image in enumerate(IMAGES):
        official = np.load(fixtures_dir / "expected" / f"{image}.npz")
        for name in PROBABILITIES:
            np.testing.assert_allclose(
                got[name][i], official[name][0], atol=1e-4, rtol=0, err_msg=f"vs official: {image} {name}"
            )
        np.testing.assert_array_equal(got["patch_locations"][i], official["patch_locations"][0])


def _assert_contract_and_provenance(session: OnnxSession, fixtures_dir: Path) -> None:
    meta = session.metadata
    assert session.input_shape == (2944, 1920)
    assert json.loads(meta["input_contract"]) == json.loads(json.dumps(OFFICIAL_CONTRACT.to_dict()))
    assert json.loads(meta["percent_t"]) == 0.02 and json.loads(meta["model_config"])["percent_t"] == 0.02
    assert meta["source_sha256"] == sha256_file(fixtures_dir / "official_format_seed0.p")
    assert meta["model_type"] == "gmic" and json.loads(meta["outputs"]) == list(GMIC_OUTPUTS)


def _assert_check_catches_a_different_model(session: OnnxSession, x: np.ndarray, fixtures_dir: Path) -> None:
    # Same weights, another t: only y_global moves (the prediction is the fusion head's).
    other = load_member(fixtures_dir / "official_format_seed0.p", percent_t=0.1).model
    check = check_onnx(other, session, [x])
    assert not check.ok and check.max_abs["y_global"] > 1e-3 and check.max_abs["y_local"] <= 1e-4


@pytest.mark.slow
@pytest.mark.fixtures
def test_fixture_model_export_end_to_end(
    fixtures_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One test, so that the 1-2 minute export runs once even when pytest-xdist spreads tests over workers."""
    out = tmp_path / "gmic.onnx"
    check = fixtures_dir / "images" / "original" / f"{IMAGES[0]}.png"
    model = fixtures_dir / "official_format_seed0.p"
    args = ["export", str(model), "--percent-t", "0.02", "--onnx", str(out), "--check-image", str(check)]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    _assert_report_of_a_passed_check(out, json.loads(captured.out))

    session = OnnxSession(out)
    batch = _fixture_batch(fixtures_dir)
    _assert_matches_pytorch_and_official(session, batch, fixtures_dir)
    _assert_contract_and_provenance(session, fixtures_dir)
    _assert_check_catches_a_different_model(session, batch[:1], fixtures_dir)
    with pytest.raises(ValueError, match=r"expected input \(N, C, 2944, 1920\), got \(1, 1, 512, 320\)"):
        session(np.zeros((1, 1, 512, 320), np.float32))


def test_export_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    assert main(["export", str(tmp_path / "m.safetensors"), "--onnx", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    with pytest.raises(FileExistsError):
        export_onnx(GMIC(GMICConfig(global_width=4, local_width=8, crop_size=(32, 32))), out, (256, 192))


def test_export_of_a_missing_model_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "nope.safetensors"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


def test_random_patch_selection_is_refused(tmp_path: Path) -> None:
    model = GMIC(GMICConfig(global_width=4, local_width=8, crop_size=(32, 32), patch_selection="random"))
    with pytest.raises(MammogmicError, match="patch_selection='random'"):
        export_onnx(model.eval(), tmp_path / "m.onnx", (256, 192))
    assert not (tmp_path / "m.onnx").exists()


def test_torch_outputs_are_the_model_outputs() -> None:
    torch.manual_seed(0)
    model = GMIC(GMICConfig(global_width=4, local_width=8, crop_size=(32, 32))).eval()
    x = torch.randn(2, 1, 256, 192)
    outs = torch_outputs(model, x.numpy())
    with torch.no_grad():
        direct = model(x)
    assert tuple(outs) == GMIC_OUTPUTS
    for name in GMIC_OUTPUTS:
        np.testing.assert_array_equal(outs[name], getattr(direct, name).numpy())


def test_export_without_onnx_extra_says_which_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # type: ignore[arg-type]  # as if not installed
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "m.safetensors"), "--onnx", str(out)]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime" in err and "pip install 'mammogmic[onnx]'" in err
    assert not out.exists()


def test_bad_check_image_is_exit_2_before_exporting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_model(
        GMIC(GMICConfig(global_width=4, local_width=8, crop_size=(32, 32))), tmp_path / "m.safetensors"
    )
    out = tmp_path / "m.onnx"
    args = ["export", str(model), "--onnx", str(out), "--check-image", str(tmp_path / "missing.png")]
    assert main(args) == 2
    assert "missing.png" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_baseline_exports_with_a_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = fuse_for_inference(ResNetBaseline(BaselineConfig(arch="resnet18", width=8)))
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 1, 128, 96)).astype(np.float32) for n in (1, 3)]
    result = export_onnx(model, tmp_path / "b.onnx", (128, 96), check_inputs=batches)
    assert result.outputs == ("prediction",) and result.check is not None and result.check.ok
    assert result.check.n_images == 4
    assert OnnxSession(result.path).metadata["model_type"] == "resnet_baseline"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("symmetry", "grid"),
    [
        ("point_at_inference", "native"),
        ("flips_at_inference", "native"),
        ("flips_at_inference", "fine_at_inference"),
    ],
)
def test_gmic_with_symmetric_maps_at_inference_exports(tmp_path: Path, symmetry: str, grid: str) -> None:
    # The demo's models read the geometric mean of the maps of the image and of its mirror images at inference,
    # on the finer grid: the extra global passes (flips, shifts, replicate padding) and the last stage's
    # stride-1 / dilated convolutions must be in the graph and give the same outputs.
    torch.manual_seed(0)
    cfg = GMICConfig(global_arch="resnet10", global_width=4, local_width=4, crop_size=(64, 64), num_patches=2)
    cfg = cfg.replace(saliency_symmetry=symmetry, saliency_grid=grid)
    model = fuse_for_inference(GMIC(cfg).eval())
    x = np.random.default_rng(0).standard_normal((2, 1, 512, 320)).astype(np.float32)
    result = export_onnx(model, tmp_path / "g.onnx", (512, 320), check_inputs=[x])
    assert result.check is not None and result.check.ok and result.check.same_locations
    plain = fuse_for_inference(GMIC(cfg.replace(saliency_symmetry="none", saliency_grid="native")).eval())
    plain.load_state_dict(model.state_dict())
    got, without = OnnxSession(result.path)(x), torch_outputs(plain, x)
    if grid == "native":
        assert not np.allclose(
            got["saliency"], without["saliency"], atol=1e-3
        )  # the turned pass is in the graph
    else:
        assert got["saliency"].shape[-2:] == (32, 20) and without["saliency"].shape[-2:] == (16, 10)


@pytest.mark.slow
def test_gmic_whose_maps_are_the_fusion_heads_exports(tmp_path: Path) -> None:
    # saliency_head: fusion reads the fusion layer's weights as a 1x1 convolution (a view, not a parameter of
    # its own): the graph must hold them once and give the same maps, with the demo's inference settings.
    torch.manual_seed(0)
    cfg = GMICConfig(
        global_arch="resnet10",
        global_width=4,
        local_width=4,
        crop_size=(64, 64),
        num_patches=2,
        fusion_pooling="top_t",
        saliency_head="fusion",
        saliency_symmetry="flips_at_inference",
        saliency_grid="fine_at_inference",
    )
    model = fuse_for_inference(GMIC(cfg).eval())
    x = np.random.default_rng(0).standard_normal((2, 1, 512, 320)).astype(np.float32)
    result = export_onnx(model, tmp_path / "g.onnx", (512, 320), check_inputs=[x])
    assert result.check is not None and result.check.ok and result.check.same_locations
    assert result.check.n_images == 2
