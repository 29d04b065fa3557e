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
