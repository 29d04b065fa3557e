"""``mammogmic evaluate``, ``mammogmic predict`` and ``mammogmic visualize``.

Heavy imports (numpy, pandas, torch, matplotlib) happen inside the ``run_*`` functions so that
``mammogmic --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mammogmic.cli import allocator_record, deprecated_alias, progress_bar
from mammogmic.runtime import AMP_MODES, SCORING_AMP

if TYPE_CHECKING:
    from mammogmic._outdir import OutputFolder
    from mammogmic.evaluation.outputs import PredictionWriter

logger = logging.getLogger(__name__)

EVALUATE_EPILOG = """\
Examples:
  mammogmic evaluate preds.csv --label malignant_label --scores malignant_pred --json metrics.json
  mammogmic evaluate preds.csv --label malignant_label --scores malignant_pred --group breast
  mammogmic evaluate readers.csv --label cancer --scores 'reader_*' model \\
      --hybrid-model model --lambdas 0,0.25,0.5,0.75,1 --json hybrid.json
  mammogmic evaluate test.csv --label cancer --scores 'model_*' --ensemble-val val.csv --ensemble-step 0.1
  mammogmic evaluate test.csv --label cancer --scores model_a model_b --compare model_a model_b

Grouping (--group): 'image' uses the rows as they are; 'breast' averages each score over the breast's
views (mean of the per-view means) and takes the maximum label (or breast_<label> when present);
'exam' then takes the maximum over the exam's breasts. Breasts are identified by breast_id, else by
exam_id + laterality, else by parsing names like '0_L-CC' from image_index.

JSON (--json): {"label", "group", "n_rows", "bootstrap", "seed",
  "metrics": {COLUMN: {"auroc", "auroc_ci": [low, high], "auprc", "auprc_ci", "average_precision",
                       "average_precision_ci", "n", "n_positive", "operating_points": [...]}},
  "hybrid": {READER: {LAMBDA: auroc}}, "hybrid_mean": {LAMBDA: auroc},     (with --hybrid-model)
  "comparisons": [{"a", "b", "difference", "difference_ci", "p_value", ...}],  (with --compare)
  "ensemble": {"weights": {COLUMN: w}, "val_auroc", "test_auroc", ...}}      (with --ensemble-val)
LAMBDA keys are written in their shortest form: "0", "0.25", "0.5", "0.75", "1". Missing values are null.
AUPRC is the trapezoidal area under the PR curve (as the NYU meta-repository reports it);
average_precision is the step-wise sum. CIs: percentile bootstrap, single-class resamples skipped,
no CI below 8 rows.

Ensemble (--ensemble-val VAL.csv): weights w_i >= 0 with sum 1 on a grid of spacing --ensemble-step
over all --scores columns are chosen to maximise AUROC on VAL.csv (same --label, --scores, --group),
then Σ w_i·column_i is evaluated on CSV as the extra column 'ensemble'.
"""


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``evaluate``, ``predict`` and ``visualize``; returns the ``evaluate`` parser."""
    ev = subparsers.add_parser(
        "evaluate",
        help="AUROC/AUPRC with bootstrap CIs, reader hybrids, paired comparisons and ensembles from a CSV",
        description="Evaluate one or more score columns of a CSV against a 0/1 label column.",
        epilog=EVALUATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("csv", type=Path, metavar="CSV", help="table with a label column and score columns")
    ev.add_argument(
        "--label", required=True, metavar="COL", help="0/1 label column (empty = unknown, left out)"
    )
    ev.add_argument(
        "--scores",
        required=True,
        nargs="+",
        metavar="PATTERN",
        help="score columns: names or shell globs such as 'reader_*' (quote globs)",
    )
    ev.add_argument("--group", choices=("image", "breast", "exam"), default="image", help="evaluation level")
    ev.add_argument(
        "--hybrid-model", metavar="COL", help="model column; all other --scores columns are readers"
    )
    ev.add_argument(
        "--lambdas",
        type=_float_list,
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        metavar="L1,L2,...",
        help="reader weights λ of the hybrid λ·reader + (1−λ)·model (default 0,0.25,0.5,0.75,1)",
    )
    ev.add_argument(
        "--compare",
        nargs=2,
        action="append",
        default=[],
        metavar=("A", "B"),
        help="paired bootstrap of AUROC(A) − AUROC(B); repeatable",
    )
    ev.add_argument("--ensemble-val", type=Path, metavar="VAL.csv", help="fit ensemble weights on this table")
    ev.add_argument("--ensemble-step", type=float, default=0.1, help="grid spacing of ensemble weights (0.1)")
    ev.add_argument(
        "--bootstrap", type=int, default=2000, metavar="N", help="bootstrap resamples (0: no CIs)"
    )
    ev.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    ev.add_argument(
        "--thresholds",
        type=_float_list,
        default=[],
        metavar="T1,T2,...",
        help="report sensitivity/specificity of score >= T",
    )
    ev.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    ev.add_argument("--markdown", type=Path, metavar="PATH", help="write the results as Markdown tables")
    ev.add_argument("--plots", type=Path, metavar="DIR", help="write roc.png and pr.png into DIR")
    ev.set_defaults(func=run_evaluate)
    add_predict_parsers(subparsers)
    return ev


def _read_csv(path: Path) -> Any:
    import pandas as pd

    from mammogmic.errors import MammogmicError

    if not path.is_file():
        raise MammogmicError(f"{path}: no such file")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MammogmicError(f"{path}: not a readable CSV ({exc})") from exc


def _check_outputs(inputs: list[Path], outputs: list[Path | None]) -> None:
    from mammogmic.errors import MammogmicError

    resolved = {p.resolve() for p in inputs}
    for out in outputs:
        if out is not None and out.resolve() in resolved:
            raise MammogmicError(f"{out}: refusing to overwrite an input file")


def _curve_pngs(result: dict[str, Any], table: Any, title: str) -> list[tuple[str, bytes]]:
    """ROC and PR figures of every evaluated column, as PNG bytes."""
    import io

    from mammogmic.visualization.curves import plot_pr, plot_roc

    y = table[result["label"]].astype(int).to_numpy()
    curves = {col: (y, table[col].to_numpy(dtype=float)) for col in result["metrics"] if col in table.columns}
    out = []
    for name, fig in (
        ("roc", plot_roc(curves, title=f"ROC — {title}")),
        ("pr", plot_pr(curves, title=f"PR — {title}")),
    ):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=150)
        out.append((name, buf.getvalue()))
    return out


