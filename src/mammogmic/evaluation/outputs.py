"""Files written by ``mammogmic predict``: image/breast/exam CSVs, errors, saliency arrays, patches.

Layout of the output folder::

    image_predictions.csv     image_index, benign_pred, malignant_pred[, benign_label, malignant_label],
                              then image_id, exam_id, patient_id, breast_id, laterality, view, path
                              (and <benign|malignant>_pred__<model> per member of an ensemble)
    breast_predictions.csv    one row per breast: mean over its views (see aggregation)
    breast_predictions_metarepository.csv   index, left_malignant, right_malignant, left_benign, right_benign
    exam_summary.csv          one row per exam: maximum over its breasts
    errors.csv                image_id, path, stage, error (header only when every image worked)
    saliency/<image_id>.npz   saliency (2, h, w) float16, patch_locations, patch_attention, crop_size
    patches.json              {image_id: {"view", "crop_size", "locations", "attention"}}
    run.json                  models, settings, counts

The image CSV is rewritten (atomically) after every batch, so an interrupted run keeps what it
finished and a rerun skips those images.

Text cells that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``, tab or
carriage return; numbers such as ``-0.5`` excepted) are written with a leading ``'`` in every CSV
(:func:`escape_csv_text`); :func:`unescape_csv_text` gives the original back, and a rerun reads its
own image CSV through it. Files are created with the usual permissions (``0666`` less the umask).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammogmic.data.sample import ImageItem
from mammogmic.evaluation.aggregation import IMAGE_NAME, breast_level, exam_level, metarepository_breast_table
from mammogmic.evaluation.inference import ImageResult, Prepared

logger = logging.getLogger(__name__)

__all__ = [
    "PredictionWriter",
    "atomic_write_text",
    "escape_csv_text",
    "file_stem",
    "image_row",
    "image_table",
    "unescape_csv_text",
]

IMAGE_CSV = "image_predictions.csv"
ERRORS_CSV = "errors.csv"
FLOAT_FORMAT = "%.6f"


def file_stem(image_id: str) -> str:
    """A safe file name for an image id: the id itself when it is plain, else a cleaned id + short hash.

    Manifest ids may hold ``/``, ``..`` or spaces; files named after them must stay inside the output.
    """
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}", image_id) and ".." not in image_id:
        return image_id
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._")[:80] or "image"
    return f"{cleaned}_{hashlib.sha1(image_id.encode('utf-8')).hexdigest()[:8]}"


# Cells a spreadsheet would evaluate (OWASP "CSV injection"); a leading quote makes them plain text.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _needs_quote(core: str) -> bool:
    return core.startswith(_FORMULA_START) and _NUMBER.fullmatch(core) is None


def escape_csv_text(value: Any) -> Any:
    """``'`` + ``value`` when a spreadsheet would read the text as a formula; anything else unchanged.

    Text already starting with quotes before such a character gets one more, so that
    :func:`unescape_csv_text` is its exact inverse.
    """
    if isinstance(value, str) and _needs_quote(value.lstrip("'")):
        return "'" + value
    return value


def unescape_csv_text(value: Any) -> Any:
    """Undo :func:`escape_csv_text`."""
    if isinstance(value, str) and value.startswith("'") and _needs_quote(value.lstrip("'")):
        return value[1:]
    return value


def _escaped(table: pd.DataFrame) -> pd.DataFrame:
    out = table.copy()
    for col in out.columns:
        if not pd.api.types.is_numeric_dtype(
            out[col]
        ):  # object or string columns (numbers are never escaped)
            out[col] = out[col].map(escape_csv_text)
    return out


def _csv(table: pd.DataFrame, **kwargs: Any) -> str:
    """A table as CSV text with its text cells escaped against formula injection."""
    return _escaped(table).to_csv(index=False, **kwargs)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder (no half-written files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class PredictionWriter:
    """Collects results and errors and writes the prediction files into ``out_dir``.

    Args:
        out_dir: output folder (created).
        overwrite: start afresh instead of keeping the predictions of an earlier run.
        save_saliency: write ``saliency/<image_id>.npz`` per image.
        save_patches: write ``patches.json``.
    """

    def __init__(
        self, out_dir: Path, overwrite: bool = False, save_saliency: bool = False, save_patches: bool = False
    ):
        self.out_dir = out_dir
        self.save_saliency = save_saliency
        self.save_patches = save_patches
        out_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self.errors: list[dict[str, str]] = []
        self.n_new = 0  # predictions added by this run
        self.patches: dict[str, Any] = {}
        image_csv = out_dir / IMAGE_CSV
        if image_csv.exists() and not overwrite:
            # Ids stay strings ("007" is not 7) so that old and new rows group together.
            previous = pd.read_csv(image_csv, dtype=str)
            numeric = [c for c in previous.columns if c.startswith(("benign_", "malignant_"))]
            text = [c for c in previous.columns if c not in numeric]
            previous[numeric] = previous[numeric].apply(pd.to_numeric, errors="coerce")
            previous[text] = previous[text].apply(lambda col: col.map(unescape_csv_text))
            self.rows = [
                {
                    k: (None if isinstance(v, float) and math.isnan(v) and k not in numeric else v)
                    for k, v in r.items()
                }
                for r in previous.to_dict("records")
            ]
            logger.info("%s: keeping %d earlier predictions", image_csv, len(self.rows))
        patches_json = out_dir / "patches.json"
        if save_patches and patches_json.exists() and not overwrite:
            self.patches = json.loads(patches_json.read_text(encoding="utf-8"))

    @property
    def done_ids(self) -> set[str]:
        """Image ids that already have a prediction."""
        return {str(r["image_index"]) for r in self.rows}

    def add_error(self, prepared: Prepared) -> None:
        """Record a failed image."""
        self.errors.append(
            {
                "image_id": prepared.item.image_id,
                "path": str(prepared.item.path),
                "stage": prepared.stage or "",
                "error": prepared.error or "",
            }
        )
        logger.warning("skipped image %s: %s", prepared.item.image_id, prepared.error)

    def add_result(self, res: ImageResult) -> None:
        """Record one prediction (and write its saliency file when asked)."""
        item = res.item
        row = image_row(item, res.view, res.benign, res.malignant)
        for name, (benign, malignant) in res.member_probs.items():
            row[f"benign_pred__{name}"] = benign
            row[f"malignant_pred__{name}"] = malignant
        self.rows = [r for r in self.rows if str(r["image_index"]) != item.image_id]
        self.rows.append(row)
        self.n_new += 1
        if (
            self.save_saliency
            and res.saliency is not None
            and res.patch_locations is not None
            and res.patch_attention is not None
        ):
            target = self.out_dir / "saliency" / f"{file_stem(item.image_id)}.npz"
            target.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(
                target,
                saliency=res.saliency.astype(np.float16),
                patch_locations=res.patch_locations,
                patch_attention=res.patch_attention,
                crop_size=np.asarray(res.crop_size),
            )
        if self.save_patches and res.patch_locations is not None and res.patch_attention is not None:
            self.patches[item.image_id] = {
                "view": res.view,
                "crop_size": list(res.crop_size or ()),
                "locations": res.patch_locations.astype(int).tolist(),
                "attention": [round(float(a), 6) for a in res.patch_attention],
            }

    def image_table(self) -> pd.DataFrame:
        """All predictions so far, label columns dropped when no label is known."""
        return image_table(self.rows)

    def flush(self) -> None:
        """Rewrite the image CSV (called after each batch)."""
        atomic_write_text(self.out_dir / IMAGE_CSV, _csv(self.image_table(), float_format=FLOAT_FORMAT))

    def finish(self, run_info: dict[str, Any]) -> dict[str, Path]:
        """Write every output file; returns name → path of what was written."""
        self.flush()
        written = {"image": self.out_dir / IMAGE_CSV}
        errors = pd.DataFrame(self.errors, columns=["image_id", "path", "stage", "error"])
        atomic_write_text(self.out_dir / ERRORS_CSV, _csv(errors))
        written["errors"] = self.out_dir / ERRORS_CSV
        images = self.image_table()
        with_side = (
            images.dropna(subset=["laterality"]) if "laterality" in images.columns else images.iloc[0:0]
        )
        if len(with_side):
            scores = [c for c in images.columns if c.startswith(("benign_pred", "malignant_pred"))]
            labels = [c for c in ("benign_label", "malignant_label") if c in images.columns]
            breasts = breast_level(with_side, score_columns=scores, label_columns=labels)
            for name, table in (
                ("breast_predictions.csv", breasts),
                ("breast_predictions_metarepository.csv", metarepository_breast_table(breasts)),
                ("exam_summary.csv", exam_level(breasts, score_columns=scores, label_columns=labels)),
            ):
                atomic_write_text(self.out_dir / name, _csv(table, float_format=FLOAT_FORMAT))
                written[name] = self.out_dir / name
        if self.save_patches:
            atomic_write_text(self.out_dir / "patches.json", json.dumps(self.patches, indent=1) + "\n")
            written["patches"] = self.out_dir / "patches.json"
        info = {**run_info, **self._counts(run_info), "n_predicted": len(images)}
        atomic_write_text(self.out_dir / "run.json", json.dumps(info, indent=2, default=_json_default) + "\n")
        written["run"] = self.out_dir / "run.json"
        return written

    def _counts(self, run_info: dict[str, Any]) -> dict[str, Any]:
        """Counts of this run, which add up: ``n_inputs = n_already_predicted + n_run`` and
        ``n_run = n_predicted_now + n_errors`` (``n_predicted`` also counts rows of earlier runs)."""
        counts: dict[str, Any] = {"n_predicted_now": self.n_new, "n_errors": len(self.errors)}
        if "n_inputs" in run_info and "n_run" in run_info:
            counts["n_already_predicted"] = int(run_info["n_inputs"]) - int(run_info["n_run"])
            if int(run_info["n_run"]) != self.n_new + len(self.errors):
                logger.warning(
                    "%d image(s) were run but %d predicted and %d failed: some images are unaccounted for",
                    run_info["n_run"],
                    self.n_new,
                    len(self.errors),
                )
        return counts


def image_row(item: ImageItem, view: str, benign: float, malignant: float) -> dict[str, Any]:
    """One row of ``image_predictions.csv``: the one place image results become table rows (``predict``,
    ``visualize`` and the trainer's validation all go through it, then through the same aggregation)."""
    lat, _, view_name = view.partition("-")
    row: dict[str, Any] = {
        "image_index": item.image_id,
        "benign_pred": benign,
        "malignant_pred": malignant,
        "benign_label": item.benign_label,
        "malignant_label": item.malignant_label,
        "breast_benign_label": item.breast_benign_label,
        "breast_malignant_label": item.breast_malignant_label,
        "image_id": item.image_id,
        "exam_id": item.exam_id if item.exam_id is not None else _exam_from_name(item.image_id),
        "patient_id": item.patient_id,
        "breast_id": item.breast_id,
        "laterality": lat or None,
        "view": view_name or None,
        "path": str(item.path),
    }
    if row["breast_id"] is None and lat:
        row["breast_id"] = f"{row['exam_id']}_{lat}"
    return row


def image_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Rows of :func:`image_row` as the image table; label columns dropped when no label is known."""
    df = pd.DataFrame(list(rows))
    if df.empty:
        return pd.DataFrame(columns=["image_index", "benign_pred", "malignant_pred"])
    for col in ("benign_label", "malignant_label", "breast_benign_label", "breast_malignant_label"):
        if col in df.columns and pd.to_numeric(df[col], errors="coerce").isna().all():
            df = df.drop(columns=col)
    return df


def _exam_from_name(image_id: str) -> str:
    """Exam of names like ``0_L-CC`` (official sample data); otherwise the image is its own exam."""
    match = IMAGE_NAME.match(image_id)
    return match.group("exam") if match else image_id


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, Sequence):
        return list(value)
    return str(value)
