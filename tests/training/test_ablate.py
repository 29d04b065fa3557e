"""``run_ablations``: head rows from one model, a diverged variant reported and skipped, resume without retraining."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mammogmic.data.synth.dataset import generate_dataset
from mammogmic.training import ablate
from mammogmic.training.ablate import AblationSettings, run_ablations
from mammogmic.training.demo import DemoSettings, demo_synth_config
from mammogmic.training.loop import NonFiniteLossError, Trainer


def test_ablation_rows_divergence_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = generate_dataset(tmp_path / "data", 10, DemoSettings().size, 0, demo_synth_config(), 1)
    settings = AblationSettings(n_exams=10, epochs=1, workers=1, groups=("head", "attention"))
    fit = Trainer.fit
    trained: list[str] = []

    def fit_or_diverge(self: Trainer, **kwargs: Any) -> Any:
        trained.append(self.run_dir.name)
        if self.config.model.attention == "uniform":
            raise NonFiniteLossError("non-finite loss (nan) at epoch 0, optimizer step 1")
        return fit(self, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit_or_diverge)
    rows = run_ablations(tmp_path / "out", settings, data=data)
    names = [r["variant"] for r in rows]
    assert names == ["fusion (GMIC)", "global only", "local only", "average", "uniform attention (diverged)"]
    diverged = rows[-1]
    assert math.isnan(diverged["malignant_auroc"]) and math.isnan(diverged["malignant_dice"])
    # The head rows are one model's heads: the same Dice (one saliency map), different AUROCs possible.
    assert len({r["malignant_dice"] for r in rows[:4]} - {None}) <= 1
    table = pd.read_csv(tmp_path / "out" / "ablations.csv")
    assert list(table["variant"]) == names
    assert (tmp_path / "out" / "ablations.md").read_text().count("diverged") >= 1

    # Rerun: the finished base run is resumed (nothing retrained) and gives the same rows.
    trained.clear()
    again = run_ablations(tmp_path / "out", settings, data=data)
    assert trained == ["base", "uniform_attention"]  # fit is called, but the base run resumes finished
    base_run = tmp_path / "out" / "runs" / "base"
    assert len(pd.read_csv(base_run / "epochs.csv")) == 1
    assert [r["malignant_auroc"] for r in again[:4]] == [r["malignant_auroc"] for r in rows[:4]]
    assert ablate._fmt(float("nan")) == "n/a"