def run_evaluate(args: argparse.Namespace) -> int:
    """Entry point of ``mammogmic evaluate``."""
    import matplotlib

    matplotlib.use("Agg")
    from mammogmic.errors import MammogmicError
    from mammogmic.evaluation.table import evaluate_table, markdown_summary

    try:
        _check_outputs(
            [args.csv] + ([args.ensemble_val] if args.ensemble_val else []),
            [args.json, args.markdown],
        )
        df = _read_csv(args.csv)
        val = _read_csv(args.ensemble_val) if args.ensemble_val else None
        result, table = evaluate_table(
            df,
            label=args.label,
            scores=args.scores,
            group=args.group,
            hybrid_model=args.hybrid_model,
            lambdas=args.lambdas,
            compare=[tuple(pair) for pair in args.compare],
            ensemble_val=val,
            ensemble_step=args.ensemble_step,
            n_bootstrap=args.bootstrap,
            seed=args.seed,
            thresholds=args.thresholds,
            source=str(args.csv),
        )
    except (MammogmicError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {"input": str(args.csv), **result}
    text = markdown_summary(result, title=f"Evaluation of {args.csv.name}")
    print(text, end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text, encoding="utf-8")
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        for name, png in _curve_pngs(result, table, f"{args.group} level"):
            (args.plots / f"{name}.png").write_bytes(png)
    return 0


PREDICT_EPILOG = """\
Examples:
  mammogmic predict scans/ --model gmic.safetensors --out preds/
  mammogmic predict --manifest test.csv --model a.safetensors --model b.safetensors --out preds/ --tta 10
  mammogmic predict scans/ --model sample_model_1.p --percent-t 0.02 \\
      --model sample_model_4.p --percent-t 0.05 --out preds/ --device cuda --amp bf16

Inputs: folders (searched recursively for .png/.dcm/.dicom), single files, and/or --manifest CSV
(image_id, image_path, and optionally laterality, view, exam_id, labels, masks, and the preprocess
cache columns cached_path + best_center, which skip the crop and centre stages). Without a manifest
the view comes from the DICOM tags or the file name (e.g. 0_L-CC.png).

Models: our .safetensors files, or official .p files; each .p file takes the next --percent-t value
(sample_model_N.p defaults to the released t of model N). Several models form an ensemble whose
probabilities are averaged; --tta N also averages N random windows per image (default: the model's own, 1 for official files).

Outputs (in --out): image_predictions.csv (image_index, benign_pred, malignant_pred, labels when known,
then ids, laterality, view, path; per-model columns for ensembles), breast_predictions.csv,
breast_predictions_metarepository.csv (index, left_malignant, right_malignant, left_benign,
right_benign), exam_summary.csv, errors.csv (one row per image that failed, with the stage and reason),
run.json, and with --save-saliency saliency/<image_id>.npz, with --save-patches patches.json.
Each row records input_sha256 (the image file), input_key (with the cache file and manifest fields) and
run_key (models, t, input contracts, TTA, precision; in full in run.json). A rerun with the same run_key skips
images whose input_key is unchanged; another run_key predicts everything again and drops the earlier rows.
--overwrite predicts everything again.

--out must be new, empty, or a folder this command wrote (listed in its .mammogmic-out.json); other files
need --force, and files with an output's name that we did not write are never overwritten. One run at a
time per folder: a second one exits with status 2, or waits with --wait.
--report also writes report.html, the exam report (see `mammogmic visualize --help`), and figures/:
the full-size explanation figure and the report's picture data of each image predicted in this run.
DMV-CNN models (official .p or ours; docs/dmv.md) predict whole exams (one image per view) into
breast_predictions.csv and breast_predictions_metarepository.csv; image + heat-map models need --heatmaps DIR.
GMIC models given with DMV-CNN models join a mixed ensemble: every model's breast probabilities averaged
(GMIC: mean over the breast's views), each model's in <benign|malignant>_pred__<model> columns.
Exit status: 0 when every image worked, 1 when some failed (see errors.csv), 2 on bad arguments or an
unusable --out.
"""

VISUALIZE_EPILOG = """\
Examples:
  mammogmic visualize --manifest test.csv --model gmic.safetensors --out figures/ --report
  mammogmic visualize --manifest test.csv --model gmic.safetensors --out rep/ --report \
      --operating-point sensitivity=0.9 --operating-table val_preds/image_predictions.csv
  mammogmic visualize scan.dcm --model sample_model_1.p --out fig/

Writes figures/<image_id>.png (input with lesion outlines when the manifest has masks, patch map,
benign and malignant saliency, the K patches with attention), image_predictions.csv, errors.csv, and
with masks localization.json (Dice of the upsampled saliency maps vs the masks). Explanations come from
the first model on the first window.

--report adds report.html, the exam report: one self-contained page (no scripts, nothing fetched) with
one section per exam, its four views hung R-CC L-CC / R-MLO L-MLO back to back, each with its saliency
overlay (malignant/benign/none, switchable), the K patches numbered with their attention, breast and exam
scores and, with an operating point, the call per breast; a cohort section when labels are known (metrics
with bootstrap CIs, ROC/PR curves with 95% bands and the operating point, subgroups by density, vendor,
site, dataset and age band where the manifest has them); provenance (run.json) and the failed images.
Operating point: --threshold T (malignant breast score >= T is positive), or --operating-point
sensitivity=S|specificity=P fitted at breast level on --operating-table, the image_predictions.csv of a
labelled validation run. Each image takes at most 200 KB of the page; a click opens its full figure.
Every run predicts every image and replaces the earlier run's outputs in --out (same --out rules as
predict: new, empty or ours; --force, --wait).
"""


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", type=Path, metavar="INPUT", help="image files and/or folders")
    p.add_argument("--manifest", type=Path, help="manifest CSV listing the images")
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        type=Path,
        required=True,
        help="model file; repeat for ensembles",
    )
    p.add_argument(
        "--percent-t",
        action="append",
        type=float,
        default=[],
        metavar="T",
        help="t of the next official .p model, in order (repeat per .p file)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument(
        "--amp",
        choices=AMP_MODES,
        default=SCORING_AMP,
        help="bf16 autocast: bf16, none (the default: float32, what training runs score in) or auto (bf16 "
        "where the device computes it natively)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (4)")
    p.add_argument(
        "-j", "--workers", type=int, default=None, help="preprocessing processes (default: by CPU count)"
    )
    p.add_argument(
        "--tta",
        type=int,
        default=None,
        help="average N random windows per image (default: the model's own setting, 1 = no TTA)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the TTA windows")
    p.add_argument(
        "--input-size",
        nargs=2,
        type=int,
        default=None,
        metavar=("H", "W"),
        help="model input size (default: the one the model was trained with, stored in its file; "
        "official .p files: 2944 1920). A value that contradicts the model's is used, with a warning",
    )
    p.add_argument(
        "--window-size",
        nargs=2,
        type=int,
        default=None,
        metavar=("H", "W"),
        help="window cut from the image before resizing to --input-size (default: the model's)",
    )
    p.add_argument(
        "--crop-iterations",
        type=int,
        default=None,
        help="breast-crop morphology iterations (default: the model's; official 100)",
    )
    p.add_argument(
        "--no-fuse",
        action="store_true",
        help="keep BatchNorm layers separate (default: fold them into the convolutions; same outputs, faster)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the models with TorchInductor (needs g++; the first batch takes 20-50 s to compile, "
        "then 1.1-1.5x faster on CPU: worth it for hundreds of images)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into an --out that holds other files (never overwriting any of them)",
    )
    p.add_argument(
        "--wait", action="store_true", help="wait for another run writing into --out instead of failing"
    )
    deprecated_alias(
        p, "--dtype", "--amp", value_map={"fp32": "none", "bf16": "bf16"}, note="fp32 is --amp none"
    )


