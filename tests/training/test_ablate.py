"""``run_ablations``: head rows from one model, a diverged variant reported, resume without retraining, seeds."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mammogmic.data.synth.dataset import generate_dataset
from mammogmic.errors import ConfigError
from mammogmic.training import ablate
from mammogmic.training.ablate import AblationSettings, run_ablations
from mammogmic.training.demo import DemoSettings, demo_synth_config
from mammogmic.training.loop import NonFiniteLossError, Trainer


def test_ablation_rows_divergence_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = generate_dataset(tmp_path / "data", 10, DemoSettings().size, 0, demo_synth_config(), 1)
    settings = AblationSettings(n_exams=10, epochs=1, seeds=(0,), workers=1, groups=("head", "attention"))
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
    assert ablate.describe_row(diverged).startswith(
        "malignant AUROC n/a, benign AUROC n/a, malignant Dice n/a"
    )
    # The head rows are one model's heads: the same Dice (one saliency map), different AUROCs possible.
    assert len({r["malignant_dice"] for r in rows[:4]} - {None}) <= 1
    table = pd.read_csv(tmp_path / "out" / "ablations.csv")
    assert list(table["variant"]) == names
    assert (tmp_path / "out" / "ablations.md").read_text().count("diverged") >= 1
    assert (tmp_path / "out" / "ablations.png").read_bytes()[:4] == b"\x89PNG"
    # A run's time is its logged epochs plus its evaluation.
    epochs = pd.read_csv(tmp_path / "out" / "seed0" / "runs" / "base" / "epochs.csv")
    assert rows[0]["seconds"] >= round(epochs["seconds"].sum(), 1) > 0

    # Rerun: the evaluated runs (the diverged one too) are reused, nothing is trained again.
    trained.clear()
    again = run_ablations(tmp_path / "out", settings, data=data)
    assert trained == []
    base_run = tmp_path / "out" / "seed0" / "runs" / "base"
    assert len(pd.read_csv(base_run / "epochs.csv")) == 1
    assert [r["malignant_auroc"] for r in again[:4]] == [r["malignant_auroc"] for r in rows[:4]]
    assert ablate._fmt(float("nan")) == "n/a"

    # A run trained further after its evaluation (last.pt newer than the kept result) is evaluated again.
    kept = base_run / ablate.RESULT_FILE
    stale = {**json.loads(kept.read_text()), "seconds": -1.0}
    kept.write_text(json.dumps(stale))
    os.utime(kept, (1.0, 1.0))
    third = run_ablations(tmp_path / "out", settings, data=data)
    assert trained == ["base"]  # resumed finished: fit is called, no epoch is added
    assert len(pd.read_csv(base_run / "epochs.csv")) == 1
    assert third[0]["seconds"] != -1.0

    # Read again with other inference-only settings: no training, the study untouched, the same rows.
    trained.clear()
    study_table = (tmp_path / "out" / "ablations.csv").read_bytes()
    own = {"saliency_symmetry": "flips_at_inference", "saliency_grid": "fine_at_inference"}  # the demo's
    same = ablate.reread_ablations(tmp_path / "out", tmp_path / "same", own)
    assert trained == [] and (tmp_path / "out" / "ablations.csv").read_bytes() == study_table
    assert [r["variant"] for r in same] == names
    for key in ("malignant_auroc", "benign_auroc", "malignant_dice"):  # the study's own reading, reproduced
        np.testing.assert_equal([r[key] for r in same[:4]], [r[key] for r in third[:4]], err_msg=key)
    assert same[0]["seconds"] == third[0]["seconds"]  # the study's cost, not the re-read's
    native = ablate.reread_ablations(tmp_path / "out", tmp_path / "native", {"saliency_grid": "native"})
    kept_native = json.loads(
        (tmp_path / "native" / "seed0" / "runs" / "base" / ablate.RESULT_FILE).read_text()
    )
    kept_own = json.loads((tmp_path / "same" / "seed0" / "runs" / "base" / ablate.RESULT_FILE).read_text())
    assert kept_native["read_with"] == {"saliency_grid": "native"}
    assert kept_native["test"]["malignant_offsets"] != kept_own["test"]["malignant_offsets"]  # another map
    assert native[-1]["variant"] == "uniform attention (diverged)"
    assert json.loads((tmp_path / "native" / "ablations.json").read_text())["read_with"] == {
        "saliency_grid": "native"
    }
    # scripts/ablation_reread.py reads with the demo's current settings by default: the study's own here
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "scripts"))
    import ablation_reread

    assert ablation_reread.main([str(tmp_path / "out"), str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "ablations.csv").read_bytes() == (
        tmp_path / "same" / "ablations.csv"
    ).read_bytes()
    with pytest.raises(ConfigError, match="overwrite the study"):
        ablate.reread_ablations(tmp_path / "out", tmp_path / "out", own)
    with pytest.raises(ConfigError, match="num_patches would change what the model computes"):
        ablate.reread_ablations(tmp_path / "out", tmp_path / "k", {"num_patches": 2})


def test_a_row_reads_the_saliency_figures_of_the_dice_selected_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scripted evaluations: classification from best.pt, every map figure from best_dice_model, as the demo's
    metrics.json; a result kept from before the negatives column is evaluated again, not reused."""
    import mammogmic.training.demo as demo

    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "best_dice_model.safetensors", "last.pt"):
        (run / name).write_bytes(b"")

    def figures(offset: float) -> dict[str, Any]:
        return {
            "malignant_auroc": 0.9 + offset,
            "benign_auroc": 0.8 + offset,
            "malignant_dice": 0.3 + offset,
            "malignant_dice_nearest": 0.2 + offset,
            "malignant_negatives_marked": 0.4 + offset,
            "benign_negatives_marked": 0.5 + offset,
            "malignant_specific_dice": 0.1 + offset,
            "malignant_offsets": {"median_peak_aligned_cells": 0.6 + offset},
            "n_images": 10,
        }

    read: list[str] = []

    def evaluate(cfg: Any, checkpoint: Path, out: Path, **kwargs: Any) -> dict[str, Any]:
        read.append(Path(checkpoint).name)
        dice_model = Path(checkpoint).name == "best_dice_model.safetensors"
        return {"test": figures(0.01 if dice_model else 0.0), "heads": {"fusion": {}}}

    monkeypatch.setattr(demo, "evaluate_with_localization", evaluate)
    test = ablate._evaluate_run(None, run, tmp_path / "out")["test"]  # type: ignore[arg-type]
    assert read == ["best.pt", "best_dice_model.safetensors"]
    auroc_model, dice_model = figures(0.0), figures(0.01)
    for key in ("malignant_auroc", "benign_auroc", "n_images"):
        assert test[key] == auroc_model[key], key
    for key in (
        "malignant_dice",
        "malignant_dice_nearest",
        "malignant_negatives_marked",
        "benign_negatives_marked",
        "malignant_specific_dice",
        "malignant_offsets",
    ):
        assert test[key] == dice_model[key], key
    assert test["malignant_dice_auroc_model"] == auroc_model["malignant_dice"]
    assert test["malignant_negatives_marked_auroc_model"] == auroc_model["malignant_negatives_marked"]
    assert {
        k: v for k, v in test.items() if not k.endswith("_auroc_model")
    } == demo.with_localization_figures(auroc_model, dice_model)

    # A result evaluated before the negatives column: read again (no training: fit resumes a finished run).
    resumed: list[bool] = []

    class Finished:  # the trainer of a finished run: resuming it trains nothing
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def fit(self, resume: bool, overwrite: bool) -> None:
            resumed.append(resume)

    monkeypatch.setattr(ablate, "Trainer", Finished)
    monkeypatch.setattr(ablate, "_training_seconds", lambda run: 1.0)
    old = {"test": {"malignant_dice": 0.3, "malignant_dice_auroc_model": 0.2}, "heads": {}}
    kept = run / ablate.RESULT_FILE
    kept.write_text(json.dumps(old))
    read.clear()
    again = ablate._train_and_evaluate(None, run, None)  # type: ignore[arg-type]
    assert read == ["best.pt", "best_dice_model.safetensors"] and resumed == [True]
    assert again["test"]["malignant_negatives_marked"] == dice_model["malignant_negatives_marked"]
    read.clear()
    assert ablate._train_and_evaluate(None, run, None) == json.loads(kept.read_text())  # type: ignore[arg-type]
    assert read == []  # the current result is reused


