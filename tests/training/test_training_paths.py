"""Training options that change how a step is computed, not what it computes: activation checkpointing,
channels-last, bf16 autocast; and the bookkeeping of ``keep_top_k``."""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from training_helpers import BlobImages, tiny_config

from mammogmic.models import load_model, read_model_metadata
from mammogmic.training.loop import Trainer, _build_loss, build_model, enable_activation_checkpointing


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def test_activation_checkpointing_same_outputs_and_gradients() -> None:
    cfg = tiny_config()
    torch.manual_seed(0)
    plain = build_model(cfg)
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()
    data = BlobImages(4)
    x = torch.stack([data.load(i)["image"] for i in range(4)])
    y = torch.stack([data.load(i)["labels"] for i in range(4)])
    loss_fn = _build_loss(cfg)
    # Validation of a model that reads a finer grid in eval mode passes the backbone's own keyword through
    # (before training: recomputation updates the BN statistics a second time).
    with torch.no_grad():
        native = plain.eval()(x).saliency
        for model in (plain, checkpointed):
            model.config = model.config.replace(saliency_grid="fine_at_inference")
        fine_a, fine_b = plain.eval()(x).saliency, checkpointed.eval()(x).saliency
        for model in (plain, checkpointed):
            model.config = model.config.replace(saliency_grid="native")
    torch.testing.assert_close(fine_b, fine_a, rtol=0, atol=0)
    assert all(2 * n - 1 <= f <= 2 * n for f, n in zip(fine_a.shape[-2:], native.shape[-2:], strict=True))
    results = []
    for model in (plain, checkpointed):
        stem = _count_calls(model.global_net.stem_conv)
        local_stem = _count_calls(model.local_net.conv1)
        model.train()
        out = model(x)
        loss = loss_fn(out, y).total
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((out, float(loss.detach()), grads, stem[0], local_stem[0]))
    (out_a, loss_a, grads_a, stem_a, local_a), (out_b, loss_b, grads_b, stem_b, local_b) = results
    # Checkpointing really ran: both backbones were computed again during backward.
    assert (stem_a, local_a) == (1, 1) and (stem_b, local_b) == (2, 2)
    assert loss_a == loss_b
    for field in ("y_global", "y_local", "y_fusion", "saliency", "patch_attention"):
        torch.testing.assert_close(getattr(out_b, field), getattr(out_a, field), rtol=0, atol=0)
    assert torch.equal(out_a.patch_locations, out_b.patch_locations)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(plain.parameters()))
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_copy_of_a_checkpointed_model_runs_its_own_weights() -> None:
    """Validation scores a fused copy of the model being trained (``scoring_copy``): with activation checkpointing
    on, the copy must compute with its own (folded) weights, and leave the trained model's mode and batch-norm
    statistics alone."""
    from mammogmic.models import scoring_copy

    torch.manual_seed(0)
    plain = build_model(tiny_config())
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    data = BlobImages(4)
    x = torch.stack([data.load(i)["image"] for i in range(4)])
    with torch.no_grad():
        plain.train()(x)  # batch statistics that differ from the initial running ones
        checkpointed.train()(x)
    buffers = {k: v.clone() for k, v in checkpointed.state_dict().items()}
    with torch.inference_mode():
        ours, theirs = scoring_copy(checkpointed)(x), scoring_copy(plain)(x)
        twin = copy.deepcopy(checkpointed)
        for p in twin.parameters():
            p.mul_(0.5)
        halved, original = twin.eval()(x), checkpointed.eval()(x)
    assert torch.equal(ours.saliency, theirs.saliency) and torch.equal(ours.y_fusion, theirs.y_fusion)
    assert all(torch.equal(v, checkpointed.state_dict()[k]) for k, v in buffers.items())
    assert not torch.equal(halved.saliency, original.saliency)  # the copy's backbones use the copy's weights
    assert checkpointed.global_net.checkpointed and type(twin.global_net) is type(checkpointed.global_net)


