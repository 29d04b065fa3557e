"""The paper's ablations on synthetic data: one table, one command (``mammogmic ablate``).

Rows (each a separate training run unless noted; everything else equals the demo's reduced GMIC):

* prediction head: fusion / global only / local only / average of global and local. These four rows are
  read from the *same* trained model (its three heads and their mean), so they cost one run.
* attention: gated (the base run) vs uniform weights.
* patch selection: saliency-guided (base) vs random positions.
* aggregation: top-t% (base) vs GAP vs GMP.
* K, the number of patches: 1..6 (the base run supplies its own K).

Outputs in ``OUT``: ``ablations.csv`` and ``ablations.json`` (test malignant/benign AUROC and malignant Dice per
row, seconds per run), ``ablations.md`` (the table), and one run folder per training under ``OUT/runs/``. The
synthetic data are generated once into ``OUT/data`` (or reused from ``--data``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mammogmic.errors import ManifestError
from mammogmic.training.config import TrainConfig
from mammogmic.training.demo import DemoSettings, _best_or_last, demo_synth_config, demo_train_config
from mammogmic.training.loop import Callback, NonFiniteLossError, Trainer

__all__ = ["AblationSettings", "run_ablations"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AblationSettings:
    """Size of the ablation study (defaults: small enough for a CPU in about an hour).

    Attributes:
        n_exams: synthetic exams.
        epochs: epochs per run.
        seed: data and training seed.
        workers: data-generation processes.
        ks: the K values of the K sweep.
        groups: which groups to run (``head``, ``attention``, ``patches``, ``aggregation``, ``k``).
    """

    n_exams: int = 300
    epochs: int = 6
    seed: int = 0
    workers: int = 2
    ks: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    groups: tuple[str, ...] = ("head", "attention", "patches", "aggregation", "k")


def _variants(base: TrainConfig, s: AblationSettings) -> list[tuple[str, str, dict[str, Any]]]:
    """(group, row name, model overrides) of every training run; the base run first."""
    k0 = base.model.num_patches
    runs: list[tuple[str, str, dict[str, Any]]] = [("base", "base", {})]
    if "attention" in s.groups:
        runs.append(("attention", "uniform attention", {"model.attention": "uniform"}))
    if "patches" in s.groups:
        runs.append(("patches", "random patches", {"model.patch_selection": "random"}))
    if "aggregation" in s.groups:
        # The demo's t warm-up anneals top-t% pooling; these variants pool otherwise from the first step.
        for name, pooling in (("GAP", "gap"), ("GMP", "gmp")):
            runs.append(("aggregation", name, {"model.aggregation": pooling, "schedule.t_warmup_epochs": 0}))
    if "k" in s.groups:
        runs += [("k", f"K={k}", {"model.num_patches": k}) for k in s.ks if k != k0]
    return runs


def run_ablations(
    out_dir: str | Path,
    settings: AblationSettings = AblationSettings(),
    *,
    data: str | Path | None = None,
    callback: Callback | None = None,
    on_run: Callable[[str, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every ablation and write the table; return its rows."""
    from mammogmic.data.synth.dataset import generate_dataset
    from mammogmic.training.demo import evaluate_with_localization

    out = Path(out_dir)
    if data is not None:
        manifest = Path(data)
        manifest = manifest / "manifest.csv" if manifest.is_dir() else manifest
        if not manifest.is_file():
            raise ManifestError(
                f"{data}: no synthetic set (expected a manifest CSV or a folder holding manifest.csv)"
            )
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        manifest = out / "data" / "manifest.csv"
        if not manifest.exists():
            generate_dataset(
                out / "data",
                settings.n_exams,
                DemoSettings().size,
                settings.seed,
                demo_synth_config(),
                settings.workers,
            )
    demo = DemoSettings(n_exams=settings.n_exams, epochs=settings.epochs, seed=settings.seed)
    base = demo_train_config(manifest, demo)
    rows: list[dict[str, Any]] = []
    for group, name, overrides in _variants(base, settings):
        cfg = base.replace(**overrides) if overrides else base
        run = out / "runs" / name.replace(" ", "_").replace("=", "")
        t0 = time.perf_counter()
        resume = (run / "last.pt").exists()
        try:
            # A folder without last.pt was stopped before its first checkpoint: its logs are moved aside.
            Trainer(cfg, run, callback=callback, tensorboard=False).fit(resume=resume, overwrite=not resume)
        except NonFiniteLossError as exc:  # a diverged variant is a result too: report it, go on
            logger.warning("%s diverged: %s", name, exc)
            nan = {"malignant_auroc": float("nan"), "benign_auroc": float("nan")}
            rows.append(
                _row(group, f"{name} (diverged)", nan, {"test": {"malignant_dice": float("nan")}}, 0.0)
            )
            _write(out, rows, settings, base)
            continue
        res = evaluate_with_localization(cfg, _best_or_last(run), run, n_figures=0, heads=True)
        dice_model = run / "best_dice_model.safetensors"
        if dice_model.exists():  # localization from the Dice-selected model, as the demo reports it
            scratch = run / "dice_model"
            scratch.mkdir(exist_ok=True)
            res["test"]["malignant_dice"] = evaluate_with_localization(cfg, dice_model, scratch, n_figures=0)[
                "test"
            ]["malignant_dice"]
        seconds = time.perf_counter() - t0
        heads = res["heads"]
        main_row = _row(group, name, heads["fusion"], res, seconds)
        if group == "base":
            label = {
                "fusion": "fusion (GMIC)",
                "global": "global only",
                "local": "local only",
                "average": "average",
            }
            for head in ("fusion", "global", "local", "average"):
                if "head" in settings.groups or head == "fusion":
                    rows.append(
                        _row("head" if head != "fusion" else "base", label[head], heads[head], res, seconds)
                    )
        else:
            rows.append(main_row)
        if on_run is not None:
            on_run(name, main_row)  # the run's own model (its fusion head), not the last head row
        _write(out, rows, settings, base)
    return rows


def _row(
    group: str, name: str, head: dict[str, float], res: dict[str, Any], seconds: float
) -> dict[str, Any]:
    return {
        "group": group,
        "variant": name,
        "malignant_auroc": head["malignant_auroc"],
        "benign_auroc": head["benign_auroc"],
        "malignant_dice": res["test"]["malignant_dice"],
        "seconds": round(seconds, 1),
    }


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _write(out: Path, rows: list[dict[str, Any]], s: AblationSettings, base: TrainConfig) -> None:
    with open(out / "ablations.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    clean = [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
        for r in rows
    ]
    meta = {
        "settings": {"n_exams": s.n_exams, "epochs": s.epochs, "seed": s.seed},
        "base_config": base.to_dict(),
    }
    (out / "ablations.json").write_text(json.dumps({"rows": clean, **meta}, indent=2) + "\n")
    lines = [
        "| group | variant | malignant AUROC | benign AUROC | malignant Dice |",
        "|---|---|---|---|---|",
        *(
            f"| {r['group']} | {r['variant']} | {_fmt(r['malignant_auroc'])} | {_fmt(r['benign_auroc'])} | "
            f"{_fmt(r['malignant_dice'])} |"
            for r in rows
        ),
    ]
    (out / "ablations.md").write_text("\n".join(lines) + "\n")