def add_predict_parsers(subparsers: Any) -> None:
    """Register ``predict`` and ``visualize``."""
    from mammogmic.cli import dicom_cmds

    pr = subparsers.add_parser(
        "predict",
        help="predict benign/malignant probabilities for images (CSV at image, breast and exam level)",
        description="Run one or more GMIC models on mammograms and write prediction tables.",
        epilog=PREDICT_EPILOG + "\n" + dicom_cmds.DICOM_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_inference_args(pr)
    pr.add_argument("--save-saliency", action="store_true", help="write saliency/<image_id>.npz")
    pr.add_argument("--save-patches", action="store_true", help="write patches.json (locations, attention)")
    pr.add_argument(
        "--overwrite",
        action="store_true",
        help="predict every image again, replacing earlier predictions in --out",
    )
    deprecated_alias(pr, "--overwrite-predictions", "--overwrite")
    pr.add_argument(
        "--heatmaps",
        type=Path,
        help="models with heat-map channels (GMIC in_channels 3, DMV-CNN image + heat maps): folder of "
        "`mammogmic heatmaps` outputs (<image_id>.npz); a manifest's heatmap_path column wins",
    )
    dicom_cmds.add_arguments(pr)
    _add_report_args(pr)
    pr.set_defaults(func=run_predict)

    vi = subparsers.add_parser(
        "visualize",
        help="GMIC explanation figures (saliency, patches, attention) and a self-contained HTML report",
        description="Predict and draw the GMIC explanation figure for each image.",
        epilog=VISUALIZE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_inference_args(vi)
    _add_report_args(vi)
    vi.add_argument(  # deprecated: the report shows exams now (--max-exams)
        "--max-figures", type=int, default=None, metavar="N", help=argparse.SUPPRESS
    )
    vi.add_argument("--dice-threshold", type=float, default=0.5, help="saliency threshold of the hard Dice")
    vi.add_argument(
        "--dice-upsample",
        choices=("nearest", "aligned"),
        default="nearest",
        help="saliency upsampling before Dice: the paper's nearest-neighbour blocks (default) or cells at their "
        "receptive-field centres (docs/localization.md)",
    )
    vi.set_defaults(func=run_visualize)


def _operating_target(text: str) -> tuple[str, float]:
    """``sensitivity=0.9`` / ``specificity=0.95`` → ``("sensitivity", 0.9)``."""
    name, sep, value = text.partition("=")
    name = name.strip().lower()
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or name not in ("sensitivity", "specificity") or not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(
            f"expected sensitivity=S or specificity=P with a value in (0, 1], e.g. sensitivity=0.9; got {text!r}"
        )
    return name, number


def _add_report_args(p: argparse.ArgumentParser) -> None:
    """The exam report's options (predict and visualize)."""
    p.add_argument(
        "--report",
        action="store_true",
        help="also write report.html: the exam report (four views per exam, saliency, patches, scores, "
        "cohort metrics, provenance); predict then also writes figures/",
    )
    point = p.add_mutually_exclusive_group()
    point.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="report: call a breast positive when its malignant score is >= T",
    )
    point.add_argument(
        "--operating-point",
        type=_operating_target,
        metavar="TARGET=V",
        help="report: the threshold reaching sensitivity=V or specificity=V at breast level on --operating-table",
    )
    p.add_argument(
        "--operating-table",
        type=Path,
        metavar="CSV",
        help="labelled validation predictions (a run's image_predictions.csv) to fit --operating-point on",
    )
    p.add_argument(
        "--max-exams",
        type=int,
        default=100,
        metavar="N",
        help="report: draw the N exams with the highest malignant scores (100); every exam is listed",
    )
    p.add_argument("--dpi", type=int, default=150, help="resolution of the full-size figures (150)")


def _report_settings(args: argparse.Namespace) -> Any:
    """The operating point of the report (``None`` without one); bad report options are errors here, before
    any output folder is made."""
    from mammogmic.errors import MammogmicError
    from mammogmic.evaluation.table import OperatingPoint, fit_operating_point

    if getattr(args, "max_figures", None) is not None:
        logger.warning("--max-figures is deprecated: the report draws exams; use --max-exams")
        args.max_exams = max(1, math.ceil(args.max_figures / 4))
    used = [
        flag
        for flag, value in (
            ("--threshold", args.threshold),
            ("--operating-point", args.operating_point),
            ("--operating-table", args.operating_table),
        )
        if value is not None
    ]
    if used and not args.report:
        raise MammogmicError(f"{', '.join(used)} only apply to the report: add --report")
    if args.max_exams < 0:
        raise MammogmicError(f"--max-exams must be >= 0, got {args.max_exams}")
    if args.operating_table is not None and args.operating_point is None:
        raise MammogmicError(
            "--operating-table is what --operating-point is fitted on: give --operating-point too"
        )
    if args.threshold is not None:
        try:
            return OperatingPoint.given(args.threshold)
        except ValueError as exc:
            raise MammogmicError(f"--threshold: {exc}") from None
    if args.operating_point is None:
        return None
    if args.operating_table is None:
        raise MammogmicError(
            "--operating-point is fitted on labelled validation predictions: give --operating-table "
            "VAL/image_predictions.csv (fitting it on the predictions being reported would flatter it)"
        )
    target, value = args.operating_point
    table = _read_csv(args.operating_table)
    try:
        return fit_operating_point(table, target, value, source=str(args.operating_table))
    except ValueError as exc:
        raise MammogmicError(f"--operating-table {args.operating_table}: {exc}") from None


def _failed_views(errors: list[dict[str, str]], items: list[Any]) -> Any:
    """``errors.csv`` rows with the exam and view of each failed image (when known), for the report."""
    import pandas as pd

    from mammogmic.evaluation.aggregation import IMAGE_NAME

    by_id = {item.image_id: item for item in items}
    rows = []
    for e in errors:
        item = by_id.get(e["image_id"])
        exam = item.exam_id if item is not None else None
        view = item.view if item is not None else None
        match = IMAGE_NAME.match(e["image_id"])
        if match:
            exam = exam or match.group("exam")
            view = view or f"{match.group('laterality').upper()}-{match.group('view').upper()}"
        rows.append({**e, "exam_id": exam, "view": view})
    return pd.DataFrame(rows, columns=["image_id", "path", "stage", "error", "exam_id", "view"])


def _subgroup_values(args: argparse.Namespace) -> Any:
    """The manifest's subgroup columns (density, vendor, site, dataset, age), by image id; ``None`` without."""
    import pandas as pd

    from mammogmic.evaluation.table import SUBGROUPS

    if not args.manifest:
        return None
    wanted = {c for names in SUBGROUPS.values() for c in names}
    table = pd.read_csv(args.manifest, dtype=str, keep_default_na=False)
    columns = [c for c in table.columns if c in wanted]
    if not columns or "image_id" not in table.columns:
        return None
    values = (
        table[["image_id", *columns]].drop_duplicates("image_id").rename(columns={"image_id": "image_index"})
    )
    return values.replace("", None)


def _write_report(
    args: argparse.Namespace,
    folder: OutputFolder,
    writer: PredictionWriter,
    items: list[Any],
    point: Any,
) -> Path:
    """report.html of what the folder holds now (every row of the image table, this run's or kept)."""
    from mammogmic.evaluation.outputs import RUN_JSON
    from mammogmic.visualization.report import write_exam_report

    table = writer.image_table()
    extra = _subgroup_values(args)
    if extra is not None and len(table):
        own = [c for c in extra.columns if c != "image_index" and c in table.columns]
        table = table.merge(extra.drop(columns=own), on="image_index", how="left")
    run_path = args.out / RUN_JSON
    run = json.loads(run_path.read_text(encoding="utf-8")) if run_path.is_file() else None
    folder.claim("report.html")
    result = write_exam_report(
        args.out / "report.html",
        table,
        args.out / "figures",
        run=run,
        errors=_failed_views(writer.errors, items),
        operating_point=point,
        max_exams=args.max_exams,
        title=f"GMIC exam report: {args.out.resolve().name}",
    )
    path: Path = result["path"]
    return path


def _collect_items(args: argparse.Namespace) -> list[Any]:
    """Items of the manifest, the folders and the files given, each input once, with unique ids.

    A file named twice (or given and also found in a given folder) is predicted once; missing or odd
    paths are kept, so that they are reported in errors.csv.
    """
    import os

    from mammogmic.errors import MammogmicError
    from mammogmic.evaluation.inference import (
        ImageItem,
        items_from_folder,
        items_from_manifest,
        items_from_paths,
    )
    from mammogmic.evaluation.inputs import unique_ids

    missing = [str(path) for path in args.inputs if not os.path.lexists(path)]
    if missing:  # a misspelled argument, not a bad image: refused before anything is written
        raise MammogmicError(f"no such file or folder: {', '.join(missing)}")
    items: list[ImageItem] = []
    if args.manifest:
        items += items_from_manifest(args.manifest)
    found: list[ImageItem] = []
    files = []
    for path in args.inputs:
        if path.is_dir():
            # Our own figures must not be read back as inputs when --out lies inside an input folder.
            exclude = [args.out / d for d in _OUTPUT_DIRS]
            if getattr(args, "dicom_out", None) is not None:
                exclude.append(args.dicom_out)  # our SR/SEG are not inputs
            found += items_from_folder(path, exclude=exclude)
        else:
            files.append(path)  # missing files are reported in errors.csv like any unreadable image
    found += items_from_paths(files)
    seen: set[str] = set()
    for item in found:  # the same path twice (a file and its folder, a folder given twice): once
        key = os.path.normpath(os.path.abspath(item.path))
        if key in seen:
            logger.warning("%s: given more than once; predicted once", item.path)
            continue
        seen.add(key)
        items.append(item)
    if not items:
        raise MammogmicError("no input images: give files, folders or --manifest")
    for item, image_id in zip(items, unique_ids([i.image_id for i in items]), strict=True):
        item.image_id = image_id  # ids must be unique across all inputs
    return items


# Everything predict/visualize may write inside --out.
_OUTPUT_FILES = (
    "image_predictions.csv",
    "breast_predictions.csv",
    "breast_predictions_metarepository.csv",
    "exam_summary.csv",
    "errors.csv",
    "run.json",
    "patches.json",
    "localization.json",
    "report.html",
)
# retrieved, dicom: predict's DICOM options; parts: the ranks' own outputs under torchrun (cli/predict_ranks.py)
_OUTPUT_DIRS = ("saliency", "figures", "retrieved", "dicom", "parts")


def _check_inputs_untouched(args: argparse.Namespace, items: list[Any]) -> None:
    """Refuse an --out where an output file would land on an input (image, mask, manifest, model)."""
    from mammogmic.errors import MammogmicError

    def real(path: Any) -> Path:
        # os.path.realpath, unlike Path.resolve on Python 3.11, does not raise on a symlink loop in an input
        # folder (such a path is then reported as unreadable like any other bad input).
        return Path(os.path.realpath(path))

    out = real(args.out)
    protected = {real(m) for m in args.models}
    for item in items:
        for path in (item.path, item.benign_mask_path, item.malignant_mask_path, item.cached_path):
            if path is not None:
                protected.add(real(path))
    if args.manifest:
        protected.add(real(args.manifest))
    targets = {out / name for name in _OUTPUT_FILES}
    dirs = [out / name for name in _OUTPUT_DIRS]
    clash = sorted(str(p) for p in protected if p in targets or any(p.is_relative_to(d) for d in dirs))
    if out in protected or clash:
        raise MammogmicError(
            f"{args.out}: outputs would overwrite input file(s) {clash[:3] or [str(out)]}; choose another --out"
        )


def _check_out_folder(args: argparse.Namespace, command: str, items: list[Any]) -> OutputFolder:
    """Claim --out for this run (an :class:`~mammogmic._outdir.OutputFolder`, to use in a ``with``).

    Refused before anything is written: an --out that is a file, where an output would land on an input,
    that another run is writing into (unless --wait), that holds files we did not write (unless --force),
    or whose files of an output's name are not ours (never overwritten).
    """
    from mammogmic._outdir import OutputFolder, OutputLayout
    from mammogmic.errors import MammogmicError

    if args.out.exists() and not args.out.is_dir():
        raise MammogmicError(f"{args.out}: --out must be a folder, and this is an existing file")
    for model in args.models:
        if not model.is_file():
            raise MammogmicError(f"{model}: no such model file")
    _check_inputs_untouched(args, items)
    layout = OutputLayout(command, frozenset(_OUTPUT_FILES), frozenset(_OUTPUT_DIRS))
    return OutputFolder(args.out, layout, force=args.force, wait=args.wait)


def _load_members(args: argparse.Namespace, device: str, dtype: str = "fp32") -> list[Any]:
    from mammogmic.errors import MammogmicError
    from mammogmic.evaluation.inference import load_member
    from mammogmic.runtime import keep_freed_heap

    official = [m for m in args.models if m.suffix == ".p"]
    if len(args.percent_t) > len(official):
        raise MammogmicError(
            f"{len(args.percent_t)} --percent-t values for {len(official)} official .p model(s)"
        )
    ts = iter(args.percent_t)
    members = []
    for path in args.models:
        t = next(ts, None) if path.suffix == ".p" else None
        members.append(
            load_member(
                path, percent_t=t, device=device, fuse=not args.no_fuse, compile=args.compile, dtype=dtype
            )
        )
    names = [m.name for m in members]
    for i, m in enumerate(members):
        if names.count(m.name) > 1:
            m.name = f"{m.name}_{i + 1}"
    choice = getattr(args, "allocator_choice", None)
    if choice is not None and choice.keep_heap and device == "cpu":
        # Only now: kept from the start, the heap would also hold the blocks that loading and fusing freed.
        keep_freed_heap()
    return members


def _apply_contract_overrides(args: argparse.Namespace, members: list[Any]) -> None:
    """Explicit size/crop flags replace the models' stored values; a contradiction is allowed but warned."""
    import dataclasses

    overrides: dict[str, Any] = {}
    if args.input_size is not None:
        overrides["input_shape"] = (int(args.input_size[0]), int(args.input_size[1]))
    if args.window_size is not None:
        overrides["window_shape"] = (int(args.window_size[0]), int(args.window_size[1]))
    if args.crop_iterations is not None:
        overrides["crop_iterations"] = int(args.crop_iterations)
    if not overrides:
        return
    flags = {
        "input_shape": "--input-size",
        "window_shape": "--window-size",
        "crop_iterations": "--crop-iterations",
    }
    for member in members:
        stored = member.contract
        for name, value in overrides.items():
            own = getattr(stored, name)
            if name == "window_shape":
                own = stored.window
            if own != value:
                show = lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
                logger.warning(
                    "%s: the model was trained with %s %s; %s %s overrides it (its inputs will differ from "
                    "training)",
                    member.source,
                    name,
                    show(own),
                    flags[name],
                    show(value),
                )
        member.contract = dataclasses.replace(stored, **overrides)


def _resolve_dtype(args: argparse.Namespace, device: str) -> str:
    """``--amp`` on ``device`` as the inference dtype: ``bf16`` (autocast) or ``fp32`` (recorded in run.json and
    the run key, as before ``--amp`` replaced ``--dtype``)."""
    from mammogmic.runtime import resolve_amp

    return "bf16" if resolve_amp(args.amp, device) == "bf16" else "fp32"


def _resolve_device(name: str) -> str:
    """``auto`` → cuda when available; a CUDA device that is not there is a clear error."""
    import torch

    from mammogmic.errors import MammogmicError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise MammogmicError(f"--device {name!r}: not a device name ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MammogmicError(f"--device {name}: no CUDA device is available to this torch build")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MammogmicError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return name


def _run_inference(
    args: argparse.Namespace,
    items: list[Any],
    folder: OutputFolder | None,
    writer_options: dict[str, Any],
    keep_explanations: bool,
    keep_images: bool,
    handle_result: Any = None,
) -> tuple[list[Any], list[Any], dict[str, Any], PredictionWriter]:
    """Shared body of predict and visualize: items → predictions, fed to a ``PredictionWriter`` that keeps
    only earlier rows made from the same files, models and settings (returned last)."""
    import shlex
    import time

    from mammogmic._provenance import code_version
    from mammogmic.cli.dmv_cmds import attach_heatmap_folder
    from mammogmic.evaluation.inference import PrepareSettings, default_workers, predict_items
    from mammogmic.evaluation.outputs import (
        PredictionWriter,
        hash_inputs,
        run_key,
        run_settings,
        settings_differences,
    )

    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args, device)
    members = _load_members(args, device, dtype)
    _apply_contract_overrides(args, members)
    attach_heatmap_folder(args, items, [m.source for m in members if m.contract.heatmaps])
    tta = args.tta
    if tta is None:
        defaults = sorted({m.contract.tta for m in members})
        if len(defaults) > 1:
            logger.warning(
                "the models' TTA defaults differ (%s); using %d (pass --tta)", defaults, defaults[-1]
            )
        tta = defaults[-1]
    settings = PrepareSettings(tta=tta, seed=args.seed, load_masks=keep_images)
    key_settings = run_settings(members, tta, args.seed, dtype)
    writer = PredictionWriter(
        args.out, **writer_options, run_key=run_key(key_settings), settings=key_settings, folder=folder
    )
    if writer.n_stale:
        print(
            f"{writer.n_stale} earlier prediction(s) in {args.out} were made with other models or settings "
            f"({settings_differences(writer.previous_settings, key_settings)}); replacing them: every input "
            "is predicted again",
            file=sys.stderr,
        )
    todo = writer.plan(items, hash_inputs(items))
    if writer.n_kept:
        print(
            f"{writer.n_kept} image(s) already predicted in {args.out} from the same files, models and "
            "settings; skipping them",
            file=sys.stderr,
        )
    if writer.n_input_changed:
        print(
            f"{writer.n_input_changed} image(s) changed since they were predicted (file content or manifest "
            "fields); predicting them again",
            file=sys.stderr,
        )
    info: dict[str, Any] = {
        "models": [
            {
                "name": m.name,
                "path": m.source,
                "sha256": m.sha256,
                "percent_t": m.percent_t,
                "input_contract": m.contract.to_dict(),
            }
            for m in members
        ],
        "device": device,
        "dtype": dtype,
        "fused": not args.no_fuse,
        "compiled": args.compile,
        "allocator": allocator_record(args),
        "tta": tta,
        "seed": args.seed,
        "n_inputs": len(items),
        "n_run": len(todo),
        "mammogmic_version": code_version(),
        "command": shlex.join(getattr(args, "command_line", None) or ["mammogmic", args.func.__name__]),
    }
    writer.begin(info)
    errors: list[Any] = []

    def on_error(p: Any) -> None:
        errors.append(p)
        writer.add_error(p)

    def on_result(res: Any) -> None:
        writer.add_result(res)
        if handle_result is not None:
            handle_result(res, writer.keys_of(res.item.image_id))

    bar = progress_bar(len(todo), no_progress=args.no_progress, unit="img", desc="predict")

    def progress(n: int) -> None:
        bar.update(n)
        writer.flush()

    start = time.perf_counter()
    results = predict_items(
        todo,
        members,
        settings,
        batch_size=args.batch_size,
        device=device,
        dtype=dtype,
        workers=default_workers() if args.workers is None else args.workers,
        keep_explanations=keep_explanations,
        keep_images=keep_images,
        on_error=on_error,
        on_result=on_result,
        progress=progress,
    )
    bar.close()
    info["seconds"] = round(time.perf_counter() - start, 3)
    return results, errors, info, writer


def run_predict(args: argparse.Namespace) -> int:
    """Entry point of ``mammogmic predict``."""
    from mammogmic.cli import dicom_cmds
    from mammogmic.cli.dmv_cmds import dmv_models_given, run_dmv_predict
    from mammogmic.cli.predict_ranks import run_predict_ranks, world_size
    from mammogmic.errors import MammogmicError

    if world_size() > 1:  # under torchrun: a shard per rank, merged by rank 0 (cli/predict_ranks.py)
        return run_predict_ranks(args)
    try:
        if dmv_models_given(args):  # DMV-CNN files: exam-level prediction (cli/dmv_cmds.py)
            if dicom_cmds.used(args):
                raise MammogmicError("the DICOM options (--dicom-out, --dicomweb) work with GMIC models only")
            if args.report:
                raise MammogmicError(
                    "--report draws GMIC saliency maps and patches: DMV-CNN models have none"
                )
            return run_dmv_predict(args)
        point = _report_settings(args)
        dicom = dicom_cmds.DicomRun(args) if dicom_cmds.used(args) else None
        if dicom is not None:
            dicom.preflight()  # options, extras, server and studies: before any folder is made
        items = [] if args.dicomweb else _collect_items(args)
        with contextlib.ExitStack() as stack:
            if dicom is not None:
                dicom.claim_outside(stack)
            folder = stack.enter_context(_check_out_folder(args, "predict", items))
            folder.remove("report.html")  # it showed the folder as it was; written again below with --report
            if dicom is not None:
                items = dicom.start(stack, folder) or items
            options = {
                # SR/SEG need every image's explanations, which earlier runs do not keep.
                "overwrite": args.overwrite or (dicom is not None and dicom.writes),
                "save_saliency": args.save_saliency,
                "save_patches": args.save_patches,
            }
            pictures = None
            if args.report:
                from mammogmic.visualization.pictures import ResultPictures

                folder.claim("figures")
                pictures = ResultPictures(args.out / "figures", dpi=args.dpi, report=True)

            def draw(res: Any, keys: tuple[str | None, str | None]) -> None:
                if pictures is not None:
                    pictures(res, *keys)
                res.image = None  # release the full-size arrays at once (SR/SEG need only the maps)
                res.masks = None

            explain = (
                args.save_saliency or args.save_patches or args.report or (dicom is not None and dicom.writes)
            )
            results, errors, info, writer = _run_inference(
                args, items, folder, options, explain, args.report, handle_result=draw
            )
            if dicom is not None:
                dicom.finish(results, errors, writer, info)
                info.update(dicom.summary)
            written = writer.finish(info)
            if args.report:
                written["report"] = _write_report(args, folder, writer, items, point)
    except (MammogmicError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{info['n_run'] - len(errors)} image(s) predicted, {len(errors)} failed; outputs in {args.out}")
    for path in written.values():
        print(f"  {path}")
    if dicom is not None:
        dicom.report()
    return 1 if errors or writer.output_errors else 0


def run_visualize(args: argparse.Namespace) -> int:
    """Entry point of ``mammogmic visualize``."""
    import matplotlib

    matplotlib.use("Agg")

    from mammogmic._outdir import atomic_write_text
    from mammogmic.errors import MammogmicError
    from mammogmic.evaluation.localization import DiceResult, dice_scores
    from mammogmic.visualization.pictures import ResultPictures

    fig_dir = args.out / "figures"
    pictures = ResultPictures(fig_dir, dpi=args.dpi, report=args.report)
    dice: dict[str, Any] = {}

    def draw(res: Any, keys: tuple[str | None, str | None]) -> None:
        """Figure, report data and Dice as soon as an image is done; then drop its full-size arrays."""
        if pictures(res, *keys) and res.masks is not None:
            dice[res.item.image_id] = dice_scores(
                res.saliency, res.masks, threshold=args.dice_threshold, upsample=args.dice_upsample
            )
        res.image = None
        res.masks = None

    with contextlib.ExitStack() as stack:  # the folder stays locked until the report is written
        try:
            point = _report_settings(args)
            items = _collect_items(args)
            folder = stack.enter_context(_check_out_folder(args, "visualize", items))
            # Every run redoes every image: figures and files of an earlier run must not outlive it.
            folder.remove("figures", "localization.json", "report.html")
            folder.claim("figures")
            results, errors, info, writer = _run_inference(
                args, items, folder, {"overwrite": True}, True, True, handle_result=draw
            )
            writer.finish(info)
        except (MammogmicError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if dice:
            summary: dict[str, Any] = {
                **DiceResult.concatenate(list(dice.values())).summary(),
                "images": {name: d.to_dict() for name, d in dice.items()},
            }
            folder.claim("localization.json")
            atomic_write_text(args.out / "localization.json", json.dumps(summary, indent=1) + "\n")
        print(f"{pictures.n_written} figure(s) in {fig_dir}; {len(errors)} image(s) failed (see errors.csv)")
        if args.report:
            print(f"report: {_write_report(args, folder, writer, items, point)}")
    return 1 if errors else 0
