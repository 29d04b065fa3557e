"""The demo pipeline end to end at a toy size (the real demo's figures are measured, not tested here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mammogmic.errors import MammogmicError
from mammogmic.training.demo import DemoSettings, run_demo


def test_demo_writes_metrics_figures_and_keeps_data_inside(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    settings = DemoSettings(
        n_exams=8, size=(256, 160), epochs=1, workers=1, threads=1, amp="none", n_figures=2
    )
    run_demo(out, settings)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seconds"] > 0 and metrics["test"]["n_images"] > 0
    for key in ("malignant_auroc", "benign_auroc", "malignant_dice"):
        assert key in metrics["test"]
        value = metrics["test"][key]
        assert value is None or (0.0 <= value <= 1.0 and not math.isnan(value))
    assert (out / "data" / "manifest.csv").is_file() and (out / "run" / "last.pt").is_file()
    assert (out / "roc.png").is_file() and (out / "predictions.csv").is_file()
    assert len(metrics["report"]["figures"]) == 2
    assert all((out / f).is_file() for f in metrics["report"]["figures"])
    with pytest.raises(MammogmicError, match="already holds a demo run"):
        run_demo(out, settings)


def test_aligned_upsample_centres_each_cell_on_its_receptive_field() -> None:
    import torch

    from mammogmic.training.demo import aligned_upsample

    sal = torch.zeros(1, 1, 4, 3)
    sal[0, 0, 2, 1] = 1.0
    up = aligned_upsample(sal, (128, 96))[0, 0]
    # stride 32: the value of cell (2, 1) sits on pixel (64, 32), falls off linearly over one cell
    assert up.shape == (128, 96)
    assert float(up[64, 32]) == pytest.approx(1.0)
    assert float(up[80, 32]) == pytest.approx(0.5) and float(up[64, 48]) == pytest.approx(0.5)
    assert float(up[96, 32]) == pytest.approx(0.0) and float(up[64, 0]) == pytest.approx(0.0)
    peak = divmod(int(up.argmax()), 96)
    assert peak == (64, 32)
