"""Training loop: learning on a fixed batch, exact resume, non-finite loss handling, logs, early stopping."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from training_helpers import BlobImages, tiny_config

from mammogmic.errors import MammogmicError
from mammogmic.training.checkpoint import load_checkpoint
from mammogmic.training.loop import NonFiniteLossError, Trainer, _build_loss, build_model, build_optimizer


def test_loss_goes_down_on_a_fixed_batch() -> None:
    cfg = tiny_config(**{"optim.lr": 3e-3})
    torch.manual_seed(0)
    model = build_model(cfg)
    loss_fn = _build_loss(cfg)
    opt = build_optimizer(model, cfg)
    data = BlobImages(8)
    batch = [data.load(i) for i in range(8)]
    x = torch.stack([b["image"] for b in batch])
    y = torch.stack([b["labels"] for b in batch])
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = loss_fn(model(x), y).total
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path: Path) -> None:
    cfg = tiny_config(**{"schedule.epochs": 2, "schedule.checkpoint_every_steps": 1})
    full = Trainer(
        cfg,
        tmp_path / "full",
        train_images=BlobImages(16),
        val_images=BlobImages(8, seed=1),
        tensorboard=False,
    )
    full.fit()

    def stop_at_step_3(event: str, info: dict[str, Any]) -> None:
        if event == "step" and info["step"] == 3:  # mid-epoch 0 (4 steps per epoch)
            raise _Interrupt

    run = tmp_path / "cut"
    cut = Trainer(
        cfg,
        run,
        train_images=BlobImages(16),
        val_images=BlobImages(8, seed=1),
        tensorboard=True,
        callback=stop_at_step_3,
    )
    with pytest.raises(_Interrupt):
        cut.fit()
    state = load_checkpoint(run / "last.pt")["state"]
    assert state["global_step"] == 2 and state["epoch"] == 0 and state["batches_done"] == 2
    with pytest.raises(MammogmicError, match="--resume"):
        Trainer(cfg, run, train_images=BlobImages(16), tensorboard=False).fit()
    # TensorBoard reads a folder's event files in name order, and a name is the creation second, then host, pid
    # and a per-process writer counter compared as text (".10" < ".9"). A real resume is a later process and
    # second; in this one process the resumed file could sort first (seen once), so it is made a later second.
    second = int(time.time())
    while int(time.time()) == second:
        time.sleep(0.02)
    resumed = Trainer(
        cfg, run, train_images=BlobImages(16), val_images=BlobImages(8, seed=1), tensorboard=True
    )
    result = resumed.fit(resume=True)
    assert result.global_step == 8 and result.epochs_run == 2
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(run / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key in ("best_metric", "best_epoch", "global_step"):
        assert a["state"][key] == b["state"][key]

    def losses(path: Path) -> list[str]:
        with open(path, newline="") as fh:
            return [row["loss"] for row in csv.DictReader(fh)]

    assert losses(tmp_path / "full" / "steps.csv") == losses(run / "steps.csv")
    assert len(losses(run / "steps.csv")) == 8

    # TensorBoard: step 3 was logged before the kill and again after the resume; the resumed writer's
    # purge_step makes TensorBoard drop the first one, so every step shows once.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert len(list((run / "tensorboard").iterdir())) == 2  # one event file per process
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
        [float(v) for v in losses(run / "steps.csv")], rel=1e-6
    )
    assert [e.step for e in events.Scalars("epoch/train_loss")] == [4, 8]  # epochs on the step axis too


class _NaNAfter(BlobImages):
    """Returns NaN images from the ``after``-th load on (a batch of 4 => step 3 is the first bad one)."""

    def __init__(self, after: int) -> None:
        super().__init__(16)
        self.after = after
        self.loads = 0

    def load(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        sample = super().load(index, rng)
        self.loads += 1
        if self.loads > self.after:
            sample["image"] = torch.full_like(sample["image"], float("nan"))
        return sample


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    cfg = tiny_config(**{"schedule.checkpoint_every_steps": 1, "data.val_split": ""})
    trainer = Trainer(cfg, tmp_path, train_images=_NaNAfter(after=8), tensorboard=False)
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 3\b") as info:
        trainer.fit()
    assert "last.pt" in str(info.value)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["state"]["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_logs_and_checkpoints(tmp_path: Path) -> None:
    cfg = tiny_config(**{"schedule.epochs": 2})
    result = Trainer(
        cfg,
        tmp_path,
        train_images=BlobImages(16),
        val_images=BlobImages(8, seed=1),
        test_images=BlobImages(8, seed=2),
        tensorboard=True,
    ).fit()
    assert not result.stopped_early and result.epochs_run == 2 and result.global_step == 8
    for name in (
        "config.yaml",
        "last.pt",
        "best.pt",
        "best_model.safetensors",
        "steps.csv",
        "epochs.csv",
        "result.json",
    ):
        assert (tmp_path / name).is_file(), name
    assert any((tmp_path / "tensorboard").iterdir())
    with open(tmp_path / "epochs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert {"train_loss", "val_malignant_auroc", "val_loss", "lr", "seconds"} <= set(rows[0])
    with open(tmp_path / "steps.csv", newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == list(range(1, 9))
    assert set(result.test_metrics) >= {"malignant_auroc", "benign_auroc"}
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["config"] == cfg.to_dict()
    assert ckpt["optimizer"] is not None and ckpt["scheduler"] is not None and "torch" in ckpt["rng"]

    from mammogmic.models import load_model

    model = load_model(tmp_path / "best_model.safetensors")
    assert model.config == cfg.model


def test_early_stopping_after_patience(tmp_path: Path) -> None:
    # No malignant image in validation: the malignant AUROC is undefined, so no validation ever improves and
    # patience 2 stops the run after its second epoch.
    val = BlobImages(8, seed=3)
    val.labels[:, 1] = 0.0
    cfg = tiny_config(**{"schedule.epochs": 6, "schedule.patience": 2})
    result = Trainer(cfg, tmp_path, train_images=BlobImages(16), val_images=val, tensorboard=False).fit()
    assert result.stopped_early
    assert result.epochs_run == 2
    assert result.best_epoch is None and not (tmp_path / "best.pt").exists()


def test_grad_accumulation_matches_a_large_batch(tmp_path: Path) -> None:
    base = {
        "schedule.epochs": 1,
        "schedule.max_steps_per_epoch": 1,
        "data.val_split": "",
        "data.augment": False,
        "runtime.freeze_batchnorm": True,
    }
    big = Trainer(
        tiny_config(**base, **{"data.batch_size": 8}),
        tmp_path / "a",
        train_images=BlobImages(8),
        tensorboard=False,
    )
    big.fit()
    acc = Trainer(
        tiny_config(**base, **{"data.batch_size": 4, "runtime.grad_accum": 2}),
        tmp_path / "b",
        train_images=BlobImages(8),
        tensorboard=False,
    )
    acc.fit()
    assert big.model is not None and acc.model is not None
    for (name, p), q in zip(big.model.named_parameters(), acc.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_t_warm_up_falls_from_gap_to_the_models_t_then_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mammogmic.errors import ConfigError
    from mammogmic.training.loop import warmup_percent_t
    from mammogmic.training.loss import GMICLoss

    assert warmup_percent_t(0.0, 0.03) == 1.0
    assert warmup_percent_t(0.5, 0.04) == pytest.approx(0.2)
    assert warmup_percent_t(1.0, 0.03) is None
    seen: list[float | None] = []
    forward = GMICLoss.forward

    def spy(self: GMICLoss, out: Any, labels: torch.Tensor) -> Any:
        seen.append(self.percent_t)
        return forward(self, out, labels)

    monkeypatch.setattr(GMICLoss, "forward", spy)
    cfg = tiny_config(**{"schedule.epochs": 2, "schedule.t_warmup_epochs": 1})
    Trainer(
        cfg, tmp_path, train_images=BlobImages(16), val_images=BlobImages(8, seed=1), tensorboard=False
    ).fit()
    t = cfg.model.percent_t
    training = [1.0, t**0.25, t**0.5, t**0.75, None, None, None, None]  # 4 steps per epoch
    # Validation (after each epoch) computes its loss with the model's own pooling, even mid-warm-up.
    assert [v for v in seen if v is not None] == [v for v in training if v is not None]
    assert seen[:4] == training[:4] and seen[4] is None
    with pytest.raises(ConfigError, match="t_warmup_epochs"):
        tiny_config(**{"schedule.t_warmup_epochs": 1, "model.aggregation": "gap"})
    with pytest.raises(ConfigError, match="t_warmup_epochs"):
        tiny_config(**{"schedule.t_warmup_epochs": -1})


@pytest.mark.parametrize(("metric", "kept_epoch"), [("malignant_dice", 0), ("malignant_specific_dice", 1)])
def test_keep_best_dice_selects_on_best_dice_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metric: str, kept_epoch: int
) -> None:
    """Epoch 0's maps find more of the lesions but mark 90 % of the negative images; epoch 1's mark none. The
    paper's Dice keeps epoch 0, Dice times the unmarked share keeps epoch 1."""
    from mammogmic.evaluation.localization import specific_dice

    scripted = iter([(0.6, 0.9), (0.5, 0.0)])

    def validate(*args: Any, **kwargs: Any) -> dict[str, float]:
        dice, marked = next(scripted)
        return {
            "malignant_auroc": 0.5,
            "malignant_dice": dice,
            "malignant_negatives_marked": marked,
            "malignant_specific_dice": specific_dice(dice, marked),
        }

    monkeypatch.setattr(Trainer, "validate", validate)
    cfg = tiny_config(
        **{"schedule.epochs": 2, "schedule.keep_best_dice": True, "schedule.best_dice_metric": metric}
    )
    trainer = Trainer(cfg, tmp_path, train_images=BlobImages(8), val_images=BlobImages(4), tensorboard=False)
    result = trainer.fit()
    assert result.best_dice_epoch == kept_epoch
    assert result.best_dice == pytest.approx([0.6, 0.5][kept_epoch])
    assert (tmp_path / "best_dice_model.safetensors").is_file()