def _one_step(run_dir: Path, **overrides: Any) -> tuple[torch.nn.Module, float]:
    """One optimizer step on 8 blob images; returns the model and the step's loss (from steps.csv)."""
    base = {
        "schedule.epochs": 1,
        "schedule.max_steps_per_epoch": 1,
        "data.val_split": "",
        "data.augment": False,
        "data.batch_size": 8,
    }
    trainer = Trainer(
        tiny_config(**base, **overrides), run_dir, train_images=BlobImages(8), tensorboard=False
    )
    trainer.fit()
    with open(run_dir / "steps.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert trainer.model is not None
    return trainer.model, float(row["loss"])


def test_channels_last_step_equals_nchw(tmp_path: Path) -> None:
    # SGD: a linear step, so equal gradients to float rounding give equal weights (Adam's first step,
    # lr * g / (|g| + eps), would magnify rounding differences of near-zero gradients).
    nchw, loss_a = _one_step(tmp_path / "a", **{"optim.name": "sgd", "optim.lr": 0.05})
    last, loss_b = _one_step(
        tmp_path / "b", **{"optim.name": "sgd", "optim.lr": 0.05, "runtime.channels_last": True}
    )

    # The option really converted the model. Kernels with one input channel or a 1x1 footprint count as
    # contiguous in both layouts, so only the others tell.
    def telling(model: torch.nn.Module) -> list[torch.Tensor]:
        return [
            p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1
        ]

    assert telling(last) and all(p.is_contiguous(memory_format=torch.channels_last) for p in telling(last))
    assert not any(p.is_contiguous(memory_format=torch.channels_last) for p in telling(nchw))
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    torch.manual_seed(0)
    start = build_model(tiny_config())
    moved = 0
    for (name, a), b, s in zip(nchw.named_parameters(), last.parameters(), start.parameters(), strict=True):
        # The updates agree to 1e-4 of the tensor's largest update (measured: <= 2.6e-5).
        step = float((a - s).detach().abs().max())
        torch.testing.assert_close(b - s, a - s, rtol=0, atol=1e-4 * step + 1e-9, msg=name)
        moved += int(step > 0)
    assert moved > len(list(start.parameters())) // 2  # the step changed the weights


def test_bf16_step_runs_is_finite_and_reproducible(tmp_path: Path) -> None:
    bf16, loss = _one_step(tmp_path / "a", **{"runtime.amp": "bf16"})
    again, loss_again = _one_step(tmp_path / "b", **{"runtime.amp": "bf16"})
    fp32, loss_fp32 = _one_step(tmp_path / "c")
    assert torch.isfinite(torch.tensor(loss)) and loss == loss_again
    torch.manual_seed(0)
    start = build_model(tiny_config())
    changed = [not torch.equal(p, s) for p, s in zip(bf16.parameters(), start.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2
    assert all(torch.isfinite(p).all() for p in bf16.parameters())
    # Same CPU, same threads, same code: the bf16 run repeats bit for bit (docs/training.md).
    for (name, a), b in zip(bf16.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b), name
    # bf16 really ran: its step differs from the float32 one, though only by rounding.
    assert loss != loss_fp32 and loss == pytest.approx(loss_fp32, rel=0.05)


def test_keep_top_k_holds_the_k_best_epochs(tmp_path: Path) -> None:
    cfg = tiny_config(**{"schedule.epochs": 4, "schedule.keep_top_k": 2, "optim.lr": 3e-3})
    Trainer(
        cfg, tmp_path, train_images=BlobImages(16), val_images=BlobImages(8, seed=1), tensorboard=False
    ).fit()
    with open(tmp_path / "epochs.csv", newline="") as fh:
        metric = {int(r["epoch"]): float(r["val_malignant_auroc"]) for r in csv.DictReader(fh)}
    assert len(metric) == 4
    # Best first; among equal values the earlier epoch (a stable sort), as the trainer keeps them.
    best = sorted(metric, key=lambda e: -metric[e])[:2]
    files = sorted((tmp_path / "top_k").glob("*.safetensors"))
    assert [f.name for f in files] == [f"epoch{e:03d}.safetensors" for e in sorted(best)]
    for epoch in best:
        extra = read_model_metadata(tmp_path / "top_k" / f"epoch{epoch:03d}.safetensors")["extra"]
        assert (extra["epoch"], extra["metric"]) == (epoch, pytest.approx(metric[epoch]))
    # The best of them is the run's best model.
    top = load_model(tmp_path / "top_k" / f"epoch{best[0]:03d}.safetensors").state_dict()
    for name, value in load_model(tmp_path / "best_model.safetensors").state_dict().items():
        assert torch.equal(top[name], value), name