def test_data_with_several_seeds_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="single seed"):
        run_ablations(tmp_path / "out", AblationSettings(seeds=(0, 1)), data=tmp_path)
    with pytest.raises(ConfigError, match="distinct"):
        run_ablations(tmp_path / "out", AblationSettings(seeds=(1, 1)))


def _runs(
    variant: str, group: str, malignant: list[float], dice: list[float], marked: list[float] | None = None
) -> list[dict[str, Any]]:
    return [
        {
            "group": group,
            "variant": variant,
            "seed": seed,
            "malignant_auroc": m,
            "benign_auroc": 0.8,
            "malignant_dice": d,
            "malignant_negatives_marked": n,
            "seconds": 60.0,
        }
        for seed, (m, d, n) in enumerate(zip(malignant, dice, marked or [0.1] * len(dice), strict=True))
    ]


def test_summary_pairs_each_row_with_the_base_run_of_its_seed() -> None:
    rows = [
        *_runs("fusion (GMIC)", "base", [0.90, 0.95, 0.97], [0.10, 0.50, 0.10]),
        *_runs("GAP", "aggregation", [0.88, 0.94, 0.95], [0.00, 0.20, 0.05], [0.3, 0.2, 0.4]),
        *_runs("uniform attention (diverged)", "attention", [math.nan] * 3, [math.nan] * 3),
        *_runs("global only", "head", [0.91, 0.94, 0.96], [0.10, 0.50, 0.10], [0.2, 0.0, 0.1]),
    ]
    base, gap, diverged, head = ablate.summarize_ablations(rows)
    # A head row shares the base run's saliency map: its AUROC is tested, its Dice and negatives marked are not.
    assert head["malignant_auroc_p"] > 0 and math.isnan(head["malignant_dice_p"])
    assert math.isnan(head["malignant_negatives_marked_p"])
    assert gap["malignant_negatives_marked_diff"] == pytest.approx(0.2)  # paired with the base's 0.1
    assert base["seeds"] == "0 1 2" and math.isnan(base["malignant_auroc_p"])
    assert base["malignant_auroc_mean"] == pytest.approx(0.94)
    assert base["malignant_dice_sd"] == pytest.approx(np.std([0.10, 0.50, 0.10], ddof=1))
    # Paired over seeds: the differences (-0.02, -0.01, -0.02) are consistent, so small p; unpaired they would
    # be swamped by the seeds' spread.
    d = np.array([-0.02, -0.01, -0.02])
    assert gap["malignant_auroc_diff"] == pytest.approx(d.mean())
    t = d.mean() / (d.std(ddof=1) / np.sqrt(3))
    assert gap["malignant_auroc_p"] == pytest.approx(1 - abs(t) / np.sqrt(t * t + 2))  # Student's t, 2 df
    assert gap["malignant_auroc_p"] < 0.05
    assert gap["minutes_mean"] == pytest.approx(1.0)
    assert math.isnan(diverged["malignant_auroc_mean"]) and math.isnan(diverged["malignant_dice_p"])
    assert ablate.describe_row(rows[0]) == (
        "malignant AUROC 0.900, benign AUROC 0.800, malignant Dice 0.100, negatives marked 0.100 (60 s)"
    )
    table = ablate._table([base, gap, diverged])
    assert "| aggregation | GAP | 0 1 2 | 0.923 ± 0.038 | -0.017 (p 0.04) |" in table
    assert "| base | fusion (GMIC) | 0 1 2 | 0.940 ± 0.036 |  |" in table


