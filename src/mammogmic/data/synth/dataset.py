"""Write a whole synthetic dataset: images, masks, optional DICOM, manifest, findings table."""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mammogmic.data.manifest import COLUMNS, PREPROCESSING_COLUMNS
from mammogmic.data.synth.anatomy import FULL_PIXEL_MM, FULL_SIZE
from mammogmic.data.synth.config import SynthConfig
from mammogmic.data.synth.exam import CLASSES, check_size, exam_plan, generate_exam
from mammogmic.errors import ConfigError, MammogmicError

logger = logging.getLogger(__name__)

#: The manifest's columns (one list, in :mod:`mammogmic.data.manifest`), less those ``preprocess`` writes,
#: plus the synthetic breast density.
MANIFEST_COLUMNS: tuple[str, ...] = (*(c for c in COLUMNS if c not in PREPROCESSING_COLUMNS), "density")
FINDING_COLUMNS: tuple[str, ...] = (
    "image_id",
    "exam_id",
    "laterality",
    "view",
    "finding_id",
    "label",
    "kind",
    "size_mm",
    "center_x",
    "center_y",
    "x_min",
    "y_min",
    "x_max",
    "y_max",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Entries the generator writes into its output folder (anything else there is someone else's).
OWN_ENTRIES: frozenset[str] = frozenset(
    {
        "images",
        "masks",
        "dicom",
        "manifest.csv",
        "manifest_dicom.csv",
        "findings.csv",
        "synth.json",
        "preview.png",
    }
    | {f"{n}.tmp" for n in ("manifest.csv", "manifest_dicom.csv", "findings.csv")}
)


def exam_seed(master_seed: int, index: int) -> int:
    """Seed of exam ``index``, derived from the master seed (independent of worker count)."""
    return int(np.random.SeedSequence([int(master_seed), int(index)]).generate_state(1)[0])


def exam_id(index: int) -> str:
    """Exam identifier of exam ``index``."""
    return f"synth{index:06d}"


def assign_splits(n_exams: int, seed: int, config: SynthConfig) -> list[str]:
    """Exam-level train/val/test split, stratified by which classes the exam holds.

    Deterministic in (n_exams, seed, config); each stratum is shuffled and cut by the fractions.
    """
    strata: dict[tuple[bool, bool], list[int]] = {}
    for i in range(n_exams):
        plan = exam_plan(exam_seed(seed, i), config)
        fs = [f for side in ("L", "R") for f in plan["findings"][side]]
        key = (any(f.cls == "malignant" for f in fs), any(f.cls == "benign" for f in fs))
        strata.setdefault(key, []).append(i)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 424242]))
    out = [""] * n_exams
    f_train, f_val, _ = config.split_fractions
    carry = np.zeros(3)
    for key in sorted(strata):
        members = list(rng.permutation(strata[key]))
        n = len(members)
        # largest-remainder rounding, carrying the remainders across strata
        want = np.array(config.split_fractions) * n + carry
        counts = np.floor(want).astype(int)
        rest = n - int(counts.sum())
        for j in np.argsort(-(want - counts), kind="stable")[:rest]:
            counts[j] += 1
        carry = want - counts
        bounds = np.cumsum(counts)
        for k, idx in enumerate(members):
            out[int(idx)] = SPLITS[int(np.searchsorted(bounds, k, side="right"))]
    del f_train, f_val
    return out


def _write_png(path: Path, array: np.ndarray, compression: int) -> None:
    import cv2

    # Sub filter + run-length zlib strategy: ~4x faster than OpenCV's default adaptive filtering at
    # full size, and the files are no larger (the 12-bit noise leaves little for LZ77 to find).
    params = [
        cv2.IMWRITE_PNG_COMPRESSION,
        compression,
        cv2.IMWRITE_PNG_FILTER,
        cv2.IMWRITE_PNG_FILTER_SUB,
        cv2.IMWRITE_PNG_STRATEGY,
        cv2.IMWRITE_PNG_STRATEGY_RLE,
    ]
    if not cv2.imwrite(str(path), array, params):
        raise MammogmicError(f"{path}: could not write PNG")


