"""Adapters: public datasets as distributed -> manifest records (one row per image).

Each ``prepare_<name>(source, out_dir)`` returns a :class:`PrepareResult` with string records in the
manifest columns (absolute paths) and the rows it skipped with a reason. Nothing is ever written into
``source``; adapters that must merge masks write them under ``out_dir``. Labelling rules are in the
docstrings and in ``docs/data.md``.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import logging
import pickle
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mammogmic._extras import require
from mammogmic.data.io import laterality_view_from_name, normalize_laterality, normalize_view
from mammogmic.errors import ManifestError

logger = logging.getLogger(__name__)

__all__ = ["PrepareResult", "ADAPTERS", "prepare", "load_exam_list", "RestrictedUnpickler"]


@dataclass
class PrepareResult:
    """Output of an adapter.

    Attributes:
        records: Manifest rows as column -> string.
        skipped: ``(what, reason)`` for every input row or file that was left out.
    """

    records: list[dict[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _label(value: int | None) -> str:
    return "" if value is None else str(int(value))


def _read_csv(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            return [{(k or "").strip(): (v or "") for k, v in row.items()} for row in reader]
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _require_columns(rows: list[dict[str, str]], columns: Iterable[str], path: Path) -> None:
    if not rows:
        return
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(rows[0])}")


def _find_file(source: Path, name: str, pattern: str = "*") -> Path:
    direct = source / name
    if direct.is_file():
        return direct
    found = sorted(source.rglob(name if pattern == "*" else pattern))
    if not found:
        raise ManifestError(f"{source}: cannot find {name}")
    return found[0]


# --------------------------------------------------------------------------------------------------
# CBIS-DDSM

_CBIS_CSVS = (
    ("mass_case_description_train_set.csv", "train"),
    ("calc_case_description_train_set.csv", "train"),
    ("mass_case_description_test_set.csv", "test"),
    ("calc_case_description_test_set.csv", "test"),
)


def _cbis_resolve(source: Path, csv_path: str, index: dict[str, list[Path]]) -> list[Path]:
    """DICOM files for a CSV path: exact path first, else every DICOM below its top folder."""
    text = csv_path.strip().replace("\\", "/")
    if not text:
        return []
    for base in (source, source / "CBIS-DDSM"):
        candidate = base / text
        if candidate.is_file():
            return [candidate]
    return index.get(text.split("/")[0], [])


def _dicom_size(path: Path) -> tuple[int, int] | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return int(ds.Rows), int(ds.Columns)
    except Exception:
        return None


def prepare_cbis_ddsm(source: Path, out_dir: Path, *, masks: bool = True) -> PrepareResult:
    """CBIS-DDSM (TCIA download + the four case-description CSVs).

    Labelling rule: one row per full mammogram folder (``Mass-Training_P_00001_LEFT_CC``);
    ``malignant_label = 1`` if any of its abnormalities has pathology ``MALIGNANT`` (else 0);
    ``benign_label = 1`` if any is ``BENIGN`` or ``BENIGN_WITHOUT_CALLBACK`` (else 0). Breast-level
    labels are the maximum over the images of that breast. Split: the CSV pair (train/test).
    Masks: the ROI DICOM with the full image's size is the mask (CSV crop/mask columns are sometimes
    swapped); several masks of one class are merged into a PNG under ``out_dir/masks``; boxes are the
    masks' bounding boxes. Quirks handled: ``breast_density`` vs ``breast density``, trailing newlines
    in paths, swapped crop/mask paths.
    """
    result = PrepareResult()
    index: dict[str, list[Path]] = defaultdict(list)
    for dcm in sorted(source.rglob("*.dcm")):
        for part in dcm.relative_to(source).parts[:-1]:
            if part.startswith(("Mass-", "Calc-")):
                index[part].append(dcm)
                break
    images: dict[str, dict[str, Any]] = {}
    found_any = False
    for name, split in _CBIS_CSVS:
        csv_path = source / name
        if not csv_path.is_file():
            matches = sorted(source.rglob(name))
            if not matches:
                continue
            csv_path = matches[0]
        found_any = True
        rows = _read_csv(csv_path)
        _require_columns(
            rows,
            ("patient_id", "left or right breast", "image view", "pathology", "image file path"),
            csv_path,
        )
        for line, row in enumerate(rows, start=2):
            folder = row["image file path"].strip().replace("\\", "/").split("/")[0]
            files = _cbis_resolve(source, row["image file path"], index)
            if not files:
                result.skipped.append(
                    (f"{csv_path.name}:{line}", f"image not found: {row['image file path'].strip()}")
                )
                continue
            side = normalize_laterality(row["left or right breast"])
            view = normalize_view(row["image view"])
            if side is None or view is None:
                result.skipped.append((f"{csv_path.name}:{line}", "unknown laterality or view"))
                continue
            pathology = row["pathology"].strip().upper()
            entry = images.setdefault(
                folder,
                {
                    "path": files[0],
                    "patient": row["patient_id"].strip(),
                    "side": side,
                    "view": view,
                    "split": split,
                    "benign": 0,
                    "malignant": 0,
                    "density": (row.get("breast_density") or row.get("breast density") or "").strip(),
                    "rois": [],
                    "types": set(),
                },
            )
            if pathology == "MALIGNANT":
                entry["malignant"] = 1
            elif pathology in ("BENIGN", "BENIGN_WITHOUT_CALLBACK"):
                entry["benign"] = 1
            else:
                result.skipped.append(
                    (f"{csv_path.name}:{line}", f"unknown pathology {pathology!r} (ignored)")
                )
            entry["types"].add(row.get("abnormality type", "").strip())
            roi_files: list[Path] = []
            for column in ("ROI mask file path", "cropped image file path"):
                for candidate in _cbis_resolve(source, row.get(column, ""), index):
                    if candidate not in roi_files:
                        roi_files.append(candidate)
            entry["rois"].append(("malignant" if pathology == "MALIGNANT" else "benign", roi_files))
    if not found_any:
        raise ManifestError(f"{source}: no CBIS-DDSM case-description CSV found (e.g. {_CBIS_CSVS[0][0]})")
    breast_labels: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for entry in images.values():
        key = f"{entry['patient']}_{entry['side']}"
        breast_labels[key][0] |= entry["benign"]
        breast_labels[key][1] |= entry["malignant"]
    for folder, entry in sorted(images.items()):
        record = {
            "image_id": folder,
            "image_path": str(entry["path"].resolve()),
            "patient_id": entry["patient"],
            "exam_id": entry["patient"],
            "laterality": entry["side"],
            "view": entry["view"],
            "breast_id": f"{entry['patient']}_{entry['side']}",
            "benign_label": str(entry["benign"]),
            "malignant_label": str(entry["malignant"]),
            "breast_benign_label": str(breast_labels[f"{entry['patient']}_{entry['side']}"][0]),
            "breast_malignant_label": str(breast_labels[f"{entry['patient']}_{entry['side']}"][1]),
            "split": entry["split"],
            "dataset": "cbis-ddsm",
            "density": entry["density"],
            "abnormality_types": ";".join(sorted(t for t in entry["types"] if t)),
        }
        if masks:
            _cbis_masks(folder, entry, out_dir, record, result)
        result.records.append(record)
    return result


def _cbis_masks(
    folder: str, entry: dict[str, Any], out_dir: Path, record: dict[str, str], result: PrepareResult
) -> None:
    from mammogmic.data.io import read_mask

    full_size = _dicom_size(entry["path"])
    per_class: dict[str, list[Path]] = defaultdict(list)
    for label, files in entry["rois"]:
        chosen = [f for f in files if _dicom_size(f) == full_size]
        if not chosen:
            result.skipped.append(
                (folder, f"no ROI file with the image size {full_size} for a {label} finding")
            )
            continue
        per_class[label].append(chosen[0])
    boxes: list[dict[str, Any]] = []
    for label, paths in per_class.items():
        merged: np.ndarray | None = None
        for path in paths:
            mask = read_mask(path)
            ys, xs = np.nonzero(mask)
            if ys.size:
                boxes.append(
                    {
                        "label": label,
                        "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                    }
                )
            merged = mask if merged is None else (merged | mask)
        if len(set(paths)) == 1:
            record[f"{label}_mask_path"] = str(paths[0].resolve())
        elif merged is not None:
            from PIL import Image

            target = out_dir / "masks" / f"{folder}_{label}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(merged.astype(np.uint8) * 255).save(target)
            record[f"{label}_mask_path"] = str(target.resolve())
    record["boxes"] = json.dumps(boxes) if boxes else ""


# --------------------------------------------------------------------------------------------------
# VinDr-Mammo


def _birads_number(text: str) -> int | None:
    match = re.search(r"(\d)", text or "")
    return int(match.group(1)) if match else None


def _birads_labels(birads: int | None, birads3: str = "unknown") -> tuple[int | None, int | None]:
    """BI-RADS -> (benign, malignant) proxy: 1 -> (0, 0); 2 -> (1, 0); 3 -> (1, ?); 4-6 -> (?, 1)."""
    if birads is None or birads == 0:
        return None, None
    if birads == 1:
        return 0, 0
    if birads == 2:
        return 1, 0
    if birads == 3:
        return 1, (0 if birads3 == "benign" else None)
    return None, 1


def prepare_vindr(source: Path, out_dir: Path, *, birads3: str = "unknown") -> PrepareResult:
    """VinDr-Mammo (PhysioNet 1.0.0: ``images/<study>/<image>.dicom`` + annotation CSVs).

    Labelling rule (BI-RADS proxy; VinDr has no pathology): from ``breast_birads`` of each image row,
    BI-RADS 1 -> benign 0, malignant 0; 2 -> benign 1, malignant 0; 3 -> benign 1, malignant unknown
    (``birads3="benign"`` makes it 0); 4/5 -> benign unknown, malignant 1. The same values are used at
    breast level. Boxes come from ``finding_annotations.csv`` (coordinates clipped at 0) with label
    ``malignant`` for finding BI-RADS 4/5, ``benign`` for 2/3, else the finding category.
    Split: ``training`` -> train, ``test`` -> test. Patient id = study id (VinDr has no patient ids).
    """
    result = PrepareResult()
    breast_csv = _find_file(source, "breast-level_annotations.csv")
    rows = _read_csv(breast_csv)
    _require_columns(
        rows, ("study_id", "image_id", "laterality", "view_position", "breast_birads"), breast_csv
    )
    boxes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    finding_csv = source / "finding_annotations.csv"
    if not finding_csv.is_file():
        matches = sorted(source.rglob("finding_annotations.csv"))
        finding_csv = matches[0] if matches else finding_csv
    if finding_csv.is_file():
        for row in _read_csv(finding_csv):
            try:
                coords = [float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (KeyError, ValueError):
                continue  # "No Finding" rows have no box
            birads = _birads_number(row.get("finding_birads", ""))
            try:
                categories = ast.literal_eval(row.get("finding_categories", "[]") or "[]")
            except (ValueError, SyntaxError):
                categories = [row.get("finding_categories", "")]
            if birads is not None and birads >= 4:
                label = "malignant"
            elif birads in (2, 3):
                label = "benign"
            else:
                label = ";".join(str(c) for c in categories) or "finding"
            box = [max(coords[0], 0.0), max(coords[1], 0.0), max(coords[2], 0.0), max(coords[3], 0.0)]
            boxes[row["image_id"].strip()].append({"label": label, "box": box, "categories": categories})
    images_dir = source / "images"
    for line, row in enumerate(rows, start=2):
        study, image = row["study_id"].strip(), row["image_id"].strip()
        path = images_dir / study / f"{image}.dicom"
        if not path.is_file():
            alt = images_dir / study / f"{image}.dcm"
            if not alt.is_file():
                result.skipped.append((f"{breast_csv.name}:{line}", f"image not found: {path}"))
                continue
            path = alt
        side, view = normalize_laterality(row["laterality"]), normalize_view(row["view_position"])
        if side is None or view is None:
            result.skipped.append(
                (
                    f"{breast_csv.name}:{line}",
                    f"view {row['laterality']}-{row['view_position']} is not L/R CC/MLO",
                )
            )
            continue
        birads = _birads_number(row["breast_birads"])
        benign, malignant = _birads_labels(birads, birads3)
        split = {"training": "train", "test": "test"}.get(row.get("split", "").strip().lower(), "")
        result.records.append(
            {
                "image_id": image,
                "image_path": str(path.resolve()),
                "patient_id": study,
                "exam_id": study,
                "laterality": side,
                "view": view,
                "benign_label": _label(benign),
                "malignant_label": _label(malignant),
                "breast_benign_label": _label(benign),
                "breast_malignant_label": _label(malignant),
                "boxes": json.dumps(boxes[image]) if boxes.get(image) else "",
                "split": split,
                "dataset": "vindr",
                "birads": str(birads or ""),
                "density": row.get("breast_density", "").replace("DENSITY", "").strip(),
            }
        )
    return result


# --------------------------------------------------------------------------------------------------
# RSNA


def prepare_rsna(source: Path, out_dir: Path) -> PrepareResult:
    """RSNA Screening Mammography (Kaggle 2022: ``train.csv`` + ``train_images/<patient>/<image>.dcm``).

    Labelling rule: ``cancer`` is a breast-level label -> ``breast_malignant_label``. Image level:
    ``malignant_label = 0`` when the breast has no cancer (no view of it can show one), unknown when it
    has. Benign labels are unknown (RSNA does not record benign findings). Views other than CC/MLO
    (AT, ML, LM, LMO) are skipped. Split is left empty (the public test set has no labels).
    """
    result = PrepareResult()
    train_csv = _find_file(source, "train.csv")
    rows = _read_csv(train_csv)
    _require_columns(rows, ("patient_id", "image_id", "laterality", "view", "cancer"), train_csv)
    images_dir = train_csv.parent / "train_images"
    for line, row in enumerate(rows, start=2):
        patient, image = row["patient_id"].strip(), row["image_id"].strip()
        side, view = normalize_laterality(row["laterality"]), normalize_view(row["view"])
        if side is None or view is None:
            result.skipped.append((f"{train_csv.name}:{line}", f"view {row['view']!r} is not CC or MLO"))
            continue
        path = images_dir / patient / f"{image}.dcm"
        if not path.is_file():
            result.skipped.append((f"{train_csv.name}:{line}", f"image not found: {path}"))
            continue
        cancer = row["cancer"].strip()
        breast_malignant = int(cancer) if cancer in ("0", "1") else None
        result.records.append(
            {
                "image_id": image,
                "image_path": str(path.resolve()),
                "patient_id": patient,
                "exam_id": patient,
                "laterality": side,
                "view": view,
                "malignant_label": "0" if breast_malignant == 0 else "",
                "breast_malignant_label": _label(breast_malignant),
                "dataset": "rsna",
                "site_id": row.get("site_id", ""),
                "birads": row.get("BIRADS", ""),
                "density": row.get("density", ""),
                "biopsy": row.get("biopsy", ""),
            }
        )
    return result


# --------------------------------------------------------------------------------------------------
# CMMD


def _read_table(path: Path) -> list[dict[str, str]]:
    if path.suffix.lower() in (".xlsx", ".xls"):
        import pandas as pd

        if path.suffix.lower() == ".xlsx":
            require("openpyxl", f"{path}: reading .xlsx (or save the sheet as CSV)")
        try:
            frame = pd.read_excel(path, dtype=str)
        except ImportError as exc:  # .xls: pandas needs xlrd, which no extra installs
            raise ManifestError(
                f"{path}: reading .xls needs xlrd ({exc}); save the sheet as CSV or .xlsx"
            ) from exc
        return [
            {str(k).strip(): ("" if v is None or v != v else str(v)) for k, v in r.items()}
            for r in frame.to_dict("records")
        ]
    return _read_csv(path)


def prepare_cmmd(source: Path, out_dir: Path) -> PrepareResult:
    """CMMD (TCIA: ``CMMD/<ID1>/<study>/<series>/*.dcm`` + ``CMMD_clinicaldata_revision`` xlsx/csv).

    Labelling rule: the clinical table has one row per abnormal breast (``ID1``, ``LeftRight``,
    ``classification`` Benign/Malignant). Breast level: Malignant -> ``breast_malignant_label = 1``
    (benign unknown); Benign -> ``breast_benign_label = 1``, ``breast_malignant_label = 0``. Image
    level: ``malignant_label = 0`` for images of a Benign breast, otherwise unknown. Breasts not in the
    table get no labels. Laterality and view are read from the DICOM tags (``ImageLaterality``,
    ``ViewCodeSequence``/``ViewPosition``).
    """
    import pydicom

    from mammogmic.data.io import _dicom_laterality_view

    result = PrepareResult()
    tables = sorted(
        p for p in source.rglob("CMMD_clinicaldata*") if p.suffix.lower() in (".csv", ".xlsx", ".xls")
    )
    if not tables:
        raise ManifestError(f"{source}: cannot find CMMD_clinicaldata_revision (.xlsx or .csv)")
    labels: dict[tuple[str, str], str] = {}
    for row in _read_table(tables[0]):
        side = normalize_laterality(row.get("LeftRight", ""))
        if side and row.get("ID1"):
            labels[(row["ID1"].strip(), side)] = row.get("classification", "").strip().lower()
    for path in sorted(source.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception as exc:
            result.skipped.append((str(path), f"unreadable DICOM header ({exc})"))
            continue
        side, view = _dicom_laterality_view(ds)
        patient = str(ds.get("PatientID", "") or "").strip()
        if not patient:
            parts = [p for p in path.relative_to(source).parts if re.match(r"^D\d-\d+$", p)]
            patient = parts[0] if parts else path.parent.parent.parent.name
        if side is None or view is None:
            result.skipped.append((str(path), "laterality/view not in the DICOM tags"))
            continue
        classification = labels.get((patient, side))
        breast_benign = breast_malignant = image_malignant = None
        if classification == "malignant":
            breast_malignant = 1
        elif classification == "benign":
            breast_benign, breast_malignant, image_malignant = 1, 0, 0
        study = str(ds.get("StudyInstanceUID", "") or patient)
        result.records.append(
            {
                "image_id": f"{patient}_{side}_{view}_{path.stem}",
                "image_path": str(path.resolve()),
                "patient_id": patient,
                "exam_id": study,
                "laterality": side,
                "view": view,
                "malignant_label": _label(image_malignant),
                "breast_benign_label": _label(breast_benign),
                "breast_malignant_label": _label(breast_malignant),
                "dataset": "cmmd",
            }
        )
    _dedupe_ids(result)
    return result


def _dedupe_ids(result: PrepareResult) -> None:
    seen: dict[str, int] = defaultdict(int)
    for record in result.records:
        seen[record["image_id"]] += 1
        if seen[record["image_id"]] > 1:
            record["image_id"] = f"{record['image_id']}_{seen[record['image_id']]}"


# --------------------------------------------------------------------------------------------------
# INbreast


def _inbreast_rois(xml_path: Path) -> list[tuple[str, list[tuple[float, float]]]]:
    """``(name, polygon points (x, y))`` of every ROI in an INbreast OsiriX XML plist."""
    import plistlib

    try:
        with open(xml_path, "rb") as handle:
            plist = plistlib.load(handle)
    except Exception as exc:
        raise ManifestError(f"{xml_path}: cannot parse the INbreast XML ({exc})") from exc
    rois = []
    for image in plist.get("Images", []):
        for roi in image.get("ROIs", []):
            points = []
            for text in roi.get("Point_px", []):
                numbers = re.findall(r"-?\d+(?:\.\d+)?", str(text))
                if len(numbers) >= 2:
                    points.append((float(numbers[0]), float(numbers[1])))
            if points:
                rois.append((str(roi.get("Name", "finding")), points))
    return rois


def _inbreast_mask(rois: list[tuple[str, list[tuple[float, float]]]], shape: tuple[int, int]) -> np.ndarray:
    """Filled ROI polygons (single points and lines are drawn as such)."""
    import cv2

    mask = np.zeros(shape, np.uint8)
    for _, points in rois:
        polygon = np.round(np.array(points)).astype(np.int32).reshape(-1, 1, 2)
        if len(points) >= 3:
            cv2.fillPoly(mask, [polygon], 255)
        cv2.polylines(mask, [polygon], len(points) >= 3, 255)
    return mask


def prepare_inbreast(source: Path, out_dir: Path, *, masks: bool = True) -> PrepareResult:
    """INbreast (``AllDICOMs/<id>_<case>_MG_<L|R>_<CC|ML>_ANON.dcm``, ``INbreast.csv``/``.xls``, ``AllXML``).

    Labelling rule (BI-RADS proxy): ``Bi-Rads`` 1 -> benign 0, malignant 0; 2 and 3 -> benign 1,
    malignant 0; 4a/4b/4c/5/6 -> benign unknown, malignant 1. The same values at breast level. The
    file name's ``ML`` means the MLO view in INbreast. Patient and exam id: the case hash in the file
    name. Boxes: bounding boxes of the XML ROI polygons, labelled with the ROI name (Mass,
    Calcification...). Masks (``masks=True``): the filled polygons, written to ``out_dir/masks`` as the
    malignant mask of BI-RADS >= 4 images and the benign mask of BI-RADS 2/3 images. The table's footer
    rows (no file name) are ignored.
    """
    result = PrepareResult()
    tables = sorted(p for p in source.rglob("INbreast.*") if p.suffix.lower() in (".csv", ".xls", ".xlsx"))
    if not tables:
        raise ManifestError(f"{source}: cannot find INbreast.csv (or .xls)")
    table = tables[0]
    if table.suffix.lower() == ".csv":
        text = table.read_text(encoding="utf-8-sig", errors="replace")
        delimiter = ";" if text.count(";") > text.count(",") else ","
        rows = [
            {(k or "").strip(): (v or "") for k, v in r.items()}
            for r in csv.DictReader(io.StringIO(text), delimiter=delimiter)
        ]
    else:
        rows = _read_table(table)
    birads_by_file = {
        r.get("File Name", "").strip().split(".")[0]: r.get("Bi-Rads", "").strip()
        for r in rows
        if r.get("File Name", "").strip()
    }
    dicoms = sorted(source.rglob("*.dcm"))
    xml_dir = next((p for p in source.rglob("AllXML") if p.is_dir()), None)
    for path in dicoms:
        file_id = path.name.split("_")[0]
        parts = path.stem.split("_")
        side = normalize_laterality(parts[3]) if len(parts) > 4 else None
        view_token = parts[4].upper() if len(parts) > 4 else ""
        view = {"CC": "CC", "ML": "MLO", "MLO": "MLO"}.get(view_token)
        if side is None or view is None:
            side, view = laterality_view_from_name(path.name)
        if side is None or view is None:
            result.skipped.append((str(path), "cannot tell laterality/view from the file name"))
            continue
        if file_id not in birads_by_file:
            result.skipped.append((str(path), f"file id {file_id} not in {table.name}"))
            continue
        birads_text = birads_by_file[file_id]
        birads = _birads_number(birads_text)
        benign, malignant = (1, 0) if birads == 3 else _birads_labels(birads)
        case = parts[1] if len(parts) > 1 else file_id
        record = {
            "image_id": file_id,
            "image_path": str(path.resolve()),
            "patient_id": case,
            "exam_id": case,
            "laterality": side,
            "view": view,
            "benign_label": _label(benign),
            "malignant_label": _label(malignant),
            "breast_benign_label": _label(benign),
            "breast_malignant_label": _label(malignant),
            "dataset": "inbreast",
            "birads": birads_text,
        }
        if xml_dir is not None and (xml_dir / f"{file_id}.xml").is_file():
            rois = _inbreast_rois(xml_dir / f"{file_id}.xml")
            record["boxes"] = json.dumps(
                [
                    {"label": name, "box": [min(p[0] for p in pts), min(p[1] for p in pts),
                                            max(p[0] for p in pts), max(p[1] for p in pts)]}
                    for name, pts in rois
                ]
            )  # fmt: skip
            label = "malignant" if malignant == 1 else "benign" if benign == 1 else None
            size = _dicom_size(path) if masks and rois and label else None
            if size is not None:
                from PIL import Image

                target = out_dir / "masks" / f"{file_id}_{label}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_inbreast_mask(rois, size)).save(target)
                record[f"{label}_mask_path"] = str(target.resolve())
        result.records.append(record)
    return result


# --------------------------------------------------------------------------------------------------
# NYU exam-list pickle


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds only builtin containers, strings and numbers (no classes, no code).

    Lists, dicts, tuples, strings, bytes, ints, floats, bools and None need no class lookup; sets and
    frozensets are allowed by name. Anything else (numpy scalars, OrderedDict, arbitrary classes) is
    refused with :class:`pickle.UnpicklingError`.
    """

    _ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return set if name == "set" else frozenset
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only plain lists, dicts, strings and numbers are allowed"
        )


def load_exam_list(path: str | Path) -> list[dict[str, Any]]:
    """Read an NYU-style exam-list pickle safely (see :class:`RestrictedUnpickler`).

    Raises:
        ManifestError: unreadable file, forbidden content, or not a list of exam dicts.
    """
    file_path = Path(path)
    try:
        data = file_path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{file_path}: cannot read ({exc.strerror or exc})") from exc
    try:
        exams = RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise ManifestError(f"{file_path}: unsafe or invalid exam-list pickle: {exc}") from exc
    except Exception as exc:
        raise ManifestError(f"{file_path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(exams, list) or not all(isinstance(e, dict) for e in exams):
        raise ManifestError(f"{file_path}: expected a list of exam dicts, got {type(exams).__name__}")
    return exams


def prepare_nyu(source: Path, out_dir: Path, *, images: Path | None = None) -> PrepareResult:
    """NYU exam list (``exam_list_before_cropping.pkl``-style pickle) + a folder of PNGs.

    ``source`` is the pickle (or a folder holding one); images are ``<images>/<stem>.png`` with
    ``images`` defaulting to the pickle's folder, then its ``images/`` subfolder.

    Labelling rule (as the official GMIC code): ``cancer_label`` ``left_benign``/``left_malignant``/
    ``right_*`` are breast labels; every view of that breast gets them as image-level labels too.
    ``horizontal_flip`` is taken from the exam. Exams get ids ``exam<N>`` (the pickle has no patient id).
    """
    result = PrepareResult()
    pickle_path = source
    if source.is_dir():
        found = sorted(source.glob("*.pkl"))
        if not found:
            raise ManifestError(f"{source}: no .pkl exam list in this folder")
        pickle_path = found[0]
    exams = load_exam_list(pickle_path)
    folders = [images] if images is not None else [pickle_path.parent, pickle_path.parent / "images"]
    for number, exam in enumerate(exams):
        labels = exam.get("cancer_label", {}) or {}
        flip = str(exam.get("horizontal_flip", "NO")).upper()
        for full_view in ("L-CC", "R-CC", "L-MLO", "R-MLO"):
            for stem in exam.get(full_view, []) or []:
                path = next(
                    (f / f"{stem}.png" for f in folders if f is not None and (f / f"{stem}.png").is_file()),
                    None,
                )
                if path is None:
                    result.skipped.append((f"exam {number} {full_view}", f"image {stem}.png not found"))
                    continue
                side = "left" if full_view[0] == "L" else "right"
                benign, malignant = labels.get(f"{side}_benign"), labels.get(f"{side}_malignant")
                result.records.append(
                    {
                        "image_id": str(stem),
                        "image_path": str(path.resolve()),
                        "patient_id": f"exam{number}",
                        "exam_id": f"exam{number}",
                        "laterality": full_view[0],
                        "view": full_view[2:],
                        "benign_label": _label(benign),
                        "malignant_label": _label(malignant),
                        "breast_benign_label": _label(benign),
                        "breast_malignant_label": _label(malignant),
                        "horizontal_flip": flip,
                        "dataset": "nyu",
                    }
                )
    return result


ADAPTERS: dict[str, Callable[..., PrepareResult]] = {
    "cbis-ddsm": prepare_cbis_ddsm,
    "vindr": prepare_vindr,
    "rsna": prepare_rsna,
    "cmmd": prepare_cmmd,
    "inbreast": prepare_inbreast,
    "nyu": prepare_nyu,
}


def prepare(name: str, source: str | Path, out_dir: str | Path, **options: Any) -> PrepareResult:
    """Run the adapter ``name`` (one of :data:`ADAPTERS`)."""
    if name not in ADAPTERS:
        raise ManifestError(f"unknown dataset {name!r}; choose one of {', '.join(ADAPTERS)}")
    src = Path(source)
    if not src.exists():
        raise ManifestError(f"{src}: source not found")
    return ADAPTERS[name](src, Path(out_dir), **options)