def test_ablation_and_evaluation_tables_print_a_small_p_alike() -> None:
    """Both markdown tables with a p column (``ablate``'s "vs base", ``evaluate --compare``'s comparisons) print
    p by one rule: a p below their precision must not read "p 0.00" / "0.000"."""
    from mammogmic.evaluation.table import markdown_summary

    rows = [
        *_runs("fusion (GMIC)", "base", [0.90, 0.95, 0.97], [0.50, 0.40, 0.60]),
        # AUROC differences -0.0300, -0.0301, -0.0299: p far below 0.001; Dice -0.30, -0.30, -0.25: p 0.003.
        *_runs("GMP", "aggregation", [0.8700, 0.9199, 0.9401], [0.20, 0.10, 0.35]),
    ]
    base, gmp = ablate.summarize_ablations(rows)
    assert gmp["malignant_auroc_p"] < 0.001 and 0.001 < gmp["malignant_dice_p"] < 0.005
    table = ablate._table([base, gmp])
    assert "| -0.030 (p <0.001) |" in table and "| -0.283 (p 0.003) |" in table and "p 0.00)" not in table
    comparison = {"a": "A", "b": "B", "n": 40, "auroc_a": 0.9, "auroc_b": 0.8, "difference": 0.1}
    evaluation = {"label": "malignant", "group": "image", "n_rows": 40, "bootstrap": 2000, "seed": 0}
    evaluation |= {
        "metrics": {},
        "comparisons": [comparison | {"difference_ci": [0.05, 0.15], "p_value": 0.0}],
    }
    assert "| 0.100 (0.050–0.150) | <0.001 |" in markdown_summary(evaluation)


