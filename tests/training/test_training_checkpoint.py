"""Checkpoints: atomic writes, safe loading, RNG round trip; the epoch sampler."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mammogmic.errors import CheckpointError
from mammogmic.training import checkpoint as ckpt_mod
from mammogmic.training.checkpoint import (
    atomic_torch_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from mammogmic.training.sampler import EpochSampler


def test_atomic_save_keeps_old_file_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "last.pt"
    model = torch.nn.Linear(3, 2)
    save_checkpoint(target, config={"a": 1}, model=model, state={"global_step": 1})
    before = target.read_bytes()

    def broken_save(obj: object, fh: object) -> None:
        fh.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, config={"a": 2}, model=model, state={"global_step": 2})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    monkeypatch.undo()
    assert load_checkpoint(target)["state"]["global_step"] == 1


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hand-written pickle is the point
def test_unsafe_or_foreign_files_are_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"format": "mammogmic-train", "model": _Evil()}, fh)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(evil)
    foreign = tmp_path / "foreign.pt"
    atomic_torch_save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a mammogmic training checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip() -> None:
    state = capture_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_balanced_sampler_takes_all_positives_and_as_many_negatives() -> None:
    positives = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
    s = EpochSampler(positives, balanced=True, seed=3)
    e0, e1 = s.epoch_indices(0), s.epoch_indices(1)
    for e in (e0, e1):
        assert sorted(i for i in e if positives[i]) == [0, 4]
        assert sum(not positives[i] for i in e) == 2 and len(set(e)) == 4
    assert not np.array_equal(np.sort(e0), np.sort(e1)) or not np.array_equal(e0, e1)
    assert np.array_equal(
        EpochSampler(positives, balanced=True, seed=3).epoch_indices(1), e1
    )  # deterministic


def test_sampler_shards_ranks_and_resumes() -> None:
    positives = np.zeros(7, dtype=bool)
    shards = [EpochSampler(positives, seed=1, rank=r, world_size=2).rank_indices(2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4
    assert set(shards[0]) | set(shards[1]) == set(range(7))
    s = EpochSampler(positives, seed=1)
    s.set_epoch(2, start=3)
    assert [i for i, _ in s] == list(s.epoch_indices(2)[3:]) and len(s) == 4
    assert all(epoch == 2 for _, epoch in s)
