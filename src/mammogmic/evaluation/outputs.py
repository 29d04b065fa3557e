"""Files written by ``mammogmic predict``: image/breast/exam CSVs, errors, saliency arrays, patches.

Layout of the output folder::

    image_predictions.csv     image_index, benign_pred, malignant_pred[, benign_label, malignant_label],
                              then image_id, exam_id, patient_id, breast_id, laterality, view, path
                              (and <benign|malignant>_pred__<model> per member of an ensemble),
                              then input_sha256, input_key, run_key (what the row was computed from)
    breast_predictions.csv    one row per breast: mean over its views (see aggregation)
    breast_predictions_metarepository.csv   index, left_malignant, right_malignant, left_benign, right_benign
    exam_summary.csv          one row per exam: maximum over its breasts
    errors.csv                image_id, path, stage, error (header only when every image worked); also
                              outputs of predicted images that failed (stage dicom-sr, dicom-seg, ...)
    saliency/<image_id>.npz   saliency (2, h, w) float16, patch_locations, patch_attention, crop_size
    patches.json              {image_id: {"view", "crop_size", "locations", "attention"}}
    run.json                  models, run_key + settings, complete, counts

The image CSV is rewritten (atomically) after every batch, so an interrupted run keeps what it
finished and a rerun skips those images when they were made from the same file contents
(:func:`input_provenance`) with the same models and settings (:func:`run_settings`); every row in the
folder comes from the run that ``run.json`` describes (:class:`PredictionWriter`). The folder itself is
claimed by :class:`mammogmic._outdir.OutputFolder` (one writer, our files only).

Text cells that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``, tab or
carriage return; numbers such as ``-0.5`` excepted) are written with a leading ``'`` in every CSV
(:func:`escape_csv_text`); :func:`unescape_csv_text` gives the original back, and a rerun reads its
own image CSV through it. Files are created with the usual permissions (``0666`` less the umask).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammogmic._json import finite_json
from mammogmic._outdir import OutputFolder, atomic_write_bytes, atomic_write_text
from mammogmic.data.cache import sha256_file
from mammogmic.data.io import check_regular_file
from mammogmic.data.sample import ImageItem
from mammogmic.errors import MammogmicError
from mammogmic.evaluation.aggregation import IMAGE_NAME, breast_level, exam_level, metarepository_breast_table
from mammogmic.evaluation.inference import ImageResult, Member, Prepared

logger = logging.getLogger(__name__)

__all__ = [
    "InputProvenance",
    "PredictionWriter",
    "atomic_write_text",
    "escape_csv_text",
    "file_stem",
    "hash_inputs",
    "image_row",
    "image_table",
    "input_provenance",
    "run_key",
    "run_settings",
    "settings_differences",
    "table_csv",
    "unescape_csv_text",
]

IMAGE_CSV = "image_predictions.csv"
ERRORS_CSV = "errors.csv"
RUN_JSON = "run.json"
PATCHES_JSON = "patches.json"
SALIENCY_DIR = "saliency"
# Tables computed from the image rows at the end of a run (removed at its start so that they never describe
# rows of another run after an interruption).
DERIVED_TABLES = (
    "breast_predictions.csv",
    "breast_predictions_metarepository.csv",
    "exam_summary.csv",
    ERRORS_CSV,
)
PROVENANCE_COLUMNS = ("input_sha256", "input_key", "run_key")
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


def table_csv(table: pd.DataFrame, **kwargs: Any) -> str:
    """A table as CSV text with its text cells escaped against formula injection (every CSV we write)."""
    return _escaped(table).to_csv(index=False, **kwargs)


def _digest(obj: Any) -> str:
    """Short SHA-256 of the canonical JSON of ``obj`` (sorted keys, no spaces)."""
    text = json.dumps(finite_json(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def run_settings(members: Sequence[Member], tta: int, seed: int, dtype: str) -> dict[str, Any]:
    """Everything of a predict run that changes its numbers (or the names of its columns).

    Each model's file hash, t and input contract (after ``--input-size`` and the like), the TTA count (and
    its seed when ``tta > 1``: one window is deterministic) and the compute precision. Member names name the
    per-model columns of an ensemble, so they count for ensembles. The device, BatchNorm fusion and
    compilation are left out: they change scores by float32 rounding only (tests hold them to 1e-5).
    """
    ensemble = len(members) > 1
    return {
        "format": 1,
        "models": [
            {
                **({"name": m.name} if ensemble else {}),
                "sha256": m.sha256,
                "percent_t": m.percent_t,
                "input_contract": m.contract.to_dict(),
            }
            for m in members
        ],
        "tta": int(tta),
        "seed": int(seed) if tta > 1 else None,
        "dtype": dtype,
        # bf16 runs since the backbones' weights are cast once (cast_for_bf16) score differently from the
        # earlier autocast ones by bf16 rounding: their key differs, so a rerun does not mix the two.
        **({"bf16": "cast"} if dtype == "bf16" else {}),
    }


def run_key(settings: dict[str, Any]) -> str:
    """The compact key of :func:`run_settings` (16 hex digits), stored in every row as ``run_key``."""
    return _digest(settings)


@dataclass(frozen=True)
class InputProvenance:
    """What an image's prediction was computed from.

    Attributes:
        sha256: SHA-256 of the image file (``None`` when it cannot be read: the image fails anyway, unless a
            preprocess cache stands in for it).
        key: digest of the image hash, the cache file's hash (rows with ``cached_path`` + ``best_center``),
            the heat-map file's hash (when the image has one) and the manifest fields that place the window
            (view, horizontal_flip, best_center).
    """

    sha256: str | None
    key: str


def _file_sha256(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        check_regular_file(path)  # never open a FIFO or a device, nor hash a huge file
        return sha256_file(Path(path))
    except (MammogmicError, OSError):
        return None


def input_provenance(item: ImageItem) -> InputProvenance:
    """The :class:`InputProvenance` of one image, from the file contents as they are now."""
    image = _file_sha256(item.path)
    cached = item.cached_path is not None and item.best_center is not None
    material = {
        "image_sha256": image,
        "cache_sha256": _file_sha256(item.cached_path) if cached else None,
        "view": item.view,
        "horizontal_flip": item.horizontal_flip,
        "best_center": list(item.best_center) if cached and item.best_center is not None else None,
    }
    if item.heatmap_path is not None:  # heat-map channels: the maps are an input too
        material["heatmaps_sha256"] = _file_sha256(item.heatmap_path)
    return InputProvenance(image, _digest(material))


def hash_inputs(items: Sequence[ImageItem], threads: int = 4) -> list[InputProvenance]:
    """:func:`input_provenance` of every item, in order (files hashed in ``threads`` threads)."""
    if threads <= 1 or len(items) <= 1:
        return [input_provenance(i) for i in items]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(input_provenance, items))


def settings_differences(old: Any, new: dict[str, Any], limit: int = 3) -> str:
    """What differs between the settings of an earlier run and these, for a message."""
    if not isinstance(old, dict):
        return "the earlier run's settings are not recorded"
    found: list[str] = []

    def short(value: Any) -> str:
        if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
            return value[:12] + "..."
        return json.dumps(value, separators=(",", ":"))

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}[{i}]")
        elif a != b:
            found.append(f"{path} {short(a)} -> {short(b)}")

    walk(finite_json(old), finite_json(new), "")
    if not found:
        return "same settings, another run key"
    more = f"; {len(found) - limit} more" if len(found) > limit else ""
    return "; ".join(found[:limit]) + more


class PredictionWriter:
    """Collects results and errors and writes the prediction files into ``out_dir``.

    Resume: rows carry ``input_sha256``, ``input_key`` and ``run_key`` (see :func:`input_provenance`,
    :func:`run_key`). Rows of an earlier run made with another ``run_key`` are dropped when the writer opens
    the folder; :meth:`plan` keeps a row only when its image has the same ``input_key`` now (and its saliency
    file / patches entry exists when asked for), so every row in the CSVs comes from the run ``run.json``
    describes.

    Args:
        out_dir: output folder (created).
        overwrite: start afresh instead of keeping the predictions of an earlier run.
        save_saliency: write ``saliency/<image_id>.npz`` per image.
        save_patches: write ``patches.json``.
        run_key: key of this run's settings; ``None`` keeps earlier rows whatever made them (library use).
        settings: the settings behind ``run_key`` (written to ``run.json``).
        folder: the claimed output folder; every file is recorded in its marker before it is written, and only
            files it owns are removed.
    """

    def __init__(
        self,
        out_dir: Path,
        overwrite: bool = False,
        save_saliency: bool = False,
        save_patches: bool = False,
        *,
        run_key: str | None = None,
        settings: dict[str, Any] | None = None,
        folder: OutputFolder | None = None,
    ):
        self.out_dir = out_dir
        self.save_saliency = save_saliency
        self.save_patches = save_patches
        self.run_key = run_key
        self.settings = settings
        self.folder = folder
        out_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self.errors: list[dict[str, str]] = []
        self.output_errors: list[dict[str, str]] = []  # predicted images whose extra outputs failed (DICOM)
        self.n_new = 0  # predictions added by this run
        self.n_kept = 0  # rows of inputs given now, kept from an earlier run (same run and input keys)
        self.n_input_changed = 0  # rows recomputed because their image or manifest fields changed
        self.n_stale = 0  # rows of an earlier run with another run key, dropped
        self.patches: dict[str, Any] = {}
        self._provenance: dict[str, InputProvenance] = {}
        self.previous_settings = self._previous_settings()
        previous = self._read_rows()
        if (out_dir / PATCHES_JSON).exists() and self._ours(PATCHES_JSON):
            self.patches = json.loads((out_dir / PATCHES_JSON).read_text(encoding="utf-8"))
        if overwrite:
            keep: list[dict[str, Any]] = []
        elif run_key is None:
            keep = previous
        else:
            keep = [r for r in previous if r.get("run_key") == run_key]
            self.n_stale = len(previous) - len(keep)
        kept_ids = {str(r["image_index"]) for r in keep}
        for row in previous:
            if str(row["image_index"]) not in kept_ids:
                self._forget(str(row["image_index"]))
        self.rows = keep
        if keep:
            logger.info("%s: %d earlier predictions made with these settings", out_dir / IMAGE_CSV, len(keep))

    def _ours(self, name: str) -> bool:
        return self.folder is None or self.folder.owns(name)

    def _read_rows(self) -> list[dict[str, Any]]:
        image_csv = self.out_dir / IMAGE_CSV
        if not image_csv.exists() or not self._ours(IMAGE_CSV):
            return []
        # Ids stay strings ("007" is not 7) so that old and new rows group together.
        previous = pd.read_csv(image_csv, dtype=str)
        numeric = [c for c in previous.columns if c.startswith(("benign_", "malignant_"))]
        text = [c for c in previous.columns if c not in numeric]
        previous[numeric] = previous[numeric].apply(pd.to_numeric, errors="coerce")
        previous[text] = previous[text].apply(lambda col: col.map(unescape_csv_text))
        return [
            {
                k: (None if isinstance(v, float) and math.isnan(v) and k not in numeric else v)
                for k, v in r.items()
            }
            for r in previous.to_dict("records")
        ]

    def _previous_settings(self) -> Any:
        path = self.out_dir / RUN_JSON
        if not path.exists() or not self._ours(RUN_JSON):
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("settings")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return None

    def _saliency_path(self, image_id: str) -> Path:
        return self.out_dir / SALIENCY_DIR / f"{file_stem(image_id)}.npz"

    def _forget(self, image_id: str) -> None:
        """Remove the side outputs of a row that is dropped or recomputed."""
        self.patches.pop(image_id, None)
        if self._ours(SALIENCY_DIR):
            self._saliency_path(image_id).unlink(missing_ok=True)

    def _write(self, name: str, text: str) -> Path:
        if self.folder is not None:
            self.folder.claim(name)
        atomic_write_text(self.out_dir / name, text)
        return self.out_dir / name

    def _remove(self, name: str) -> None:
        if self.folder is not None:
            self.folder.remove(name)
        elif (self.out_dir / name).is_file():
            (self.out_dir / name).unlink()

    def keys_of(self, image_id: str) -> tuple[str | None, str | None]:
        """``(input_key, run_key)`` that the row of ``image_id`` records (``None`` when not known)."""
        prov = self._provenance.get(image_id)
        return (prov.key if prov is not None else None), self.run_key

    @property
    def done_ids(self) -> set[str]:
        """Image ids that already have a prediction."""
        return {str(r["image_index"]) for r in self.rows}

    def plan(self, items: Sequence[ImageItem], provenance: Sequence[InputProvenance]) -> list[ImageItem]:
        """The items to predict now; the others keep their row (refreshed with the items' ids and labels).

        A row is kept when its image has the same ``input_key`` now and, when this run saves them, its
        saliency file and patches entry exist. Rows of items to predict are removed at once.
        """
        index = {str(r["image_index"]): i for i, r in enumerate(self.rows)}
        todo: list[ImageItem] = []
        drop: set[str] = set()
        for item, prov in zip(items, provenance, strict=True):
            self._provenance[item.image_id] = prov
            i = index.get(item.image_id)
            if i is not None:
                row = self.rows[i]
                if row.get("input_key") == prov.key and self._extras_present(item.image_id):
                    self.rows[i] = _refreshed(row, item)
                    self.n_kept += 1
                    continue
                if row.get("input_key") != prov.key:
                    self.n_input_changed += 1
                drop.add(item.image_id)
            todo.append(item)
        for image_id in drop:
            self._forget(image_id)
        self.rows = [r for r in self.rows if str(r["image_index"]) not in drop]
        return todo

    def _extras_present(self, image_id: str) -> bool:
        if self.save_saliency and not self._saliency_path(image_id).is_file():
            return False
        return not (self.save_patches and image_id not in self.patches)

    def begin(self, run_info: dict[str, Any]) -> None:
        """Start writing: remove the earlier derived tables, write the image CSV as it stands and a
        ``run.json`` saying the run is under way (an interrupted run never leaves files of two runs)."""
        for name in (RUN_JSON, *DERIVED_TABLES):
            self._remove(name)
        self.flush()
        info = {**run_info, **self._keys(), "complete": False, "n_predicted": len(self.rows)}
        self._write(RUN_JSON, json.dumps(info, indent=2, default=_json_default) + "\n")

    def _keys(self) -> dict[str, Any]:
        return {} if self.run_key is None else {"run_key": self.run_key, "settings": self.settings}

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

    def add_output_error(self, image_id: str, path: str, stage: str, error: str) -> None:
        """Record an output of a predicted image that could not be written or sent (``stage`` says which:
        ``dicom-sr``, ``dicom-seg``, ``dicomweb-store``...); it goes into errors.csv beside the failed images."""
        self.output_errors.append({"image_id": image_id, "path": path, "stage": stage, "error": error})
        logger.warning("%s (%s): %s", image_id, stage, error)

    def add_result(self, res: ImageResult) -> None:
        """Record one prediction (and write its saliency file when asked)."""
        item = res.item
        row = image_row(item, res.view, res.benign, res.malignant)
        for name, (benign, malignant) in res.member_probs.items():
            row[f"benign_pred__{name}"] = benign
            row[f"malignant_pred__{name}"] = malignant
        prov = self._provenance.get(item.image_id)
        if prov is not None:
            row["input_sha256"] = prov.sha256
            row["input_key"] = prov.key
        if self.run_key is not None:
            row["run_key"] = self.run_key
        self.rows = [r for r in self.rows if str(r["image_index"]) != item.image_id]
        self.rows.append(row)
        self.n_new += 1
        if (
            self.save_saliency
            and res.saliency is not None
            and res.patch_locations is not None
            and res.patch_attention is not None
        ):
            if self.folder is not None:
                self.folder.claim(SALIENCY_DIR)
            buffer = io.BytesIO()
            np.savez_compressed(
                buffer,
                saliency=res.saliency.astype(np.float16),
                patch_locations=res.patch_locations,
                patch_attention=res.patch_attention,
                crop_size=np.asarray(res.crop_size),
            )
            atomic_write_bytes(self._saliency_path(item.image_id), buffer.getvalue())
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
        self._write(IMAGE_CSV, table_csv(self.image_table(), float_format=FLOAT_FORMAT))

    def finish(self, run_info: dict[str, Any]) -> dict[str, Path]:
        """Write every output file; returns name → path of what was written."""
        self.flush()
        written = {"image": self.out_dir / IMAGE_CSV}
        errors = pd.DataFrame(
            self.errors + self.output_errors, columns=["image_id", "path", "stage", "error"]
        )
        written["errors"] = self._write(ERRORS_CSV, table_csv(errors))
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
                written[name] = self._write(name, table_csv(table, float_format=FLOAT_FORMAT))
        else:
            for name in DERIVED_TABLES[:3]:  # nothing to group: no table of an earlier run may stay
                self._remove(name)
        if self.save_patches or self.patches:
            written["patches"] = self._write(PATCHES_JSON, json.dumps(self.patches, indent=1) + "\n")
        else:
            self._remove(PATCHES_JSON)
        info = {
            **run_info,
            **self._counts(run_info),
            **self._keys(),
            "complete": True,
            "n_predicted": len(images),
        }
        written["run"] = self._write(RUN_JSON, json.dumps(info, indent=2, default=_json_default) + "\n")
        return written

    def _counts(self, run_info: dict[str, Any]) -> dict[str, Any]:
        """Counts of this run, which add up: ``n_inputs = n_already_predicted + n_run`` and
        ``n_run = n_predicted_now + n_errors`` (``n_predicted`` also counts rows of earlier runs)."""
        counts: dict[str, Any] = {
            "n_predicted_now": self.n_new,
            "n_errors": len(self.errors),
            "n_output_errors": len(self.output_errors),
            "n_input_changed": self.n_input_changed,
            "n_dropped_other_settings": self.n_stale,
        }
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


def _refreshed(row: dict[str, Any], item: ImageItem) -> dict[str, Any]:
    """A kept row with the ids, labels and path of the item as given now; scores and provenance unchanged."""
    lat, view = row.get("laterality"), row.get("view")
    new = image_row(item, f"{lat}-{view}" if lat and view else "", row["benign_pred"], row["malignant_pred"])
    for key, value in row.items():
        new.setdefault(key, value)
    return new


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
