"""The train / tune command lines on a tiny PNG manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from training_helpers import write_blob_manifest

from mammogmic.cli.main import main


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_blob_manifest(tmp_path_factory.mktemp("blobs"), n_exams=8)


def test_train_command_writes_a_run_and_resumes(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = [
        "train",
        "tiny_cpu",
        "--set",
        f"data.manifest={manifest}",
        "--set",
        "schedule.epochs=1",
        "--out",
        str(run),
        "--no-progress",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["epochs_run"] == 1 and set(summary["test_metrics"]) >= {"malignant_auroc", "benign_auroc"}
    assert (run / "config.yaml").is_file() and (run / "best_model.safetensors").is_file()
    assert main(args) == 2  # refuses to overwrite an existing run
    assert "--resume" in capsys.readouterr().err
    assert main([*args[:-1], "--resume", "--no-progress"]) == 0


def test_train_command_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "tiny_cpu", "--set", "optim.lr=-3", "--out", str(tmp_path / "r")]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_run_config_trains_again_from_another_folder(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    monkeypatch.chdir(manifest.parent)  # the manifest given relative to the working folder
    short = ["--set", "schedule.epochs=1", "--set", "schedule.max_steps_per_epoch=2", "--no-progress"]
    args = [
        "train",
        "tiny_cpu",
        "--set",
        "data.manifest=manifest.csv",
        *short,
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(args) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert Path(saved["data"]["manifest"]) == manifest.resolve()  # absolute in the run record
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "../run/config.yaml", "--out", "other", "--no-progress"]) == 0
    assert (elsewhere / "other" / "best_model.safetensors").is_file()
