"""``mammogmic demo``: synthetic data -> train a reduced GMIC -> test AUC, saliency Dice, figures.

Everything is written under one folder::

    DIR/data/          the generated synthetic dataset (images, masks, manifest.csv)
    DIR/run/           the training run (config.yaml, checkpoints, steps.csv, epochs.csv, tensorboard/)
    DIR/metrics.json   test metrics (``test.malignant_auroc``, ``test.benign_auroc``, ``test.malignant_dice``...)
                       and ``seconds`` (wall time of the whole demo)
    DIR/predictions.csv   per test image: ids, labels, predicted probabilities, Dice
    DIR/roc.png        test ROC curves (benign, malignant)
    DIR/figures/       GMIC explanation figures of a few test images

Saliency Dice (``test.malignant_dice``): on every test image that holds a malignant lesion, the malignant
saliency map is upsampled to the input size, thresholded at 0.5 and compared with the malignant lesion mask
(``2|S∩M| / (|S|+|M|)``); the figure is the mean over those images. Benign and normal images do not enter it; a
map that never reaches 0.5 scores 0.

Upsampling: cell ``(i, j)`` of a stride-``s`` network whose convolutions are zero-padded "same" (GMIC's global
networks) is centred on input pixel ``(s*i, s*j)``, not on ``(s*i + s/2, s*j + s/2)``: every stride-2 layer maps
output index ``k`` to input index ``2k``. The headline Dice therefore interpolates bilinearly between cell values
placed at their receptive-field centres (``upsample="aligned"``). The paper's convention, nearest-neighbour blocks
``[s*i, s*(i+1))``, shifts every value by half a cell and is reported beside it as
``test.malignant_dice_nearest``; soft (unthresholded) variants are reported too. Both come from the one Dice,
:func:`mammogmic.evaluation.localization.dice_scores`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mammogmic.data.preprocessing import needs_flip
from mammogmic.data.sample import scaled_crop_settings
from mammogmic.errors import MammogmicError
from mammogmic.models.config import check_inference_settings
from mammogmic.runtime import resolve_amp
from mammogmic.training.config import TrainConfig
from mammogmic.training.data import split_dataset
from mammogmic.training.loop import Callback, Trainer, classification_metrics, predict

__all__ = ["DemoSettings", "demo_synth_config", "demo_train_config", "run_demo"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """Knobs of the demo (the defaults are what the README quotes).

    Attributes:
        n_exams: synthetic exams (4 images each), split 70/15/15 by exam.
        size: (height, width) of the synthetic images and of the model input.
        seed: seed of the data and of training.
        workers: processes generating the data.
        epochs: training epochs.
        threads: torch CPU threads (``None`` = torch default).
        amp: training precision: ``auto`` (the default: bf16 autocast where the CPU has native bf16/AMX, else
            float32), ``bf16`` or ``none`` (float32). Validation and test are scored in float32 either way
            (``runtime.eval_amp``), as ``mammogmic predict`` scores the model by default. (An earlier bf16 NaN
            was the loss's 0/0 gradient at saturated probabilities, fixed in ``GMICLoss``.)
        n_figures: explanation figures to draw.
    """

    n_exams: int = 600
    size: tuple[int, int] = (512, 320)
    seed: int = 0
    workers: int = 2
    epochs: int = 24
    threads: int | None = None
    amp: str = "auto"
    n_figures: int = 4


def demo_synth_config() -> Any:
    """The synthetic-data settings of the demo: the generator's demo preset with larger, mostly mass findings.

    Larger masses (22-32 mm) and calcification clusters (18-28 mm) make a lesion body span about two cells of
    the saliency grid at the reduced 512x320 size. With smaller lesions the network's evidence (the spicules
    around a malignant mass) lies mostly outside the lesion mask and the coarse map cannot overlap the mask.
    """
    from mammogmic.data.synth import SynthConfig

    return SynthConfig.demo(
        mass_diameter_mm=(22.0, 32.0), calc_cluster_mm=(18.0, 28.0), calcification_fraction=0.15
    )


def demo_train_config(manifest: str | Path, settings: DemoSettings = DemoSettings()) -> TrainConfig:
    """A reduced GMIC for 512x320 inputs.

    The global network is a ResNet-10 (v1 blocks, one per stage) at width 8: stride 32, so the saliency grid at
    512x320 is 16x10 cells of 32x32 pixels, comparable to a 22-32 mm mass at this size. Its receptive field is
    195 pixels; the official ``use_v1_global`` ResNet-18's is 435, larger than the image's width, and with it
    the learned saliency peak sat further inward of the lesion (docs/localization.md, "Why the maps miss"). The
    local network is a ResNet-18 at width 16 on K=4 patches of 64x64 (the paper's 256x256 crop scaled like the
    image). Decoded, cropped images stay in memory across epochs (``data.keep_in_memory``).
    """
    amp = resolve_amp(settings.amp, "cpu")
    h, w = settings.size
    crop_iterations, crop_buffer = scaled_crop_settings(h)
    return TrainConfig.from_dict(
        {
            "model": {
                "global_arch": "resnet10",
                "global_width": 8,
                "local_arch": "resnet18",
                "local_width": 16,
                # Top-t pools 2 of the 16x10 cells, about one lesion's area at 512x320, instead of 5 (t = 0.03):
                # a map asked to hold 5 cells high spreads over a plateau around the lesion, whose maximum then
                # falls on a neighbour of the lesion's cell as often as on it (docs/localization.md, "t to the
                # lesion's size").
                "percent_t": 0.0125,
                "num_patches": 4,
                "patch_alignment": "centered",
                # The fusion head pools each global feature over its top-t cells instead of its single
                # largest one: every cell that sees the lesion then learns from the fusion head, and the
                # malignant maps land on the lesions on more seeds (docs/localization.md, "Fusion pooling").
                "fusion_pooling": "top_t",
                # The maps are the fusion head's class-activation maps (its weights for the global features,
                # cell by cell), so the fusion loss trains them from the first step: with a saliency head of its
                # own, the maps of some seeds never light up while the fusion head learns, though its own map
                # finds the lesions on every seed (docs/localization.md, "The fusion head's own maps").
                "saliency_head": "fusion",
                # Validation, test and predict read the geometric mean of the maps of the image and of its
                # left-right, top-bottom and 180-degree mirror images: a mark leaning to one side of the lesion
                # is mirrored to the others, and only the lesion's cell is high in all four
                # (docs/localization.md, "A symmetric map at inference").
                "saliency_symmetry": "flips_at_inference",
                # ... on a grid of 16-pixel cells: the network's own 32-pixel cells and, between them, its maps
                # of the image shifted by half a cell, so the peak can fall between two of its cells
                # (docs/localization.md, "Half-cell shifts").
                "saliency_grid": "fine_at_inference",
                "crop_size": [64, 64],
                "attention_dim": 32,
            },
            "loss": {"beta": 3.0e-3},
            "optim": {"lr": 1.0e-3, "scheduler": "cosine", "warmup_steps": 20, "min_lr_ratio": 0.05},
            "data": {
                "manifest": str(manifest),
                "out_shape": [h, w],
                "crop_iterations": crop_iterations,
                "crop_buffer": crop_buffer,
                "batch_size": 16,
                "eval_batch_size": 32,
                "augment": True,
                "max_crop_noise": [12, 12],
                "max_crop_size_noise": 12,
                "tta": 1,
                "keep_in_memory": True,
                "test_split": "",
            },
            "schedule": {
                "epochs": settings.epochs,
                "patience": None,
                "log_every": 5,
                "keep_best_dice": True,
                # The localization model is the one whose Dice times the share of negative validation images its
                # maps leave dark is best: by Dice alone, the best epoch can be an early one whose maps mark
                # every image (docs/localization.md, "Selecting maps that stay dark on negative images").
                "best_dice_metric": "malignant_specific_dice",
                "dice_upsample": "aligned",
                # Two epochs from global average pooling down to t: with top-t% from the first step, the
                # malignant maps of some seeds lock onto an image corner and never reach a lesion
                # (docs/localization.md, "Maps stuck on a corner").
                "t_warmup_epochs": 2,
            },
            "runtime": {"device": "cpu", "amp": amp, "seed": settings.seed, "threads": settings.threads},
        }
    )


def run_demo(
    out_dir: str | Path,
    settings: DemoSettings = DemoSettings(),
    *,
    callback: Callback | None = None,
    synth_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the whole demo into ``out_dir`` and return the metrics dict written to ``metrics.json``."""
    from mammogmic.data.synth import SynthConfig  # noqa: F401 - fail early if the generator is missing
    from mammogmic.data.synth.dataset import generate_dataset

    t0 = time.perf_counter()
    c0 = time.process_time()
    out = Path(out_dir)
    if (out / "metrics.json").exists() or (out / "run" / "last.pt").exists():
        raise MammogmicError(f"{out}: already holds a demo run; choose a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    data_dir = out / "data"
    manifest = data_dir / "manifest.csv"
    if not manifest.exists():
        generate_dataset(
            data_dir,
            settings.n_exams,
            settings.size,
            settings.seed,
            demo_synth_config(),
            settings.workers,
            progress=synth_progress,
        )
    timings["generate"] = time.perf_counter() - t0

    config = demo_train_config(manifest, settings)
    t1 = time.perf_counter()
    trainer = Trainer(config, out / "run", callback=callback)
    result = trainer.fit()
    timings["train"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    metrics = evaluate_with_localization(
        config, _best_or_last(out / "run"), out, callback=callback, n_figures=settings.n_figures
    )
    # The paper selects the localization model separately, by validation Dice.
    dice_model = out / "run" / "best_dice_model.safetensors"
    localization = None
    if dice_model.exists():
        scratch = out / "dice_model"
        scratch.mkdir(exist_ok=True)
        localization = evaluate_with_localization(config, dice_model, scratch, callback=callback, n_figures=0)
    timings["evaluate"] = time.perf_counter() - t2
    # Both models' full figures are kept below.
    test = with_localization_figures(metrics["test"], None if localization is None else localization["test"])
    report = {
        "test": test,
        "test_auroc_selected_model": metrics["test"],
        "test_dice_selected_model": None if localization is None else localization["test"],
        "val": {
            "best_epoch": result.best_epoch,
            "best_malignant_auroc": result.best_metric,
            "best_dice_epoch": result.best_dice_epoch,
            "best_malignant_dice": result.best_dice,
        },
        "seconds": time.perf_counter() - t0,
        "timings": timings,
        "cpu_seconds_main_process": time.process_time() - c0,
        "settings": {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()
        },
        "train_config": config.to_dict(),
        "torch_threads": torch.get_num_threads(),
        "dice_definition": (
            "malignant_dice: of the model selected by validation malignant Dice (the paper's localization model; "
            "the AUROCs come from the model selected by validation AUROC), malignant saliency upsampled "
            "bilinearly to the input with each cell centred on its receptive-field centre (pixel stride*i), "
            "thresholded at 0.5, Dice vs the malignant lesion mask, mean over test images with a malignant "
            "lesion; malignant_dice_nearest: same with the paper's nearest-neighbour blocks; *_soft_*: without "
            "threshold; malignant_offsets: median distance from the lesion centroid to the saliency peak, and to "
            "the centroid of the peak's half-maximum blob (centroid_aligned)"
        ),
        "report": {
            "roc": "roc.png",
            "figures": metrics["figures"],
            "predictions": "predictions.csv",
            "html": metrics.get("html"),
        },
    }
    (out / "metrics.json").write_text(json.dumps(_clean(report), indent=2) + "\n")
    return report


def is_localization_figure(key: str) -> bool:
    """Whether a test figure measures the saliency maps: its Dice, the negatives it marks, its peak offsets."""
    return "dice" in key or key.endswith("_marked") or key == "malignant_offsets"


def with_localization_figures(
    test: Mapping[str, Any], localization: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The reported test figures, as in the paper: classification from the AUROC-selected model (``test``), the
    saliency maps' figures from the Dice-selected one (``localization``; None when the run kept none).

    The one rule the demo and ``ablate`` report by, so that a row of the ablation table and the demo's
    ``metrics.json`` read the same model for the same figure.
    """
    merged = dict(test)
    if localization is not None:
        merged.update({k: v for k, v in localization.items() if is_localization_figure(k)})
    return merged


def _best_or_last(run: Path) -> Path:
    """``best.pt``, or ``last.pt`` when validation never produced a finite metric (tiny validation splits)."""
    best = run / "best.pt"
    return best if best.exists() else run / "last.pt"


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def evaluate_with_localization(
    config: TrainConfig,
    checkpoint: str | Path,
    out: Path,
    *,
    split: str = "test",
    callback: Callback | None = None,
    n_figures: int = 4,
    heads: bool = False,
    inference: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Test AUROC + saliency Dice of the checkpoint on ``split``; writes predictions, ROC and figures to ``out``.

    With ``heads`` the result also holds ``heads``: AUROCs of the global, local and fusion heads and of the
    global/local average, all from this one model. ``inference``: settings that change only how the model is read
    in eval mode (:data:`mammogmic.models.config.INFERENCE_SETTINGS`), to score the same weights another way than
    they were selected with (e.g. an older run with the demo's current maps).
    """
    from mammogmic.evaluation.localization import (
        DiceResult,
        PeakOffsets,
        dice_scores,
        negative_marks,
        peak_offsets,
        specific_dice,
    )
    from mammogmic.evaluation.outputs import FLOAT_FORMAT
    from mammogmic.models import GMIC, load_model, scoring_copy
    from mammogmic.training.checkpoint import load_checkpoint

    model: Any
    if Path(checkpoint).suffix == ".safetensors":
        model = load_model(checkpoint)
    else:
        model = GMIC(config.model)
        model.load_state_dict(load_checkpoint(checkpoint)["model"])
    if inference:
        check_inference_settings(inference)
        model.config = model.config.replace(**inference)
    model = scoring_copy(model)  # what `mammogmic predict` runs for these weights
    d = config.data
    images = split_dataset(config, split, masks=True)
    if len(images) == 0:
        raise MammogmicError(f"{d.manifest}: split {split!r} is empty")
    n = len(images)
    dice: dict[str, list[DiceResult]] = {"aligned": [], "nearest": []}
    marks: list[np.ndarray] = []  # negative_marks, aligned
    order: list[np.ndarray] = []
    keep: dict[int, dict[str, Any]] = {}
    head_probs = {h: np.zeros((n, 2)) for h in ("fusion", "global", "local")}

    offsets: list[PeakOffsets] = []

    def on_batch(o: Any, batch: dict[str, Any]) -> None:
        idx = batch["index"].numpy()
        order.append(idx)
        for mode, parts in dice.items():
            parts.append(dice_scores(o.saliency, batch["masks"], threshold=0.5, upsample=mode))
        marks.append(negative_marks(o.saliency, batch["masks"], batch["labels"], upsample="aligned"))
        offsets.append(
            peak_offsets(
                o.saliency,
                batch["masks"],
                o.patch_locations,
                config.model.crop_size,
                images=batch["image"],
                cell_px=model.global_net.stride,
            )
        )
        head_probs["fusion"][idx] = o.y_fusion.float().numpy()
        head_probs["global"][idx] = o.y_global.float().numpy()
        head_probs["local"][idx] = o.y_local.float().numpy()
        for j, i in enumerate(idx):
            keep[int(i)] = {
                "saliency": o.saliency[j].float().numpy(),
                "locations": o.patch_locations[j].numpy(),
                "attention": o.patch_attention[j].float().numpy(),
            }

    probs, _ = predict(
        model,
        images,
        batch_size=d.eval_batch_size,
        amp=config.runtime.eval_amp,
        on_batch=on_batch,
        callback=callback,
    )
    labels = images.labels
    cls = classification_metrics(images, probs)
    rows = np.concatenate(order)
    aligned, nearest = (DiceResult.concatenate(dice[m]) for m in ("aligned", "nearest"))
    hard = np.full((n, 2), np.nan)
    hard[rows] = aligned.hard
    found = np.concatenate(marks)
    marked = [float(np.nanmean(col)) if np.isfinite(col).any() else math.nan for col in found.T]
    test: dict[str, Any] = {
        "malignant_auroc": cls["malignant_auroc"],
        "benign_auroc": cls["benign_auroc"],
        "malignant_dice": float(aligned.mean_hard[1]),
        "malignant_soft_dice": float(aligned.mean_soft[1]),
        "malignant_dice_nearest": float(nearest.mean_hard[1]),
        "malignant_soft_dice_nearest": float(nearest.mean_soft[1]),
        "benign_dice": float(aligned.mean_hard[0]),
        "benign_dice_nearest": float(nearest.mean_hard[0]),
        "malignant_negatives_marked": marked[1],
        "malignant_specific_dice": specific_dice(float(aligned.mean_hard[1]), marked[1]),
        "benign_negatives_marked": marked[0],
        "n_images": n,
        "n_malignant": int(np.nansum(labels[:, 1])),
        "n_benign": int(np.nansum(labels[:, 0])),
        "n_malignant_with_mask": int(aligned.summary()["malignant"]["n_images"]),
        "malignant_offsets": PeakOffsets.concatenate(offsets).summary(),
    }
    head_metrics: dict[str, dict[str, float]] = {}
    if heads:
        head_probs["average"] = (head_probs["global"] + head_probs["local"]) / 2
        head_metrics = {h: classification_metrics(images, p) for h, p in head_probs.items()}
    with open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "image_id",
                "breast_id",
                "benign_label",
                "malignant_label",
                "benign_pred",
                "malignant_pred",
                "malignant_dice",
                "benign_dice",
            ]
        )
        for i in range(n):
            w.writerow(
                [
                    images.image_ids[i],
                    images.breast_ids[i],
                    *(_fmt(v) for v in labels[i]),
                    *(FLOAT_FORMAT % v for v in probs[i]),  # as predict writes them
                    _fmt(hard[i, 1]),
                    _fmt(hard[i, 0]),
                ]
            )

    figures: list[str] = []
    if n_figures <= 0:
        return {"test": test, "figures": figures, "heads": head_metrics}
    try:
        from mammogmic.visualization import plot_roc, save_gmic_figure

        fig = plot_roc(
            {"malignant": (labels[:, 1], probs[:, 1]), "benign": (labels[:, 0], probs[:, 0])},
            title=f"Synthetic test split ({n} images)",
        )
        fig.savefig(out / "roc.png", dpi=120)
        # Figures: the most confident malignant images, one benign-only image, one normal image.
        mal = [i for i in np.argsort(-probs[:, 1]) if labels[i, 1] == 1][: max(1, n_figures - 2)]
        ben = [i for i in np.argsort(-probs[:, 0]) if labels[i, 0] == 1 and labels[i, 1] == 0][:1]
        nor = [i for i in range(n) if labels[i, 0] == 0 and labels[i, 1] == 0][:1]
        for i in [*mal, *ben, *nor][:n_figures]:
            sample = images.load(int(i))
            item = images.items[int(i)]
            k = keep[int(i)]
            path = out / "figures" / f"{images.image_ids[i]}.png"
            save_gmic_figure(
                path,
                dpi=100,
                image=sample["image"][0].numpy(),
                saliency=k["saliency"],
                patch_locations=k["locations"],
                crop_size=config.model.crop_size,
                patch_attention=k["attention"],
                benign_mask=sample["masks"][0].numpy(),
                malignant_mask=sample["masks"][1].numpy(),
                scores={"benign": float(probs[i, 0]), "malignant": float(probs[i, 1])},
                title=f"{images.image_ids[i]} (labels benign={int(labels[i, 0])}, malignant={int(labels[i, 1])})",
                mirrored=needs_flip(item.view or "L-CC", item.horizontal_flip),
            )
            figures.append(str(path.relative_to(out)))
    except ImportError as exc:  # pragma: no cover - visualization package absent
        logger.warning("figures skipped: %s", exc)
    return {"test": test, "figures": figures, "heads": head_metrics}


def _fmt(v: float) -> str:
    return "" if not math.isfinite(float(v)) else f"{float(v):.4f}"
