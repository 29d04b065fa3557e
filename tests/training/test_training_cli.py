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


def test_tune_is_resumable_and_exports_top_k(manifest: Path, tmp_path: Path) -> None:
    base = [
        "tune",
        "tiny_cpu",
        "--set",
        f"data.manifest={manifest}",
        "--set",
        "schedule.epochs=1",
        "--out",
        str(tmp_path),
        "--top-k",
        "2",
        "--no-progress",
    ]
    assert main([*base, "--trials", "2"]) == 0
    assert main([*base, "--trials", "3"]) == 0  # continues the stored study: one more trial
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trials"].get("COMPLETE", 0) + summary["trials"].get("PRUNED", 0) == 3
    top = json.loads((tmp_path / "top_k" / "top_k.json").read_text())
    assert 1 <= len(top) <= 2
    for entry in top:
        assert 10**-5.5 <= entry["lr"] <= 1e-4 and 10**-5.5 <= entry["beta"] <= 10**-3.5
        assert entry["percent_t"] in (0.02, 0.03, 0.05, 0.1)
        assert (tmp_path / "top_k" / entry["model"]).is_file()
    assert len(list((tmp_path / "trials").iterdir())) == 3
