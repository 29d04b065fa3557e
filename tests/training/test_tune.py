"""``tune``: a continued search never repeats itself, interrupted trials resume, top-k models are distinct."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import optuna
import pytest
from training_helpers import tiny_config, write_blob_manifest

import mammogmic.training.tune as tune_module
from mammogmic.cli.main import main
from mammogmic.errors import ConfigError
from mammogmic.training.config import TrainConfig, load_config
from mammogmic.training.tune import PARAM_NAMES, TrialSeededSampler, TuneSettings, search_space, tune

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_blob_manifest(tmp_path_factory.mktemp("blobs"), n_exams=8)


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="gmic", storage=f"sqlite:///{(out / 'study.db').resolve()}")


def _param_sets(study: optuna.Study, states: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
    return [tuple(t.params[n] for n in PARAM_NAMES) for t in study.get_trials(deepcopy=False, states=states)]


def _strict_json(path: Path) -> Any:
    def reject(token: str) -> None:
        raise AssertionError(f"{path.name}: invalid JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=reject)


class FakeTrainer:
    """Stands in for Trainer: 'trains' instantly; the weights are a function of (lr, beta, t) only."""

    def __init__(self, config: TrainConfig, run_dir: Path, callback: Any = None) -> None:
        self.config, self.run_dir = config, Path(run_dir)

    def fit(self, *, resume: bool = False) -> SimpleNamespace:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        key = f"{self.config.optim.lr!r} {self.config.loss.beta!r} {self.config.model.percent_t!r}"
        (self.run_dir / "best_model.safetensors").write_text(key)
        score = -abs(np.log10(self.config.optim.lr) + 4.75)  # best near lr = 10^-4.75
        return SimpleNamespace(best_metric=float(score), best_epoch=0)


# -- a continued search never repeats itself --------------------------------------------------------------
def test_search_continued_over_three_commands_tries_no_parameter_set_twice(
    manifest: Path, tmp_path: Path
) -> None:
    base = [
        "tune",
        "tiny_cpu",
        "--set",
        f"data.manifest={manifest}",
        "--set",
        "schedule.epochs=1",
        "--set",
        "schedule.max_steps_per_epoch=2",
        "--out",
        str(tmp_path),
        "--top-k",
        "3",
        "--no-progress",
    ]
    # Each command is a fresh process's work: a new sampler on the stored study.
    for total in (1, 2, 4):
        assert main([*base, "--trials", str(total)]) == 0
    study = _study(tmp_path)
    params = _param_sets(study)
    assert len(params) == 4 and len(set(params)) == 4  # Optuna's reseeded RandomSampler repeated trials 0, 1
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == [f"trial_000{i}" for i in range(4)]
    top = _strict_json(tmp_path / "top_k" / "top_k.json")
    assert len(top) == 3
    assert len({e["trial"] for e in top}) == 3
    assert len({(e["lr"], e["beta"], e["percent_t"]) for e in top}) == 3
    assert len({e["sha256"] for e in top}) == 3  # three different weight files, not one exported thrice
    assert [e["rank"] for e in top] == [1, 2, 3]
    for entry in top:
        assert (tmp_path / "top_k" / entry["model"]).is_file()
        assert 10**-5.5 <= entry["lr"] <= 1e-4 and 10**-5.5 <= entry["beta"] <= 10**-3.5
        assert entry["percent_t"] in (0.02, 0.03, 0.05, 0.1)
    summary = _strict_json(tmp_path / "summary.json")
    assert summary["trials"] == {"COMPLETE": 4} and summary["study"] == "study.db"
    assert all((tmp_path / e["model"]).is_file() for e in summary["top_k"])


def test_split_search_draws_the_same_points_as_one_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tune_module, "Trainer", FakeTrainer)
    config = tiny_config()
    for total in (2, 3, 6):
        tune(config, tmp_path / "split", TuneSettings(n_trials=total, top_k=2, seed=7))
    tune(config, tmp_path / "whole", TuneSettings(n_trials=6, top_k=2, seed=7))
    split, whole = _param_sets(_study(tmp_path / "split")), _param_sets(_study(tmp_path / "whole"))
    assert split == whole and len(set(split)) == 6
    other = tmp_path / "other_seed"
    tune(config, other, TuneSettings(n_trials=2, top_k=1, seed=8))
    assert not set(_param_sets(_study(other))) & set(whole)
    with pytest.raises(ConfigError, match="started with seed 8"):  # a study keeps its seed
        tune(config, other, TuneSettings(n_trials=3, seed=0))


def test_a_draw_that_repeats_a_stored_trial_is_drawn_again() -> None:
    settings = TuneSettings(seed=3)
    space = search_space(settings)
    sampler = TrialSeededSampler(space, seed=3)
    names = sorted(space)

    def draw(number: int, attempt: int) -> dict[str, Any]:
        rng = np.random.default_rng([3, number, attempt])
        return {n: tune_module._draw(rng, space[n], n) for n in names}

    study = optuna.create_study(sampler=sampler)
    study.enqueue_trial(draw(1, 0))  # trial 0 holds the point trial 1 would draw first
    for _ in range(2):
        trial = study.ask()
        trial.suggest_float("log10_lr", *settings.lr_log10)
        trial.suggest_float("log10_beta", *settings.beta_log10)
        trial.suggest_categorical("percent_t", list(settings.t_choices))
        study.tell(trial, 0.0)
    first, second = study.get_trials(deepcopy=False)
    assert first.params == draw(1, 0)
    assert second.params == draw(1, 1)  # re-drawn instead of repeating trial 0


# -- Ctrl-C ---------------------------------------------------------------------------------------------
def test_trial_stopped_by_ctrl_c_resumes_and_finishes_in_the_next_run(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(**{"data.manifest": str(manifest), "schedule.epochs": 3})
    events: list[int] = []

    def ctrl_c_in_epoch_two(event: str, info: dict[str, Any]) -> None:
        if event == "epoch":
            events.append(info["epoch"])
            if info["epoch"] == 1:  # after epoch two's log row, before its checkpoint: as SIGINT would land
                raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        tune(config, "search", TuneSettings(n_trials=2), callback=ctrl_c_in_epoch_two)
    out = tmp_path / "search"
    run_dir = out / "trials" / "trial_0000"
    assert (run_dir / "last.pt").is_file()
    (stopped,) = _study(out).get_trials(deepcopy=False)
    assert stopped.state == optuna.trial.TrialState.FAIL and stopped.user_attrs["interrupted"] is True

    # The next run, from another folder: the interrupted trial is retried with its parameters, in its folder.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    events.clear()

    def record(event: str, info: dict[str, Any]) -> None:
        if event == "epoch":
            events.append(info["epoch"])

    summary = tune(config, out, TuneSettings(n_trials=1), callback=record)
    assert events == [1, 2]  # continued after epoch one instead of starting over
    assert summary["trials"] == {"FAIL": 1, "COMPLETE": 1}
    first, retry = _study(out).get_trials(deepcopy=False)
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.params == first.params and retry.user_attrs["retry_of"] == 0
    assert retry.user_attrs["run_dir"] == "trials/trial_0000"  # relative to the search folder
    assert sorted((out / "trials").iterdir()) == [run_dir]
    with (run_dir / "epochs.csv").open() as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [0, 1, 2]
    # A third run continues with a fresh draw, not with the retried parameters.
    tune(config.replace(**{"schedule.epochs": 1}), out, TuneSettings(n_trials=2))
    complete = _param_sets(_study(out), states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 2 and len(set(complete)) == 2


def test_tune_command_exits_130_on_ctrl_c(
    manifest: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_module, "tune", interrupted)
    args = ["tune", "tiny_cpu", "--set", f"data.manifest={manifest}", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


# -- a killed process ---------------------------------------------------------------------------------
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
    import subprocess
    import sys

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
    study = _study(out)
    first, second = study.get_trials(deepcopy=False)
    assert first.state == optuna.trial.TrialState.FAIL and second.state == optuna.trial.TrialState.COMPLETE
    assert second.params == first.params  # the same point of the search, not a new draw
    assert (
        second.user_attrs["run_dir"] == "trials/trial_0000"
    )  # the interrupted trial's folder, relative to out
    assert sorted((out / "trials").iterdir()) == [run_dir]
    with (run_dir / "epochs.csv").open() as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert epochs == [0, 1, 2]  # resumed after the first epoch: the second one's row written once, not twice


# -- top-k --------------------------------------------------------------------------------------------------
def test_top_k_skips_repeated_trials_of_an_old_study(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tune_module, "Trainer", FakeTrainer)
    config = tiny_config()
    tune(config, tmp_path, TuneSettings(n_trials=2, top_k=1))
    study = _study(tmp_path)
    best = max(study.get_trials(deepcopy=False), key=lambda t: t.value)
    # What the old reseeded sampler produced: the best parameter set once more, in its own folder.
    study.enqueue_trial(dict(best.params))
    summary = tune(config, tmp_path, TuneSettings(n_trials=3, top_k=3))
    trials = [e["trial"] for e in summary["top_k"]]
    assert len(trials) == 2 and best.number in trials and 2 not in trials
    assert len({e["sha256"] for e in summary["top_k"]}) == 2
