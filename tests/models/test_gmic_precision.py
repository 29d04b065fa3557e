"""Scores stay float32 under bf16 autocast: the heads run in the model's precision, not rounded to bf16.

A bf16 sigmoid has 8 significant bits: a validation set's scores collapse onto a few dozen values (52 distinct
among 192 images in a bf16 run), tying images in the early-stopping AUROC.
"""

from __future__ import annotations

import torch

from mammogmic import GMIC, BaselineConfig, GMICConfig, ResNetBaseline

TINY = GMICConfig(global_width=4, local_width=4, crop_size=(32, 32), attention_dim=8)
N = 32


def _distinct(values: torch.Tensor) -> int:
    return int(torch.unique(values.detach()).numel())


def test_bf16_autocast_scores_are_float32_and_distinct() -> None:
    torch.manual_seed(0)
    model = GMIC(TINY.replace(prediction="average")).eval()  # every head is computed whatever the prediction
    x = torch.randn(N, 1, 128, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.h_g.dtype == torch.bfloat16  # the backbones did run in bf16
    for name in (
        "y_fusion",
        "y_global",
        "y_local",
        "prediction",
        "saliency",
        "logits_local",
        "logits_fusion",
    ):
        assert getattr(out, name).dtype == torch.float32, name
    for name in ("y_fusion", "y_global", "y_local", "prediction"):
        for column in range(2):
            assert _distinct(getattr(out, name)[:, column]) >= N - 1, (name, column)
    # Control: the same scores rounded to bf16 (what the heads gave before) do tie, so the count above can fail.
    assert _distinct(out.prediction[:, 1].bfloat16()) < N - 1


def test_bf16_autocast_baseline_scores_are_float32() -> None:
    torch.manual_seed(0)
    model = ResNetBaseline(BaselineConfig(arch="resnet18", width=4)).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(N, 1, 64, 48))
    assert out.prediction.dtype == torch.float32 and out.logits.dtype == torch.float32
    assert _distinct(out.prediction[:, 1]) >= N - 1


def test_bf16_autocast_training_step_backpropagates() -> None:
    from mammogmic.training.loss import GMICLoss

    torch.manual_seed(0)
    model = GMIC(TINY).train()
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = GMICLoss()(model(torch.randn(2, 1, 128, 96)), labels).total
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name


def test_bf16_cast_models_keep_heads_float32_and_close_scores() -> None:
    """cast_for_bf16: backbones in bf16, everything after them float32, scores near the float32 model's."""
    from mammogmic.models import cast_for_bf16, fuse_for_inference

    torch.manual_seed(0)
    cases = [
        (GMIC(TINY).eval(), torch.randn(4, 1, 128, 96), "global_net"),
        (
            ResNetBaseline(BaselineConfig(arch="resnet18", width=4)).eval(),
            torch.randn(4, 1, 64, 48),
            "backbone",
        ),
    ]
    for model, x, trunk in cases:
        cast = cast_for_bf16(fuse_for_inference(model))
        assert all(p.dtype == torch.bfloat16 for p in getattr(cast, trunk).parameters())
        heads = [p for n, p in cast.named_parameters() if not n.startswith((trunk, "local_net"))]
        assert heads and all(p.dtype == torch.float32 for p in heads)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # the original is untouched
        with torch.inference_mode():
            ours, ref = cast(x).prediction, model(x).prediction
        assert ours.dtype == torch.float32
        assert 0 < float((ours - ref).abs().max()) < 0.02, type(model).__name__
