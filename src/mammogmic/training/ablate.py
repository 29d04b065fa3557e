"""The paper's ablations on synthetic data: one table, one command (``mammogmic ablate``).

Rows (each a separate training run unless noted; everything else equals the demo's reduced GMIC):

* prediction head: fusion / global only / local only / average of global and local. These four rows are
  read from the *same* trained model (its three heads and their mean), so they cost one run.
* attention: gated (the base run) vs uniform weights.
* patch selection: saliency-guided (base) vs random positions.
* aggregation: top-t% (base) vs GAP vs GMP.
* K, the number of patches: 1..6 (the base run supplies its own K).

Every row is trained once per seed (default 0, 1, 2: the demo's budget and its three README seeds), each seed on
its own synthetic set, generated like the demo's. The table gives mean ± sd over seeds and, per row, the paired
t-test over seeds of the row against the base run (same seed, same data, same test images). Its figures are the
demo's ``metrics.json → test`` figures of the run (:func:`mammogmic.training.demo.with_localization_figures`):
malignant and benign AUROC of the AUROC-selected model; malignant Dice and the share of the test images without
malignancy whose malignant map reaches 0.5 ("negatives marked") of the Dice-selected model.

Outputs in ``OUT``: ``ablations.md`` (the table), ``ablations.csv`` (one row per table row: means, sds,
differences, p-values), ``ablations_runs.csv`` (one row per seed and table row), ``ablations.json`` (both, and the
settings), ``ablations.png`` (per-seed dots and means), and per seed ``seedS/data`` (the synthetic set) and
``seedS/runs/<variant>`` (the run, its test predictions and ``ablation_result.json``, the evaluated result that a
rerun reuses). The runs go row by row, all seeds of a row before the next row, so a stopped study leaves complete
rows; rerunning with the same ``--out`` resumes an unfinished run and reuses the evaluated ones. A run whose loss
becomes non-finite is reported as "diverged" (delete its folder to try it again).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mammogmic.errors import ConfigError, ManifestError
from mammogmic.evaluation.metrics import format_p_value, paired_t_test
from mammogmic.models.config import check_inference_settings
from mammogmic.training.config import TrainConfig
from mammogmic.training.demo import (
    DemoSettings,
    _best_or_last,
    demo_synth_config,
    demo_train_config,
    with_localization_figures,
)
from mammogmic.training.loop import Callback, NonFiniteLossError, Trainer

__all__ = ["AblationSettings", "describe_row", "reread_ablations", "run_ablations", "summarize_ablations"]

logger = logging.getLogger(__name__)

RESULT_FILE = "ablation_result.json"
METRICS = ("malignant_auroc", "benign_auroc", "malignant_dice", "malignant_negatives_marked")
# Figures of the saliency map: the head rows read the base run's map, so these are the base's, not a test.
MAP_METRICS = ("malignant_dice", "malignant_negatives_marked")
# A kept result without this key predates the negatives column: it is evaluated again (no training).
_CURRENT_RESULT_KEY = "malignant_negatives_marked_auroc_model"
BASE_ROW = "fusion (GMIC)"


@dataclass(frozen=True)
class AblationSettings:
    """Size of the ablation study (defaults: the demo's budget, three seeds; 6-12 minutes a run on 2 bf16 cores, by CPU kind).

    Attributes:
        n_exams: synthetic exams per seed.
        epochs: epochs per run.
        seeds: data and training seeds; each row is trained once per seed.
        workers: data-generation processes.
        ks: the K values of the K sweep.
        groups: which groups to run (``head``, ``attention``, ``patches``, ``aggregation``, ``k``).
    """

    n_exams: int = DemoSettings.n_exams
    epochs: int = DemoSettings.epochs
    seeds: tuple[int, ...] = (0, 1, 2)
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


def _run_dir(out: Path, seed: int, name: str) -> Path:
    """The folder of one row's run for one seed: ``OUT/seedS/runs/<row name, spaces as _, no =>``."""
    return out / f"seed{seed}" / "runs" / name.replace(" ", "_").replace("=", "")


def _manifest(out: Path, seed: int, settings: AblationSettings, data: str | Path | None) -> Path:
    """The seed's synthetic set: ``data`` when given, else ``OUT/seedS/data`` (generated once, like the demo's)."""
    from mammogmic.data.synth.dataset import generate_dataset

    if data is not None:
        manifest = Path(data)
        manifest = manifest / "manifest.csv" if manifest.is_dir() else manifest
        if not manifest.is_file():
            raise ManifestError(
                f"{data}: no synthetic set (expected a manifest CSV or a folder holding manifest.csv)"
            )
        return manifest
    manifest = out / f"seed{seed}" / "data" / "manifest.csv"
    if not manifest.exists():
        generate_dataset(
            manifest.parent,
            settings.n_exams,
            DemoSettings().size,
            seed,
            demo_synth_config(),
            settings.workers,
        )
    return manifest


def _train_and_evaluate(cfg: TrainConfig, run: Path, callback: Callback | None) -> dict[str, Any]:
    """Train (or resume) one run and evaluate it; the result is kept in ``run/ablation_result.json``.

    A kept result is reused when it is newer than the run's ``last.pt``. The result holds the test metrics of
    the AUROC-selected model and its heads, with ``malignant_dice`` taken from the Dice-selected model (as the
    demo reports it), or ``diverged`` with the error when the loss became non-finite.
    """
    kept, last = run / RESULT_FILE, run / "last.pt"
    if kept.exists() and (not last.exists() or kept.stat().st_mtime >= last.stat().st_mtime):
        result: dict[str, Any] = json.loads(kept.read_text())
        if "diverged" in result or _CURRENT_RESULT_KEY in result["test"]:
            return result
    resume = last.exists()
    try:
        # A folder without last.pt was stopped before its first checkpoint: its logs are moved aside.
        Trainer(cfg, run, callback=callback, tensorboard=False).fit(resume=resume, overwrite=not resume)
    except NonFiniteLossError as exc:  # a diverged variant is a result too: report it, go on
        logger.warning("%s diverged: %s", run, exc)
        result = {"diverged": str(exc)}
        run.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps(result, indent=2) + "\n")
        return result
    t_eval = time.perf_counter()
    result = _evaluate_run(cfg, run, run)
    # The run's cost: its epochs as logged (whenever they ran, across resumes) plus this evaluation.
    result["seconds"] = round(_training_seconds(run) + time.perf_counter() - t_eval, 1)
    kept.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _evaluate_run(
    cfg: TrainConfig, run: Path, out: Path, inference: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A trained run's test metrics and heads (AUROC-selected model), with the saliency maps' figures (Dice,
    negatives marked, offsets) from the Dice-selected model as the demo reports them; predictions written under
    ``out``. The AUROC-selected model's Dice and negatives marked are kept as ``*_auroc_model``."""
    from mammogmic.training.demo import evaluate_with_localization

    res = evaluate_with_localization(
        cfg, _best_or_last(run), out, n_figures=0, heads=True, inference=inference
    )
    test = dict(res["test"])
    for key in ("malignant_dice", "malignant_negatives_marked"):
        test[f"{key}_auroc_model"] = test[key]
    dice_model = run / "best_dice_model.safetensors"
    if dice_model.exists():  # localization from the Dice-selected model, as the demo reports it
        scratch = out / "dice_model"
        scratch.mkdir(parents=True, exist_ok=True)
        localization = evaluate_with_localization(cfg, dice_model, scratch, n_figures=0, inference=inference)
        test = with_localization_figures(test, localization["test"])
    return {"test": test, "heads": res["heads"]}


def reread_ablations(
    study_dir: str | Path,
    out_dir: str | Path,
    inference: Mapping[str, str],
    *,
    on_run: Callable[[str, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Score every evaluated run of a finished study again, read with other inference-only settings, no training.

    The same weights and the same model selections (the study's ``best_model`` and ``best_dice_model`` files),
    read e.g. with the demo's current ``saliency_symmetry`` / ``saliency_grid``
    (:data:`mammogmic.models.config.INFERENCE_SETTINGS`). Each run is evaluated with its own ``config.yaml``; the
    table, CSVs and per-run results are written to ``out_dir`` as ``run_ablations`` writes them (each row's minutes
    are the study's), and the study is only read. Rows that diverged in the study stay diverged.
    """
    check_inference_settings(inference)
    study, out = Path(study_dir), Path(out_dir)
    doc_path = study / "ablations.json"
    if not doc_path.is_file():
        raise ConfigError(f"{study}: no ablations.json (not the output folder of `mammogmic ablate`)")
    if out.resolve() == study.resolve():
        raise ConfigError(f"{out}: the re-read would overwrite the study it reads; give another folder")
    doc = json.loads(doc_path.read_text())
    base = TrainConfig.from_dict(doc["base_config"])
    seeds = tuple(int(k) for k in doc["settings"]["seeds"])
    groups = {str(r["group"]) for r in doc["runs"]}
    settings = AblationSettings(
        n_exams=int(doc["settings"]["n_exams"]),
        epochs=int(doc["settings"]["epochs"]),
        seeds=seeds,
        groups=tuple(g for g in AblationSettings().groups if g in groups),
    )
    rows: list[dict[str, Any]] = []
    everything = AblationSettings(seeds=seeds)  # every variant the study may hold, in the study's order
    for group, name, _ in _variants(base, everything):
        for seed in seeds:
            run = _run_dir(study, seed, name)
            if not (run / RESULT_FILE).is_file():
                continue  # not part of this study
            kept = json.loads((run / RESULT_FILE).read_text())
            target = _run_dir(out, seed, name)
            target.mkdir(parents=True, exist_ok=True)
            if "diverged" in kept:
                result = kept
            else:
                cfg = TrainConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
                result = _evaluate_run(cfg, run, target, inference)
                result["seconds"] = kept.get("seconds", float("nan"))
                result["read_with"] = dict(inference)
            (target / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
            new = _seed_rows(group, name, seed, result, settings)
            rows += new
            if on_run is not None:
                on_run(f"{name} (seed {seed})", new[0])
            _write(out, rows, settings, base, {"read_with": dict(inference), "study": str(study)})
    if not rows:
        raise ConfigError(f"{study}: no evaluated runs to read again")
    return rows


def _training_seconds(run: Path) -> float:
    """Sum of the epochs' wall times in ``run/epochs.csv`` (0 when the run logged none)."""
    log = run / "epochs.csv"
    if not log.exists():
        return 0.0
    with open(log, newline="") as fh:
        return sum(float(r["seconds"]) for r in csv.DictReader(fh) if r.get("seconds"))


def _seed_rows(
    group: str, name: str, seed: int, result: dict[str, Any], settings: AblationSettings
) -> list[dict[str, Any]]:
    """The table rows one run gives for one seed: its fusion head, and for the base run also the head rows."""

    def row(g: str, variant: str, head: dict[str, float] | None) -> dict[str, Any]:
        nan = float("nan")
        return {
            "group": g,
            "variant": variant,
            "seed": seed,
            "malignant_auroc": head["malignant_auroc"] if head else nan,
            "benign_auroc": head["benign_auroc"] if head else nan,
            "malignant_dice": result["test"]["malignant_dice"] if head else nan,
            "malignant_negatives_marked": result["test"]["malignant_negatives_marked"] if head else nan,
            "seconds": result.get("seconds", nan),
        }

    if "diverged" in result:
        return [row(group, f"{name} (diverged)", None)]
    heads = result["heads"]
    if group != "base":
        return [row(group, name, heads["fusion"])]
    labels = {"fusion": BASE_ROW, "global": "global only", "local": "local only", "average": "average"}
    wanted = ("fusion", "global", "local", "average") if "head" in settings.groups else ("fusion",)
    return [row("base" if h == "fusion" else "head", labels[h], heads[h]) for h in wanted]


def describe_row(row: Mapping[str, Any]) -> str:
    """One per-seed row as ``ablate`` and the re-read script print it after each run."""
    return (
        f"malignant AUROC {_fmt(row['malignant_auroc'])}, benign AUROC {_fmt(row['benign_auroc'])}, "
        f"malignant Dice {_fmt(row['malignant_dice'])}, negatives marked {_fmt(row['malignant_negatives_marked'])} "
        f"({_fmt0(row['seconds'])} s)"
    )


def run_ablations(
    out_dir: str | Path,
    settings: AblationSettings = AblationSettings(),
    *,
    data: str | Path | None = None,
    callback: Callback | None = None,
    on_run: Callable[[str, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every ablation for every seed and write the table; return the per-seed rows.

    Args:
        out_dir: output folder (see the module docstring for its layout).
        settings: size, seeds and groups of the study.
        data: an existing synthetic set to use instead of generating one (one seed only).
        callback: the trainer's progress callback.
        on_run: called with (``"<row> (seed S)"``, its row) after each run.
    """
    if not settings.seeds or len(set(settings.seeds)) != len(settings.seeds):
        raise ConfigError(f"ablate: seeds must be distinct and at least one, got {settings.seeds}")
    if data is not None and len(settings.seeds) != 1:
        raise ConfigError("ablate: --data holds one seed's synthetic set; give a single seed with it")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bases = {}
    for seed in settings.seeds:  # every seed's data first: a long study then only trains
        demo = DemoSettings(n_exams=settings.n_exams, epochs=settings.epochs, seed=seed)
        bases[seed] = demo_train_config(_manifest(out, seed, settings, data), demo)
    rows: list[dict[str, Any]] = []
    for group, name, overrides in _variants(bases[settings.seeds[0]], settings):
        for seed in settings.seeds:
            cfg = bases[seed].replace(**overrides) if overrides else bases[seed]
            run = _run_dir(out, seed, name)
            new = _seed_rows(group, name, seed, _train_and_evaluate(cfg, run, callback), settings)
            rows += new
            if on_run is not None:
                on_run(f"{name} (seed {seed})", new[0])  # the run's own model (its fusion head)
            _write(out, rows, settings, bases[settings.seeds[0]])
    return rows


def summarize_ablations(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per table row: mean and sd over seeds, and the paired t-test against the base row.

    Each row is paired with the base row of the same seed (same data, same test images); seeds where either
    diverged are left out of the test. With a single seed the sds and p-values are nan.
    """
    order: list[tuple[str, str]] = []
    by_row: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for r in rows:
        key = (r["group"], r["variant"])
        if key not in by_row:
            order.append(key)
            by_row[key] = {}
        by_row[key][int(r["seed"])] = r
    base = by_row.get(("base", BASE_ROW), {})
    summary = []
    for group, variant in order:
        runs = by_row[(group, variant)]
        seeds = sorted(runs)
        s: dict[str, Any] = {"group": group, "variant": variant, "seeds": " ".join(map(str, seeds))}
        for m in METRICS:
            v = np.array([runs[k][m] for k in seeds], dtype=np.float64)
            finite = v[np.isfinite(v)]
            s[f"{m}_mean"] = float(finite.mean()) if finite.size else float("nan")
            s[f"{m}_sd"] = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
            paired = [k for k in seeds if k in base]
            is_base = (group, variant) == ("base", BASE_ROW)
            # The head rows share the base run's saliency map: their Dice is the base's, not a test.
            same_map = m in MAP_METRICS and group == "head"
            if m != "benign_auroc" and not is_base and not same_map and paired:
                test = paired_t_test([runs[k][m] for k in paired], [base[k][m] for k in paired])
                s[f"{m}_diff"], s[f"{m}_p"] = test.mean_difference, test.p_value
            elif m != "benign_auroc":
                s[f"{m}_diff"], s[f"{m}_p"] = float("nan"), float("nan")
        seconds = [runs[k]["seconds"] for k in seeds if _finite(runs[k]["seconds"])]
        s["minutes_mean"] = float(np.mean(seconds)) / 60.0 if seconds else float("nan")
        summary.append(s)
    return summary


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if _finite(v) else "n/a"


def _fmt0(v: Any) -> str:
    return f"{v:.0f}" if _finite(v) else "n/a"


def _fmt1(v: Any) -> str:
    return f"{v:.1f}" if _finite(v) else "n/a"


def _mean_sd(s: dict[str, Any], m: str) -> str:
    mean, sd = s[f"{m}_mean"], s[f"{m}_sd"]
    return f"{mean:.3f} ± {sd:.3f}" if _finite(sd) else _fmt(mean)


def _diff(s: dict[str, Any], m: str) -> str:
    d, p = s[f"{m}_diff"], s[f"{m}_p"]
    if not _finite(d):
        return ""
    return f"{d:+.3f} (p {format_p_value(p, 2)})" if _finite(p) else f"{d:+.3f}"


def _table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| group | variant | seeds | malignant AUROC | vs base | benign AUROC | malignant Dice | vs base "
        "| negatives marked | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['group']} | {s['variant']} | {s['seeds']} | {_mean_sd(s, 'malignant_auroc')} | "
            f"{_diff(s, 'malignant_auroc')} | {_mean_sd(s, 'benign_auroc')} | {_mean_sd(s, 'malignant_dice')} | "
            f"{_diff(s, 'malignant_dice')} | {_mean_sd(s, 'malignant_negatives_marked')} | "
            f"{_fmt1(s['minutes_mean'])} |"
        )
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _write(
    out: Path,
    rows: list[dict[str, Any]],
    s: AblationSettings,
    base: TrainConfig,
    extra: dict[str, Any] | None = None,
) -> None:
    summary = summarize_ablations(rows)
    _write_csv(out / "ablations_runs.csv", rows)
    _write_csv(out / "ablations.csv", summary)

    def clean(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
            for r in table
        ]

    meta = {
        "settings": {"n_exams": s.n_exams, "epochs": s.epochs, "seeds": list(s.seeds)},
        "base_config": base.to_dict(),
        "test": "vs base: mean over seeds of (row - base row of the same seed), paired t-test over seeds (two-sided)",
        **(extra or {}),
    }
    doc = {"summary": clean(summary), "runs": clean(rows), **meta}
    (out / "ablations.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "ablations.md").write_text(_table(summary))
    from mammogmic.visualization.ablation import plot_ablations

    plot_ablations(rows).savefig(out / "ablations.png")
