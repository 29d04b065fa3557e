"""Stop signals and run folders: Ctrl-C saves and resumes exactly; stale or foreign logs are never appended to."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from training_helpers import BlobImages, tiny_config, write_blob_manifest

from mammogmic.errors import MammogmicError
from mammogmic.training.checkpoint import load_checkpoint
from mammogmic.training.loop import Trainer, TrainingInterrupted

SRC = Path(__file__).resolve().parents[2] / "src"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _trainer(cfg: Any, run: Path, **kwargs: Any) -> Trainer:
    return Trainer(
        cfg, run, train_images=BlobImages(16), val_images=BlobImages(8, seed=1), tensorboard=False, **kwargs
    )


def _send_at(step: int, signum: int, times: int = 1) -> Any:
    def callback(event: str, info: dict[str, Any]) -> None:
        if event == "step" and info["step"] == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)

    return callback


def test_sigint_in_first_epoch_saves_and_resume_is_bit_identical(tmp_path: Path) -> None:
    # No periodic checkpoints: before this change a Ctrl-C here left nothing to resume.
    cfg = tiny_config(**{"schedule.epochs": 2})
    assert cfg.schedule.checkpoint_every_steps is None
    full = _trainer(cfg, tmp_path / "full")
    full.fit()

    run = tmp_path / "cut"
    before = signal.getsignal(signal.SIGINT)
    cut = Trainer(
        cfg,
        run,
        train_images=BlobImages(16),
        val_images=BlobImages(8, seed=1),
        tensorboard=True,
        callback=_send_at(3, signal.SIGINT),  # a real SIGINT at step 3 of the 4 of epoch 0
    )
    with pytest.raises(TrainingInterrupted) as info:
        cut.fit()
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back
    exc = info.value
    assert isinstance(exc, KeyboardInterrupt)  # what `mammogmic tune` catches
    assert exc.signal_name == "SIGINT" and exc.global_step == 3 and exc.checkpoint == run / "last.pt"
    assert "--resume" in str(exc) and str(run / "last.pt") in str(exc)
    state = load_checkpoint(run / "last.pt")["state"]
    assert (state["epoch"], state["global_step"], state["batches_done"]) == (0, 3, 3)
    assert [int(r["step"]) for r in _rows(run / "steps.csv")] == [1, 2, 3]

    resumed = Trainer(
        cfg, run, train_images=BlobImages(16), val_images=BlobImages(8, seed=1), tensorboard=True
    )
    result = resumed.fit(resume=True)
    assert result.global_step == 8 and result.epochs_run == 2
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(run / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["state"]["best_metric"] == b["state"]["best_metric"]
    steps = _rows(run / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 9))  # no step twice
    assert [r["loss"] for r in steps] == [r["loss"] for r in _rows(tmp_path / "full" / "steps.csv")]
    assert [int(r["epoch"]) for r in _rows(run / "epochs.csv")] == [0, 1]


def test_second_sigint_aborts_at_once_without_saving(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGINT)
    trainer = _trainer(tiny_config(), tmp_path, callback=_send_at(2, signal.SIGINT, times=2))
    with pytest.raises(KeyboardInterrupt) as info:
        trainer.fit()
    assert not isinstance(info.value, TrainingInterrupted)
    assert not (tmp_path / "last.pt").exists()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_sigterm_and_sigusr1_stop_like_ctrl_c(tmp_path: Path, signum: int) -> None:
    previous = signal.getsignal(signum)
    trainer = _trainer(tiny_config(), tmp_path, callback=_send_at(1, signum))
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.signum == signum and info.value.global_step == 1
    assert load_checkpoint(tmp_path / "last.pt")["state"]["global_step"] == 1
    assert signal.getsignal(signum) is previous


def test_fit_in_a_thread_installs_no_handler(tmp_path: Path) -> None:
    # Signal handlers can only be set in the main thread; a trainer in a worker thread must still run.
    cfg = tiny_config(**{"schedule.epochs": 1, "schedule.max_steps_per_epoch": 1})
    errors: list[BaseException] = []

    def work() -> None:
        try:
            _trainer(cfg, tmp_path).fit()
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert errors == [] and (tmp_path / "result.json").is_file()


def test_stale_or_foreign_logs_are_refused_and_overwrite_moves_them(tmp_path: Path) -> None:
    class Killed(Exception):
        pass

    def kill_at_2(event: str, info: dict[str, Any]) -> None:
        if event == "step" and info["step"] == 2:
            raise Killed  # like a SIGKILL before the first checkpoint: logs, no last.pt

    cfg = tiny_config(**{"schedule.epochs": 1})
    run = tmp_path / "run"
    with pytest.raises(Killed):
        Trainer(cfg, run, train_images=BlobImages(16), tensorboard=True, callback=kill_at_2).fit()
    assert not (run / "last.pt").exists()
    old_steps = (run / "steps.csv").read_bytes()
    with pytest.raises(MammogmicError, match=r"steps\.csv, tensorboard/\) but no last\.pt.*--overwrite"):
        _trainer(cfg, run).fit()
    assert (run / "steps.csv").read_bytes() == old_steps  # untouched

    result = _trainer(cfg, run).fit(overwrite=True)
    assert result.global_step == 4
    (aside,) = run.glob("replaced-*")
    assert (aside / "steps.csv").read_bytes() == old_steps and (aside / "tensorboard").is_dir()
    assert [int(r["step"]) for r in _rows(run / "steps.csv")] == [1, 2, 3, 4]

    # An unrelated epochs.csv in an otherwise empty folder: refused (it used to swallow the epoch rows).
    other = tmp_path / "other"
    other.mkdir()
    (other / "epochs.csv").write_text("patient,score\np1,0.5\n")
    with pytest.raises(MammogmicError, match=r"earlier run \(epochs\.csv\)"):
        _trainer(cfg, other).fit()
    # ... and on resume, a log that is not ours is named instead of being rewritten.
    (run / "epochs.csv").write_text("patient,score\np1,0.5\n")
    with pytest.raises(MammogmicError, match=r"epochs\.csv: not a training log.*no 'epoch' column"):
        _trainer(cfg, run).fit(resume=True)
    assert (run / "epochs.csv").read_text() == "patient,score\np1,0.5\n"
    with pytest.raises(MammogmicError, match="pass only one"):
        _trainer(cfg, run).fit(resume=True, overwrite=True)


def test_epoch_log_keeps_columns_first_seen_later(tmp_path: Path) -> None:
    # Validation every 2nd epoch: epoch 0's row has no val_* column, epoch 1's has; the header widens.
    cfg = tiny_config(**{"schedule.epochs": 2, "schedule.val_every": 2, "schedule.max_steps_per_epoch": 1})
    _trainer(cfg, tmp_path).fit()
    rows = _rows(tmp_path / "epochs.csv")
    assert [r["val_malignant_auroc"] for r in rows][0] == ""
    assert float(rows[1]["val_malignant_auroc"]) >= 0.0 and rows[1]["val_loss"] != ""


def test_cli_sigterm_saves_exits_143_and_names_the_resume_command(tmp_path: Path) -> None:
    manifest = write_blob_manifest(tmp_path / "data", n_exams=4)
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "mammogmic.cli.main",
        "train",
        "tiny_cpu",
        "--no-progress",
        "--out",
        str(run),
    ]
    cmd += [
        "--set",
        f"data.manifest={manifest}",
        "--set",
        "schedule.epochs=1000",
        "--set",
        "data.test_split=",
    ]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ((run / "steps.csv").is_file() and len(_rows(run / "steps.csv")) >= 1):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted: SIGTERM: training stopped after" in err
    assert f"mammogmic train {run / 'config.yaml'} --out {run} --resume" in err
    assert out == ""  # no summary for a run that did not finish
    state = load_checkpoint(run / "last.pt")["state"]
    assert int(_rows(run / "steps.csv")[-1]["step"]) == state["global_step"]  # nothing logged past the save
