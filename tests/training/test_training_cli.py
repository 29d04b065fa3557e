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


@pytest.mark.parametrize(
    "flag, value",
    [("--exams", "0"), ("--epochs", "0"), ("--workers", "0"), ("--threads", "0"), ("--seed", "-1")],
)
def test_demo_refuses_counts_below_one(
    flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Zero used to fall back silently to the default (``args.exams or 600``); it is a usage error now."""
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(tmp_path / "d"), flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and f"got '{value}'" in err
    assert not (tmp_path / "d").exists()


def test_demo_passes_given_values_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mammogmic.training.demo as demo

    seen = []

    def fake_run_demo(out: Path, settings: demo.DemoSettings, **kwargs: object) -> dict[str, object]:
        seen.append(settings)
        raise demo.MammogmicError("stop here")

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    args = ["demo", "--out", str(tmp_path / "d"), "--exams", "3", "--epochs", "1", "--workers", "1"]
    assert main([*args, "--seed", "0", "--threads", "1", "--amp", "none", "--no-progress"]) == 2
    (settings,) = seen
    assert (settings.n_exams, settings.epochs, settings.workers) == (3, 1, 1)
    assert (settings.seed, settings.threads, settings.amp) == (0, 1, "none")
    main(["demo", "--out", str(tmp_path / "e"), "--no-progress"])
    assert seen[1] == demo.DemoSettings()  # nothing given: the documented defaults


def test_demo_and_ablate_help_give_the_settings_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """The parsers leave the defaults to DemoSettings / AblationSettings (so ``--help`` stays torch-free) and
    only quote them: the quoted numbers must be the dataclasses' (the demo's epochs once changed without its
    help text)."""
    from mammogmic.training.ablate import AblationSettings
    from mammogmic.training.demo import DemoSettings

    quoted = {}
    for command in ("demo", "ablate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        quoted[command] = " ".join(capsys.readouterr().out.split())
    demo, ablation = DemoSettings(), AblationSettings()
    assert f"synthetic exams (default {demo.n_exams})" in quoted["demo"]
    assert f"training epochs (default {demo.epochs})" in quoted["demo"]
    assert f"seed (default {demo.seed})" in quoted["demo"]
    assert f"data-generation processes (default {demo.workers})" in quoted["demo"]
    assert f"(default {ablation.n_exams}, the demo's)" in quoted["ablate"]
    assert f"epochs per run (default {ablation.epochs}, the demo's)" in quoted["ablate"]
    assert f"K values of the k group (default {','.join(map(str, ablation.ks))};" in quoted["ablate"]
    assert ablation.epochs == demo.epochs and ablation.n_exams == demo.n_exams


def test_ablate_passes_given_settings_and_keeps_the_demo_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mammogmic.training.ablate as ablate
    from mammogmic.errors import MammogmicError
    from mammogmic.training.demo import DemoSettings

    seen = []

    def fake_run_ablations(out: Path, settings: ablate.AblationSettings, **kwargs: object) -> None:
        seen.append(settings)
        raise MammogmicError("stop here")

    monkeypatch.setattr(ablate, "run_ablations", fake_run_ablations)
    given = ["--epochs", "3", "--exams", "20", "--ks", "1,6", "--seeds", "4"]
    assert main(["ablate", "--out", str(tmp_path / "a"), *given, "--no-progress"]) == 2
    assert main(["ablate", "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert [(s.epochs, s.n_exams, s.ks, s.seeds) for s in seen] == [
        (3, 20, (1, 6), (4,)),
        (DemoSettings().epochs, DemoSettings().n_exams, ablate.AblationSettings().ks, (0, 1, 2)),
    ]
    assert main(["ablate", "--out", str(tmp_path / "c"), "--ks", "1,x", "--no-progress"]) == 2
    assert "--ks: expected comma-separated integers, got '1,x'" in capsys.readouterr().err
    assert len(seen) == 2
