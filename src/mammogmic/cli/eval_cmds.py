"""``mammogmic evaluate``, ``mammogmic predict`` and ``mammogmic visualize``.

Heavy imports (numpy, pandas, torch, matplotlib) happen inside the ``run_*`` functions so that
``mammogmic --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

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
