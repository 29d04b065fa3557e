"""DistributedDataParallel on CPU (gloo, 2 processes) equals one process on the combined batch.

Why this can hold exactly: GMICLoss averages over the images of a batch and DDP averages gradients over ranks,
so with equal per-rank batches the all-reduced gradient equals the single-process gradient of the combined
batch. Batch norm in *training* mode would break this (each rank normalises with its own batch statistics), so
the test runs with ``runtime.freeze_batchnorm`` (running statistics used, as in eval mode); patch selection is
deterministic (saliency-guided), and augmentation is off. The optimizer is SGD (see OVERRIDES).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from training_helpers import BlobImages, tiny_config

from mammogmic.training.loop import Trainer

OVERRIDES = {
    "schedule.epochs": 1,
    "schedule.max_steps_per_epoch": 1,
    "data.val_split": "",
    "data.test_split": "",
    "data.augment": False,
    "runtime.freeze_batchnorm": True,
    # SGD: the update is linear in the gradient. Adam's first step is lr * g / (|g| + eps), which turns
    # float-rounding differences of near-zero gradients into visible parameter differences.
    "optim.name": "sgd",
    "optim.lr": 0.1,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
        }
    )
    torch.set_num_threads(1)
    cfg = tiny_config(**OVERRIDES, **{"data.batch_size": 2})
    trainer = Trainer(cfg, Path(out) / "ddp", train_images=BlobImages(4), tensorboard=False)
    try:
        trainer.fit()
        assert trainer.model is not None
        torch.save(trainer.model.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_step_equals_single_process_step_on_combined_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    single = Trainer(
        tiny_config(**OVERRIDES, **{"data.batch_size": 4}),
        tmp_path / "single",
        train_images=BlobImages(4),
        tensorboard=False,
    )
    single.fit()
    assert single.model is not None
    ref = single.model.state_dict()

    # Control: one process on only half of the batch ends elsewhere, so the comparison below can fail.
    half = Trainer(
        tiny_config(**OVERRIDES, **{"data.batch_size": 2}),
        tmp_path / "half",
        train_images=BlobImages(4),
        tensorboard=False,
    )
    half.fit()
    assert half.model is not None
    differs = any(
        not torch.allclose(v, half.model.state_dict()[k], atol=1e-6)
        for k, v in ref.items()
        if v.is_floating_point()
    )
    assert differs

    for key, value in ref.items():
        assert torch.equal(r0[key], r1[key]), f"ranks disagree on {key}"
        torch.testing.assert_close(r0[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert (tmp_path / "ddp" / "last.pt").is_file()