def _make_exam(job: tuple[int, int, tuple[int, int], dict[str, Any], str, str, bool, int]) -> dict[str, Any]:
    """Render and write one exam (runs in worker processes); returns its manifest/finding rows."""
    index, seed, size, cfg_dict, out_dir_s, split, dicom, compression = job
    out_dir = Path(out_dir_s)
    config = SynthConfig.from_dict(cfg_dict)
    views = generate_exam(seed, size, config)
    eid = exam_id(index)
    pid = f"P{index:06d}"
    breast_labels: dict[str, dict[str, int]] = {s: dict.fromkeys(CLASSES, 0) for s in ("L", "R")}
    for _view, _img, masks, meta in views:
        for c in CLASSES:
            if masks[c].any():
                breast_labels[meta["laterality"]][c] = 1
    rows: list[dict[str, Any]] = []
    finding_rows: list[dict[str, Any]] = []
    pixel_mm = FULL_PIXEL_MM * float(np.sqrt(FULL_SIZE[0] * FULL_SIZE[1] / (size[0] * size[1])))
    for k, (view, image, masks, meta) in enumerate(views):
        image_id = f"{eid}_{view}"
        img_rel = f"images/{image_id}.png"
        _write_png(out_dir / img_rel, image, compression)
        mask_rel = {c: f"masks/{image_id}_{c}.png" for c in CLASSES}
        for c in CLASSES:
            _write_png(out_dir / mask_rel[c], masks[c], compression)
        side, v = meta["laterality"], meta["view"]
        dcm_rel = ""
        if dicom:
            from mammogmic.data.synth.dicom import write_dicom

            dcm_rel = f"dicom/{image_id}.dcm"
            write_dicom(
                out_dir / dcm_rel,
                image,
                laterality=side,
                view=v,
                patient_id=pid,
                exam_id=eid,
                image_id=image_id,
                pixel_mm=pixel_mm,
                instance_number=k + 1,
            )
        boxes = [{"label": f["label"], "box": f["box"]} for f in meta["findings"]]
        rows.append(
            {
                "image_id": image_id,
                "image_path": img_rel,
                "dicom_path": dcm_rel,
                "patient_id": pid,
                "exam_id": eid,
                "laterality": side,
                "view": v,
                "breast_id": f"{eid}_{side}",
                "benign_label": int(masks["benign"].any()),
                "malignant_label": int(masks["malignant"].any()),
                "breast_benign_label": breast_labels[side]["benign"],
                "breast_malignant_label": breast_labels[side]["malignant"],
                "benign_mask_path": mask_rel["benign"],
                "malignant_mask_path": mask_rel["malignant"],
                "boxes": json.dumps(boxes, separators=(",", ":")),
                "split": split,
                "horizontal_flip": "NO",
                "dataset": "synthetic",
                "density": meta["density"],
            }
        )
        for f in meta["findings"]:
            x0, y0, x1, y1 = f["box"]
            finding_rows.append(
                {
                    "image_id": image_id,
                    "exam_id": eid,
                    "laterality": side,
                    "view": v,
                    "finding_id": f"{eid}_{side}_{f['finding_id']}",
                    "label": f["label"],
                    "kind": f["kind"],
                    "size_mm": f["size_mm"],
                    "center_x": f["center"][0],
                    "center_y": f["center"][1],
                    "x_min": x0,
                    "y_min": y0,
                    "x_max": x1,
                    "y_max": y1,
                }
            )
    return {"index": index, "rows": rows, "findings": finding_rows}


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)


