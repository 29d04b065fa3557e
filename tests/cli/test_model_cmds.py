from __future__ import annotations

import json
from pathlib import Path

import pytest

from mammogmic import GMIC, GMICConfig, load_model
from mammogmic.cli.main import main
from mammogmic.models import save_official_checkpoint


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "smoke" in capsys.readouterr().out


def test_smoke_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["smoke", "--height", "512", "--width", "320"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["saliency_shape"] == [1, 2, 8, 5]
    assert len(report["patch_locations"]) == 6
    assert all(0 <= p <= 1 for p in report["y_fusion"])


def test_convert_both_ways_and_refuse_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    official = save_official_checkpoint(GMIC(GMICConfig()), tmp_path / "m.p")
    ours = tmp_path / "m.safetensors"
    assert main(["convert", str(official), str(ours), "--percent-t", "0.05"]) == 0
    assert load_model(ours).config.percent_t == 0.05  # type: ignore[union-attr]
    assert main(["convert", str(ours), str(tmp_path / "back.p"), "--to-official"]) == 0
    before = official.read_bytes()
    assert main(["convert", str(ours), str(official), "--to-official"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert official.read_bytes() == before