def test_ablation_picture_has_a_dot_per_finite_seed_and_the_table_order() -> None:
    from mammogmic.visualization.ablation import plot_ablations

    rows = [
        *_runs("fusion (GMIC)", "base", [0.90, 0.95, 0.97], [0.10, 0.50, 0.10]),
        *_runs("GAP", "aggregation", [0.88, math.nan, 0.95], [0.00, math.nan, 0.05], [0.3, math.nan, 0.2]),
        *_runs("GMP (diverged)", "aggregation", [math.nan] * 3, [math.nan] * 3, [math.nan] * 3),
    ]
    fig = plot_ablations(rows)
    auroc_ax, dice_ax, marked_ax = fig.axes
    assert [t.get_text() for t in auroc_ax.get_yticklabels()] == ["fusion (GMIC)", "GAP", "GMP (diverged)"]
    for ax, metric in (
        (auroc_ax, "malignant_auroc"),
        (dice_ax, "malignant_dice"),
        (marked_ax, "malignant_negatives_marked"),
    ):
        dots = sorted(
            (round(float(x), 6), round(float(y), 6)) for c in ax.collections for x, y in c.get_offsets()
        )
        expected = sorted(
            (round(r[metric], 6), float(["fusion (GMIC)", "GAP"].index(r["variant"])))
            for r in rows
            if math.isfinite(r[metric])
        )
        assert dots == expected


def test_ablation_picture_legend_hides_no_dot() -> None:
    """The seeds' legend once sat in the lower left of the AUROC panel, over the last row's lowest AUROC (the Zen 4
    study's GMP seed 2): no dot may lie under it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from mammogmic.visualization.ablation import plot_ablations

    rows = [
        *_runs("fusion (GMIC)", "base", [0.987, 0.994, 0.994], [0.354, 0.521, 0.558]),
        *_runs("random patches", "patches", [0.996, 0.993, 0.997], [0.494, 0.517, 0.304]),
        *_runs("GAP", "aggregation", [0.986, 0.993, 0.997], [0.094, 0.203, 0.115]),
        *_runs("GMP", "aggregation", [0.984, 0.975, 0.963], [0.075, 0.000, 0.003]),
    ]
    fig = plot_ablations(rows)
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    assert len(legends) == 1 and [t.get_text() for t in legends[0].get_texts()] == [
        "seed 0",
        "seed 1",
        "seed 2",
    ]
    box = legends[0].get_window_extent(renderer)
    dots = [ax.transData.transform(c.get_offsets()) for ax in fig.axes for c in ax.collections]
    hidden = [(x, y) for d in dots for x, y in d if box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1]
    assert sum(len(d) for d in dots) == 36 and not hidden  # 4 rows, 3 seeds, 3 panels