def generate_dataset(
    out_dir: str | Path,
    n_exams: int,
    size: tuple[int, int] = (736, 480),
    seed: int = 0,
    config: SynthConfig | None = None,
    workers: int = 1,
    *,
    dicom: bool = False,
    overwrite: bool = False,
    png_compression: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Generate ``n_exams`` four-view exams into ``out_dir`` and return the manifest path.

    Layout::

        out_dir/images/<image_id>.png              16-bit PNG, 12-bit values
        out_dir/masks/<image_id>_{benign,malignant}.png   0/255, same size and orientation
        out_dir/dicom/<image_id>.dcm               with dicom=True
        out_dir/manifest.csv                        project manifest (PNG paths, relative)
        out_dir/manifest_dicom.csv                  same rows with DICOM image paths (dicom=True)
        out_dir/findings.csv                        one row per finding per view (box, kind, size)
        out_dir/synth.json                          config, seed, size, counts, seconds

    The result depends only on (n_exams, size, seed, config), never on ``workers``.

    Args:
        out_dir: output folder (created). Without ``overwrite`` it must not hold a finished set
            (``manifest.csv``) or files the generator does not write; an interrupted set is completed.
        n_exams: number of exams (four images each).
        size: (H, W) of every image.
        seed: master seed; exam i uses a seed derived from (seed, i).
        config: generator settings (default :class:`SynthConfig`).
        workers: processes to use.
        dicom: also write DICOM files and ``manifest_dicom.csv``.
        overwrite: allow writing into a folder that already holds a generated set.
        png_compression: zlib level 0-9 for the PNGs (1 is fast and about as small).
        progress: called with the number of exams finished so far, after each exam.

    Raises:
        ConfigError: a bad argument (the message names it).
        MammogmicError: ``out_dir`` already holds a dataset and ``overwrite`` is False.
    """
    config = config or SynthConfig()
    size = check_size(size)
    if not isinstance(n_exams, int) or isinstance(n_exams, bool) or n_exams < 1:
        raise ConfigError(f"n_exams: expected a positive integer, got {n_exams!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers: expected a positive integer, got {workers!r}")
    if not 0 <= int(png_compression) <= 9:
        raise ConfigError(f"png_compression: expected 0..9, got {png_compression!r}")
    out = Path(out_dir)
    manifest = out / "manifest.csv"
    if manifest.exists() and not overwrite:
        raise MammogmicError(
            f"{manifest}: already exists; choose another output folder or allow overwriting (--overwrite)"
        )
    if out.exists() and not out.is_dir():
        raise MammogmicError(f"{out}: exists and is not a folder")
    if out.is_dir() and not overwrite:
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_ENTRIES)
        if foreign:
            raise MammogmicError(
                f"{out}: folder holds other files ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                "choose an empty or new output folder, or allow overwriting (--overwrite)"
            )
    for sub in ("images", "masks") + (("dicom",) if dicom else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    splits = assign_splits(n_exams, seed, config)
    cfg = config.to_dict()
    jobs = [
        (i, exam_seed(seed, i), size, cfg, str(out), splits[i], dicom, int(png_compression))
        for i in range(n_exams)
    ]
    results: list[dict[str, Any]] = [{}] * n_exams
    for done, res in enumerate(_run(jobs, workers), start=1):
        results[res["index"]] = res
        if progress is not None:
            progress(done)
    rows = [r for res in results for r in res["rows"]]
    _write_csv(manifest, MANIFEST_COLUMNS, rows)
    if dicom:
        dcm_rows = [{**r, "image_path": r["dicom_path"]} for r in rows]
        _write_csv(out / "manifest_dicom.csv", MANIFEST_COLUMNS, dcm_rows)
    _write_csv(out / "findings.csv", FINDING_COLUMNS, [f for res in results for f in res["findings"]])
    seconds = time.perf_counter() - t0
    summary = {
        "n_exams": n_exams,
        "n_images": len(rows),
        "size": list(size),
        "seed": int(seed),
        "config": cfg,
        "dicom": bool(dicom),
        "images_per_split": {s: sum(r["split"] == s for r in rows) for s in SPLITS},
        "malignant_images": sum(int(r["malignant_label"]) for r in rows),
        "benign_images": sum(int(r["benign_label"]) for r in rows),
        "normal_images": sum(int(r["malignant_label"]) == 0 and int(r["benign_label"]) == 0 for r in rows),
        "seconds": round(seconds, 2),
        "workers": workers,
    }
    (out / "synth.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("wrote %d images to %s in %.1f s", len(rows), out, seconds)
    return manifest


def _run(jobs: list[Any], workers: int) -> Iterator[dict[str, Any]]:
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            yield _make_exam(job)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(jobs)), initializer=_worker_init) as pool:
        yield from pool.imap_unordered(_make_exam, jobs, chunksize=1)


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
