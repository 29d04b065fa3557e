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


KILLED_TUNE = """
import os, sys
from mammogmic.training.config import load_config
from mammogmic.training.tune import TuneSettings, tune

def die_in_epoch_two(event, info):
    if event == "epoch" and info["epoch"] == 1:  # 0-based: after epoch two's log row, before its checkpoint
        os._exit(3)  # like a kill: no cleanup, the trial stays RUNNING in the study

config = load_config("tiny_cpu", [f"data.manifest={sys.argv[1]}", "schedule.epochs=3"])
tune(config, sys.argv[2], TuneSettings(n_trials=1), callback=die_in_epoch_two)
"""


def test_tune_trial_killed_mid_run_is_resumed_with_its_parameters(manifest: Path, tmp_path: Path) -> None:
    import csv
    import subprocess
    import sys

    import optuna

    from mammogmic.training.config import load_config
    from mammogmic.training.tune import TuneSettings, tune

    out = tmp_path / "study"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_TUNE, str(manifest), str(out)], capture_output=True, text=True
    )
    assert killed.returncode == 3, killed.stderr[-2000:]
    run_dir = out / "trials" / "trial_0000"
    assert (run_dir / "last.pt").is_file()  # the state after the first epoch

    config = load_config("tiny_cpu", [f"data.manifest={manifest}", "schedule.epochs=3"])
    summary = tune(config, out, TuneSettings(n_trials=1))
    assert summary["trials"].get("COMPLETE", 0) == 1
    study = optuna.load_study(study_name="gmic", storage=f"sqlite:///{(out / 'study.db').resolve()}")
    first, second = study.get_trials(deepcopy=False)
    assert first.state == optuna.trial.TrialState.FAIL and second.state == optuna.trial.TrialState.COMPLETE
    assert second.params == first.params  # the same point of the search, not a new draw
    assert second.user_attrs["run_dir"] == str(run_dir)  # continued in the interrupted trial's folder
    assert sorted((out / "trials").iterdir()) == [run_dir]
    with (run_dir / "epochs.csv").open() as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert epochs == [0, 1, 2]  # resumed after the first epoch: the second one's row written once, not twice
