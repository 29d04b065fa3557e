"""The manifest: one CSV table, one row per image, for every dataset.

Columns (``*`` = required; see ``docs/data.md`` for the full description)::

    image_id*, image_path*, patient_id*, exam_id*, laterality* (L|R), view* (CC|MLO),
    breast_id (default "{exam_id}_{laterality}"),
    benign_label, malignant_label                 image level: 0, 1 or empty (unknown)
    breast_benign_label, breast_malignant_label   breast level: 0, 1 or empty
    benign_mask_path, malignant_mask_path         raw-image-sized masks (nonzero = lesion)
    boxes                                         JSON list of {"label": ..., "box": [x0, y0, x1, y1]}
    split (train|val|test|empty), horizontal_flip (NO|YES), dataset
    cached_path, window_location, rightmost_points, bottommost_points,
    distance_from_starting_side, best_center, source_sha256      (written by ``mammogmic preprocess``)

Any other column is kept as is (``ManifestRow.extra``). Relative paths are relative to the manifest's
folder. :func:`load_manifest` checks every row and raises one :class:`~mammogmic.errors.ManifestError`
that lists every bad row by line number and reason.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mammogmic.errors import ManifestError

logger = logging.getLogger(__name__)

__all__ = [
    "REQUIRED_COLUMNS",
    "COLUMNS",
    "PREPROCESSING_COLUMNS",
    "ManifestRow",
    "Manifest",
    "load_manifest",
    "save_manifest",
    "validate_records",
]

REQUIRED_COLUMNS = ("image_id", "image_path", "patient_id", "exam_id", "laterality", "view")
LABEL_COLUMNS = ("benign_label", "malignant_label", "breast_benign_label", "breast_malignant_label")
PREPROCESSING_COLUMNS = (
    "cached_path",
    "window_location",
    "rightmost_points",
    "bottommost_points",
    "distance_from_starting_side",
    "best_center",
    "source_sha256",
)
COLUMNS = (
    *REQUIRED_COLUMNS,
    "breast_id",
    *LABEL_COLUMNS,
    "benign_mask_path",
    "malignant_mask_path",
    "boxes",
    "split",
    "horizontal_flip",
    "dataset",
    *PREPROCESSING_COLUMNS,
)
_JSON_COLUMNS = ("window_location", "rightmost_points", "bottommost_points", "best_center")
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ManifestRow:
    """One validated manifest row. Paths are kept as written; use :meth:`Manifest.resolve` to open them.

    Labels are ``0``, ``1`` or ``None`` (unknown). JSON columns are parsed (lists), ``None`` when empty.
    """

    image_id: str
    image_path: str
    patient_id: str
    exam_id: str
    laterality: str
    view: str
    breast_id: str
    benign_label: int | None = None
    malignant_label: int | None = None
    breast_benign_label: int | None = None
    breast_malignant_label: int | None = None
    benign_mask_path: str | None = None
    malignant_mask_path: str | None = None
    boxes: list[dict[str, Any]] | None = None
    split: str | None = None
    horizontal_flip: str = "NO"
    dataset: str | None = None
    cached_path: str | None = None
    window_location: list[int] | None = None
    rightmost_points: list[Any] | None = None
    bottommost_points: list[Any] | None = None
    distance_from_starting_side: int | None = None
    best_center: list[int] | None = None
    source_sha256: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def full_view(self) -> str:
        """``"L-CC"``-style view name."""
        return f"{self.laterality}-{self.view}"

    @property
    def preprocessed(self) -> bool:
        """Whether the preprocessing columns are filled (a cache entry exists)."""
        return self.cached_path is not None and self.best_center is not None

    def labels(self, level: str = "image") -> tuple[int | None, int | None]:
        """``(benign, malignant)`` at ``"image"`` or ``"breast"`` level."""
        if level == "image":
            return self.benign_label, self.malignant_label
        if level == "breast":
            return self.breast_benign_label, self.breast_malignant_label
        raise ValueError(f"label level must be 'image' or 'breast', got {level!r}")

    def to_record(self) -> dict[str, str]:
        """The row as CSV strings (empty string for unknown)."""
        out: dict[str, str] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = ""
            elif f.name in _JSON_COLUMNS or f.name == "boxes":
                out[f.name] = json.dumps(value)
            else:
                out[f.name] = str(value)
        out.update(self.extra)
        return out


class Manifest:
    """A validated manifest: rows plus the folder that relative paths refer to.

    Args:
        rows: The rows.
        root: Folder for relative paths (the manifest file's folder). Made absolute against the working folder
            at construction, so :meth:`resolve` gives the same file after a ``chdir``.
        path: The CSV it was read from, if any.
    """

    def __init__(self, rows: Sequence[ManifestRow], root: str | os.PathLike[str], path: Path | None = None):
        self.rows = list(rows)
        self.root = Path(os.path.abspath(Path(root).expanduser()))
        self.path = path

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[ManifestRow]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> ManifestRow:
        return self.rows[index]

    def resolve(self, path: str | None) -> Path | None:
        """Absolute path for a manifest path string (relative ones are relative to :attr:`root`)."""
        if path is None or path == "":
            return None
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else self.root / candidate

    def filter(self, split: str | None = None, preprocessed: bool | None = None) -> Manifest:
        """Rows of one split and/or only (un)preprocessed rows, as a new :class:`Manifest`."""
        rows = [
            r
            for r in self.rows
            if (split is None or r.split == split)
            and (preprocessed is None or r.preprocessed == preprocessed)
        ]
        return Manifest(rows, self.root, self.path)

    def to_dataframe(self) -> Any:
        """The manifest as a pandas ``DataFrame`` of strings."""
        import pandas as pd

        return pd.DataFrame([r.to_record() for r in self.rows])


def _parse_label(value: str, column: str) -> tuple[int | None, str | None]:
    text = value.strip()
    if text == "" or text.lower() in ("nan", "none", "unknown"):
        return None, None
    try:
        number = float(text)
    except ValueError:
        return None, f"{column} must be 0, 1 or empty, got {value!r}"
    if math.isnan(number):
        return None, None
    if number not in (0.0, 1.0):
        return None, f"{column} must be 0, 1 or empty, got {value!r}"
    return int(number), None


def _parse_boxes(value: str) -> tuple[list[dict[str, Any]] | None, str | None]:
    if not value.strip():
        return None, None
    try:
        boxes = json.loads(value)
    except json.JSONDecodeError as exc:
        return None, f"boxes is not valid JSON ({exc.msg})"
    if not isinstance(boxes, list):
        return None, "boxes must be a JSON list"
    for index, item in enumerate(boxes):
        if not isinstance(item, dict) or "box" not in item:
            return None, f"boxes[{index}] must be an object with 'label' and 'box'"
        box = item["box"]
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
        ):
            return None, f"boxes[{index}].box must be 4 finite numbers [x_min, y_min, x_max, y_max]"
        if box[2] < box[0] or box[3] < box[1]:
            return None, f"boxes[{index}].box has x_max < x_min or y_max < y_min: {box}"
    return boxes, None


def _row_from_record(
    record: Mapping[str, str], extra_columns: Iterable[str]
) -> tuple[ManifestRow | None, list[str]]:
    errors: list[str] = []
    values: dict[str, Any] = {}
    for column in REQUIRED_COLUMNS:
        text = (record.get(column) or "").strip()
        if not text:
            errors.append(f"{column} is empty")
        values[column] = text
    lat = values["laterality"].upper()
    lat = {"LEFT": "L", "RIGHT": "R"}.get(lat, lat)
    if values["laterality"] and lat not in ("L", "R"):
        errors.append(f"laterality must be L or R, got {values['laterality']!r}")
    values["laterality"] = lat
    view = values["view"].upper()
    if values["view"] and view not in ("CC", "MLO"):
        errors.append(f"view must be CC or MLO, got {values['view']!r}")
    values["view"] = view
    for column in LABEL_COLUMNS:
        label, error = _parse_label(record.get(column) or "", column)
        values[column] = label
        if error:
            errors.append(error)
    for level in ("benign", "malignant"):
        image_label, breast_label = values[f"{level}_label"], values[f"breast_{level}_label"]
        if image_label == 1 and breast_label == 0:
            errors.append(f"{level}_label is 1 but breast_{level}_label is 0")
    flip = (record.get("horizontal_flip") or "").strip().upper() or "NO"
    if flip not in ("NO", "YES"):
        errors.append(f"horizontal_flip must be NO or YES, got {record.get('horizontal_flip')!r}")
    values["horizontal_flip"] = flip
    split = (record.get("split") or "").strip().lower() or None
    if split is not None and split not in _SPLITS:
        errors.append(f"split must be train, val, test or empty, got {record.get('split')!r}")
    values["split"] = split
    boxes, error = _parse_boxes(record.get("boxes") or "")
    if error:
        errors.append(error)
    values["boxes"] = boxes
    for column in _JSON_COLUMNS:
        text = (record.get(column) or "").strip()
        values[column] = None
        if text:
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                errors.append(f"{column} is not valid JSON: {text!r}")
                continue
            if not isinstance(parsed, list):
                errors.append(f"{column} must be a JSON list, got {text!r}")
                continue
            values[column] = parsed
    distance = (record.get("distance_from_starting_side") or "").strip()
    values["distance_from_starting_side"] = None
    if distance:
        try:
            values["distance_from_starting_side"] = int(float(distance))
        except ValueError:
            errors.append(f"distance_from_starting_side must be an integer, got {distance!r}")
    for column in ("benign_mask_path", "malignant_mask_path", "dataset", "cached_path", "source_sha256"):
        values[column] = (record.get(column) or "").strip() or None
    breast_id = (record.get("breast_id") or "").strip()
    values["breast_id"] = breast_id or f"{values['exam_id']}_{lat}"
    values["extra"] = {c: (record.get(c) or "") for c in extra_columns}
    if errors:
        return None, errors
    return ManifestRow(**values), []


def validate_records(
    records: Sequence[Mapping[str, str]],
    root: str | os.PathLike[str],
    *,
    line_numbers: Sequence[int] | None = None,
    columns: Sequence[str] | None = None,
    source: str = "manifest",
    check_files: bool = False,
) -> Manifest:
    """Validate string records (e.g. from a CSV or an adapter) into a :class:`Manifest`.

    Args:
        records: Mappings column -> string.
        root: Folder for relative paths.
        line_numbers: Line number of each record in its file (default: header on line 1, then 2, 3...).
        columns: Column names (default: union of the records' keys).
        source: Name used in the error message.
        check_files: Also check that every ``image_path`` exists.

    Raises:
        ManifestError: missing required columns, or one message listing every bad row.
    """
    if columns is None:
        seen: dict[str, None] = {}
        for record in records:
            seen.update(dict.fromkeys(record))
        columns = list(seen)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(
            f"{source}: missing required column(s): {', '.join(missing)} (found: {', '.join(columns) or 'none'})"
        )
    extra_columns = [c for c in columns if c not in COLUMNS]
    lines = list(line_numbers) if line_numbers is not None else [i + 2 for i in range(len(records))]
    problems: list[str] = []
    rows: list[ManifestRow] = []
    first_line: dict[str, int] = {}
    manifest = Manifest([], root)
    for line, record in zip(lines, records, strict=True):
        row, errors = _row_from_record(record, extra_columns)
        image_id = (record.get("image_id") or "").strip()
        if image_id:
            if image_id in first_line:
                errors.append(f"duplicate image_id {image_id!r} (first on line {first_line[image_id]})")
            else:
                first_line[image_id] = line
        if row is not None and check_files and not errors:
            resolved = manifest.resolve(row.image_path)
            if resolved is None or not resolved.is_file():
                errors.append(f"image file not found: {resolved}")
        if errors:
            problems.extend(f"line {line}: {error}" for error in errors)
        elif row is not None:
            rows.append(row)
    if problems:
        shown = problems[:200]
        more = f"\n  ... and {len(problems) - 200} more" if len(problems) > 200 else ""
        raise ManifestError(
            f"{source}: {len(problems)} problem(s) in {len({p.split(':')[0] for p in problems})} row(s):\n  "
            + "\n  ".join(shown)
            + more
        )
    manifest.rows = rows
    return manifest


def load_manifest(path: str | os.PathLike[str], *, check_files: bool = False) -> Manifest:
    """Read and validate a manifest CSV.

    Raises:
        ManifestError: unreadable file, missing columns, or bad rows (all listed with line numbers).
    """
    file_path = Path(path)
    if not file_path.is_file():
        raise ManifestError(
            f"{file_path}: manifest not found" + (" (it is a directory)" if file_path.is_dir() else "")
        )
    try:
        with open(file_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            records: list[dict[str, str]] = []
            lines: list[int] = []
            start = 2
            for record in reader:
                if None in record:
                    raise ManifestError(f"{file_path}: line {start}: more values than columns")
                records.append({k: v if v is not None else "" for k, v in record.items()})
                lines.append(start)
                start = reader.line_num + 1
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{file_path}: not a UTF-8 CSV file ({exc.reason})") from exc
    except PermissionError as exc:
        raise ManifestError(f"{file_path}: permission denied (cannot read the manifest)") from exc
    except OSError as exc:
        raise ManifestError(f"{file_path}: cannot read the manifest ({exc.strerror or exc})") from exc
    except csv.Error as exc:
        raise ManifestError(f"{file_path}: malformed CSV ({exc})") from exc
    if not columns:
        raise ManifestError(f"{file_path}: empty manifest (no header line)")
    manifest = validate_records(
        records,
        file_path.parent,
        line_numbers=lines,
        columns=columns,
        source=str(file_path),
        check_files=check_files,
    )
    manifest.path = file_path
    return manifest


def save_manifest(manifest: Manifest | Sequence[ManifestRow], path: str | os.PathLike[str]) -> Path:
    """Write a manifest CSV (standard columns first, then extras). Relative paths are rebased if needed.

    The file is written to a temporary name and renamed, so a crash never leaves half a manifest.
    """
    out = Path(path)
    rows = list(manifest.rows if isinstance(manifest, Manifest) else manifest)
    root = manifest.root if isinstance(manifest, Manifest) else out.parent
    if root.resolve() != out.parent.resolve():
        rows = [_rebase(r, root) for r in rows]
    extras: dict[str, None] = {}
    for row in rows:
        extras.update(dict.fromkeys(row.extra))
    columns = [*COLUMNS, *[c for c in extras if c not in COLUMNS]]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row.to_record())
    os.replace(tmp, out)
    return out


def _rebase(row: ManifestRow, root: Path) -> ManifestRow:
    changes: dict[str, Any] = {}
    for column in ("image_path", "benign_mask_path", "malignant_mask_path", "cached_path"):
        value = getattr(row, column)
        if value and not Path(value).is_absolute():
            changes[column] = str((root / value).resolve())
    return replace(row, **changes) if changes else row
