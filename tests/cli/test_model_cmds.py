from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mammogmic import GMIC, GMICConfig, load_model
from mammogmic.cli.main import main
from mammogmic.models import save_official_checkpoint


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "smoke" in capsys.readouterr().out


def test_smoke_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["smoke", "--input-size", "512", "320"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["saliency_shape"] == [1, 2, 8, 5]
    assert len(report["patch_locations"]) == 6
    assert all(0 <= p <= 1 for p in report["y_fusion"])


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same keys, and every tensor equal in dtype, shape and every value."""
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


def test_convert_both_ways_and_refuse_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = GMIC(GMICConfig())
    with torch.no_grad():  # non-default BatchNorm statistics, so that running stats are compared too
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.num_batches_tracked.fill_(7)
    official = save_official_checkpoint(model, tmp_path / "m.p")
    source = torch.load(official, weights_only=True)
    ours = tmp_path / "m.safetensors"
    assert main(["convert", str(official), str(ours), "--percent-t", "0.05"]) == 0
    converted = load_model(ours)
    assert converted.config.percent_t == 0.05  # type: ignore[union-attr]
    _assert_same_tensors(converted.state_dict(), model.state_dict())  # our names: the model we saved
    assert main(["convert", str(ours), str(tmp_path / "back.p"), "--to-official"]) == 0
    _assert_same_tensors(torch.load(tmp_path / "back.p", weights_only=True), source)  # official names
    before = official.read_bytes()
    assert main(["convert", str(ours), str(official), "--to-official"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert official.read_bytes() == before


def test_convert_official_fixture_round_trip(tmp_path: Path, fixtures_dir: Path) -> None:
    """The official release's own file -> .safetensors -> --to-official gives back all 258 tensors exactly."""
    source = fixtures_dir / "official_format_seed0.p"
    ours = tmp_path / "seed0.safetensors"
    assert main(["convert", str(source), str(ours), "--percent-t", "0.02"]) == 0
    back = tmp_path / "seed0_back.p"
    assert main(["convert", str(ours), str(back), "--to-official"]) == 0
    want = torch.load(source, weights_only=True)
    assert len(want) == 258
    _assert_same_tensors(torch.load(back, weights_only=True), want)
    recorded = (fixtures_dir / "state_dict_keys.tsv").read_text().splitlines()[1:]  # after the header
    assert sorted(line.split("\t")[0] for line in recorded) == sorted(want)
