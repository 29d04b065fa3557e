"""``mammogmic preprocess``: crop every image of a manifest once, into a fast-loading cache.

Output folder layout::

    OUT/manifest.csv        the input manifest completed with the preprocessing columns and cached_path; image
                            and mask paths are absolute, cache paths relative to OUT (the manifest's folder)
    OUT/errors.csv          file, image_id, stage, reason for every image that could not be used
    OUT/cache/<id>.npy      cropped 16-bit pixels in raw orientation (uncompressed, memory-mappable)
    OUT/cache/<id>_benign.npy, <id>_malignant.npy   cropped masks (uint8), when the manifest has masks
    OUT/summary.json        counts of this run (processed, skipped, failed)
    OUT/preview.png         contact sheet: oriented crops with the model window (red) of the first images
    OUT/progress.jsonl      one line per finished image (lets an interrupted run resume)
    OUT/preprocess.json     the settings; a rerun with other settings redoes everything
    OUT/.mammogmic-out.json, OUT/.mammogmic.lock   marker (what we wrote) and the one-writer lock

A rerun skips images whose cache entry exists, whose source is unchanged (same size and mtime, or else the
same SHA-256) and whose manifest fields used by the crop (view, horizontal_flip) and mask files (SHA-256)
are unchanged; everything else is redone. ``manifest.csv``, ``errors.csv`` and ``summary.json`` are removed
when a run starts and rewritten at its end, so an interrupted run never leaves a manifest that points at
cache files of another run. One bad file never stops the batch: it goes to ``errors.csv``. The output
folder may not be (or be inside) a folder that holds input images, and inputs are never written. The folder
is claimed through :class:`mammogmic._outdir.OutputFolder`: one run at a time, and only a new folder, an
empty one or one of an earlier ``preprocess`` (files of other origins need ``force``; a file with an output
name that we did not write is never overwritten).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mammogmic._json import to_json_text, write_json
from mammogmic._outdir import OutputFolder, OutputLayout, atomic_write_bytes, atomic_write_text
from mammogmic.data.io import check_regular_file, read_image, read_mask
from mammogmic.data.manifest import Manifest, ManifestRow, save_manifest
from mammogmic.data.preprocessing import (
    best_center,
    chest_wall_side,
    crop_breast,
    expected_chest_wall_side,
    orient,
    sample_window,
)
from mammogmic.errors import ImageReadError, MammogmicError, PreprocessingError

logger = logging.getLogger(__name__)

__all__ = [
    "PREPROCESS_LAYOUT",
    "PreprocessSettings",
    "PreprocessSummary",
    "preprocess_manifest",
    "cache_name",
    "sha256_file",
    "write_preview",
]


PREPROCESS_LAYOUT = OutputLayout(
    "preprocess",
    frozenset(
        {"manifest.csv", "errors.csv", "summary.json", "preview.png", "progress.jsonl", "preprocess.json"}
    ),
    frozenset({"cache"}),
)


@dataclass(frozen=True)
class PreprocessSettings:
    """Settings of the preprocessing (written to ``preprocess.json``).

    Attributes:
        iterations: Erosion/dilation iterations of the crop (official 100).
        buffer_size: Crop buffer in pixels (official 50).
        window_shape: Window used to find the optimal centre (official ``(2944, 1920)``).
        orientation_check: ``"dicom"`` (default), ``"all"`` or ``"none"``: for which inputs the chest-wall
            side is checked against the pixels; when they disagree ``horizontal_flip`` is toggled and the
            change recorded in the ``orientation_note`` column.
        apply_voi: Apply the DICOM VOI LUT/window when reading.
    """

    iterations: int = 100
    buffer_size: int = 50
    window_shape: tuple[int, int] = (2944, 1920)
    orientation_check: str = "dicom"
    apply_voi: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "buffer_size": self.buffer_size,
            "window_shape": list(self.window_shape),
            "orientation_check": self.orientation_check,
            "apply_voi": self.apply_voi,
            "version": 1,
        }


@dataclass
class PreprocessSummary:
    """Counts of one run."""

    total: int = 0
    processed: int = 0
    skipped: int = 0
    failed: int = 0
    manifest_path: Path | None = None
    errors_path: Path | None = None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_name(image_id: str) -> str:
    """A file-system-safe, collision-free stem for an image id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[:80].strip("._") or "image"
    return f"{safe}_{hashlib.sha1(image_id.encode('utf-8')).hexdigest()[:8]}"


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, np.ascontiguousarray(array))
    os.replace(tmp, path)


def _check_output_dir(out_dir: Path, manifest: Manifest) -> None:
    out = out_dir.resolve()
    input_dirs = {manifest.root.resolve()}
    for row in manifest:
        for value in (row.image_path, row.benign_mask_path, row.malignant_mask_path):
            path = manifest.resolve(value)
            if path is not None:
                input_dirs.add(path.resolve().parent)
    for directory in input_dirs:
        if out == directory or directory in out.parents:
            raise MammogmicError(
                f"output folder {out_dir} is (inside) the input folder {directory}; choose a separate folder "
                "so that inputs are never written over"
            )
        if out in directory.parents:
            raise MammogmicError(
                f"output folder {out_dir} contains input images ({directory}); choose another"
            )


def _process_one(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: read, orient-check, crop, centre, write. Returns a result or an error dict."""
    row: ManifestRow = task["row"]
    settings: PreprocessSettings = task["settings"]
    source = Path(task["source"])
    stage = "read"
    try:
        stat = source.stat() if source.exists() else None
        image, meta = read_image(source, apply_voi=settings.apply_voi)
        stage = "orientation"
        flip = row.horizontal_flip
        notes: list[str] = []
        if meta.laterality is not None and meta.laterality != row.laterality:
            notes.append(
                f"{meta.laterality_source} says laterality {meta.laterality}, manifest says {row.laterality}"
            )
        if meta.view is not None and meta.view != row.view:
            notes.append(f"{meta.view_source} says view {meta.view}, manifest says {row.view}")
        check = settings.orientation_check == "all" or (
            settings.orientation_check == "dicom" and meta.format == "dicom"
        )
        if check:
            seen = chest_wall_side(image)
            expected = expected_chest_wall_side(row.full_view, flip)
            if seen != expected:
                flip = "YES" if flip == "NO" else "NO"
                notes.append(
                    f"pixels show the chest wall on the {seen}, expected {expected}: horizontal_flip={flip}"
                )
        stage = "crop"
        info = crop_breast(
            image, row.full_view, flip, iterations=settings.iterations, buffer_size=settings.buffer_size
        )
        stage = "center"
        centre = best_center(info, window_shape=settings.window_shape)
        stage = "write"
        out_dir = Path(task["cache_dir"])
        stem = cache_name(row.image_id)
        _atomic_save(out_dir / f"{stem}.npy", info.cropped.astype(np.uint16, copy=False))
        top, bottom, left, right = info.window_location
        mask_paths: dict[str, str] = {}
        for label in ("benign", "malignant"):
            mask_path = task.get(f"{label}_mask")
            if mask_path:
                stage = f"{label} mask"
                mask = read_mask(mask_path, image.shape)
                _atomic_save(out_dir / f"{stem}_{label}.npy", mask[top:bottom, left:right].astype(np.uint8))
                mask_paths[f"cached_{label}_mask_path"] = f"cache/{stem}_{label}.npy"
        record = info.to_record()
        record.update(
            {
                "cached_path": f"cache/{stem}.npy",
                "best_center": json.dumps([int(centre[0]), int(centre[1])]),
                "source_sha256": sha256_file(source),
                "horizontal_flip": flip,
            }
        )
        extra = {
            "source_size": str(stat.st_size if stat else ""),
            "source_mtime_ns": str(stat.st_mtime_ns if stat else ""),
            "orientation_note": "; ".join(notes),
            "cropped_shape": json.dumps(list(info.cropped.shape)),
            **mask_paths,
        }
        return {"ok": True, "image_id": row.image_id, "record": record, "extra": extra}
    except Exception as exc:  # one bad file must never stop the batch: every failure becomes a row
        reason = str(exc)
        if isinstance(exc, PreprocessingError) and str(source) not in reason:
            reason = f"{source}: {reason}"
        if not isinstance(exc, (ImageReadError, PreprocessingError)):
            reason = f"{source}: {type(exc).__name__}: {reason}"
            if not isinstance(exc, (MammogmicError, OSError)):
                logger.debug("unexpected error on %s", source, exc_info=True)
        return {"ok": False, "image_id": row.image_id, "file": str(source), "stage": stage, "reason": reason}


def _load_previous(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Finished entries from an earlier run: image_id -> {record, extra}."""
    previous: dict[str, dict[str, Any]] = {}
    journal = out_dir / "progress.jsonl"
    if journal.is_file():
        with open(journal, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption
                previous[entry["image_id"]] = entry
    return previous


def _mask_sha256(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        check_regular_file(path)
        return sha256_file(path)
    except (MammogmicError, OSError):
        return None  # the run reports it (stage "benign mask" / "malignant mask")


def _row_key(row: ManifestRow, manifest: Manifest) -> dict[str, Any]:
    """What of a manifest row, beyond its image, the cached crop depends on."""
    return {
        "view": row.full_view,
        "horizontal_flip": row.horizontal_flip,
        "benign_mask_sha256": _mask_sha256(manifest.resolve(row.benign_mask_path)),
        "malignant_mask_sha256": _mask_sha256(manifest.resolve(row.malignant_mask_path)),
    }


def _end_line(journal: Path) -> None:
    """End a line cut by an interruption, so that the next entry starts on its own line."""
    if journal.is_file() and journal.stat().st_size > 0:
        with open(journal, "rb+") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")


def _unchanged(entry: dict[str, Any], source: Path, out_dir: Path, row_key: dict[str, Any]) -> bool:
    if entry.get("key") != row_key or not (out_dir / entry["record"]["cached_path"]).is_file():
        return False
    for key in ("cached_benign_mask_path", "cached_malignant_mask_path"):
        if entry["extra"].get(key) and not (out_dir / entry["extra"][key]).is_file():
            return False
    try:
        stat = source.stat()
    except OSError:
        return False
    if str(stat.st_size) == entry["extra"].get("source_size") and str(stat.st_mtime_ns) == entry["extra"].get(
        "source_mtime_ns"
    ):
        return True
    if str(stat.st_size) != entry["extra"].get("source_size"):
        return False
    return sha256_file(source) == entry["record"].get("source_sha256")


def preprocess_manifest(
    manifest: Manifest,
    out_dir: str | os.PathLike[str],
    *,
    settings: PreprocessSettings | None = None,
    jobs: int = 1,
    progress: Callable[[int], Any] | None = None,
    preview: int = 16,
    force: bool = False,
    wait: bool = False,
) -> PreprocessSummary:
    """Preprocess every row of ``manifest`` into ``out_dir`` (see the module docstring).

    Args:
        manifest: A validated manifest.
        out_dir: Output folder (created; must not be or contain an input folder).
        settings: :class:`PreprocessSettings`.
        jobs: Worker processes (1 = in this process).
        progress: Called with 1 after each image (e.g. ``tqdm.update``).
        preview: Number of images in ``preview.png`` (0: no picture).
        force: write into a folder that also holds files we did not write (never overwriting them).
        wait: wait for another run writing into ``out_dir`` instead of failing.

    Returns:
        A :class:`PreprocessSummary`.

    Raises:
        MammogmicError: ``out_dir`` is or contains an input folder.
        OutputFolderError: ``out_dir`` is busy, or holds files we did not write (see ``force``).
    """
    settings = settings or PreprocessSettings()
    out = Path(out_dir)
    _check_output_dir(out, manifest)
    with OutputFolder(out, PREPROCESS_LAYOUT, force=force, wait=wait) as folder:
        return _preprocess(manifest, out, folder, settings, jobs, progress, preview)


def _preprocess(
    manifest: Manifest,
    out: Path,
    folder: OutputFolder,
    settings: PreprocessSettings,
    jobs: int,
    progress: Callable[[int], Any] | None,
    preview: int,
) -> PreprocessSummary:
    """Body of :func:`preprocess_manifest`, run while ``folder`` is claimed."""
    folder.claim("cache", "preprocess.json", "progress.jsonl")
    # Written again at the end: until then no manifest may point at cache files this run rewrites.
    folder.remove("manifest.csv", "errors.csv", "summary.json")
    cache_dir = out / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings_path = out / "preprocess.json"
    previous: dict[str, dict[str, Any]] = {}
    if settings_path.is_file() and json.loads(settings_path.read_text()) == settings.to_json():
        previous = _load_previous(out)
    elif (out / "progress.jsonl").is_file():
        logger.info("settings changed since the last run: preprocessing everything again")
        (out / "progress.jsonl").unlink()
    write_json(settings_path, settings.to_json())

    summary = PreprocessSummary(total=len(manifest))
    done: dict[str, dict[str, Any]] = {}
    tasks: list[dict[str, Any]] = []
    keys: dict[str, dict[str, Any]] = {}
    for row in manifest:
        source = manifest.resolve(row.image_path)
        assert source is not None  # required column, validated
        entry = previous.get(row.image_id)
        keys[row.image_id] = _row_key(row, manifest)
        if entry is not None and _unchanged(entry, source, out, keys[row.image_id]):
            done[row.image_id] = entry
            summary.skipped += 1
            if progress:
                progress(1)
            continue
        tasks.append(
            {
                "row": row,
                "settings": settings,
                "source": str(source),
                "cache_dir": str(cache_dir),
                "benign_mask": str(manifest.resolve(row.benign_mask_path) or ""),
                "malignant_mask": str(manifest.resolve(row.malignant_mask_path) or ""),
            }
        )
    errors: list[dict[str, Any]] = []
    _end_line(out / "progress.jsonl")
    with open(out / "progress.jsonl", "a", encoding="utf-8") as journal:
        for result in _run(tasks, jobs):
            if result["ok"]:
                entry = {
                    "image_id": result["image_id"],
                    "record": result["record"],
                    "extra": result["extra"],
                    "key": keys[result["image_id"]],
                }
                journal.write(to_json_text(entry, indent=None))
                journal.flush()
                done[result["image_id"]] = entry
                summary.processed += 1
            else:
                errors.append(result)
                summary.failed += 1
                logger.warning("%s", result["reason"])
            if progress:
                progress(1)

    rows: list[ManifestRow] = []
    for row in manifest:
        entry = done.get(row.image_id)
        if entry is None:
            continue
        record = entry["record"]
        extra = {**row.extra, **entry["extra"]}
        rows.append(
            replace(
                row,
                image_path=str(manifest.resolve(row.image_path)),
                benign_mask_path=str(manifest.resolve(row.benign_mask_path))
                if row.benign_mask_path
                else None,
                malignant_mask_path=str(manifest.resolve(row.malignant_mask_path))
                if row.malignant_mask_path
                else None,
                cached_path=record["cached_path"],
                window_location=json.loads(record["window_location"]),
                rightmost_points=json.loads(record["rightmost_points"]),
                bottommost_points=json.loads(record["bottommost_points"]),
                distance_from_starting_side=int(record["distance_from_starting_side"]),
                best_center=json.loads(record["best_center"]),
                source_sha256=record["source_sha256"],
                horizontal_flip=record["horizontal_flip"],
                extra=extra,
            )
        )
    folder.claim("manifest.csv", "errors.csv", "summary.json")
    summary.manifest_path = save_manifest(Manifest(rows, out), out / "manifest.csv")
    summary.errors_path = out / "errors.csv"
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["file", "image_id", "stage", "reason"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(errors)
    atomic_write_text(summary.errors_path, text.getvalue())
    counts = {"total": summary.total, "processed": summary.processed, "skipped": summary.skipped}
    write_json(out / "summary.json", {**counts, "failed": summary.failed})
    folder.remove("preview.png")  # a picture of an earlier run must not stay
    if rows and preview > 0:
        folder.claim("preview.png")
        try:
            write_preview(Manifest(rows, out), out / "preview.png", settings.window_shape, limit=preview)
        except Exception as exc:  # a picture must never fail the batch
            logger.warning("could not write the preview: %s", exc)
    return summary


def write_preview(
    manifest: Manifest, path: Path, window_shape: tuple[int, int], *, limit: int = 16, height: int = 256
) -> Path:
    """Contact sheet of preprocessed rows: each oriented crop with its model window drawn in red."""
    import cv2
    from PIL import Image

    tiles = []
    for row in manifest.rows[:limit]:
        cached = manifest.resolve(row.cached_path)
        if cached is None or row.best_center is None:
            continue
        crop = orient(np.load(cached, mmap_mode="r"), row.full_view, row.horizontal_flip)
        window = sample_window(crop.shape, row.full_view, row.best_center, window_shape=window_shape)
        top, bottom, left, right = window.borders
        top, bottom = top - window.pad_top, bottom - window.pad_top
        # Show the union of the crop and the window (the window may reach past the crop: zero padding).
        y0, y1 = min(0, top), max(crop.shape[0], bottom)
        x0, x1 = min(0, left), max(crop.shape[1], right)
        scale = height / (y1 - y0)
        width = max(1, round(crop.shape[1] * scale))
        small = cv2.resize(
            np.asarray(crop, dtype=np.float32),
            (width, max(1, round(crop.shape[0] * scale))),
            interpolation=cv2.INTER_AREA,
        )
        high = float(np.percentile(small, 99.5)) or 1.0
        gray = np.clip(small / high * 255, 0, 255).astype(np.uint8)
        tile = np.zeros((height + 30, max(round((x1 - x0) * scale), 150) + 10, 3), np.uint8)
        oy, ox = 25 + round(-y0 * scale), 5 + round(-x0 * scale)
        tile[oy : oy + gray.shape[0], ox : ox + gray.shape[1]] = gray[..., None]
        corner1 = (5 + round((left - x0) * scale), 25 + round((top - y0) * scale))
        corner2 = (5 + round((right - x0) * scale) - 1, 25 + round((bottom - y0) * scale) - 1)
        cv2.rectangle(tile, corner1, corner2, (255, 0, 0), 1)
        label = f"{row.image_id[:18]} {row.full_view}"
        cv2.putText(tile, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255))
        tiles.append(tile)
    if not tiles:
        raise ValueError("no preprocessed rows to show")
    cell_h = max(t.shape[0] for t in tiles)
    cell_w = max(t.shape[1] for t in tiles)
    columns = min(len(tiles), 8)
    sheet = np.zeros((cell_h * ((len(tiles) + columns - 1) // columns), cell_w * columns, 3), np.uint8)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        sheet[r * cell_h : r * cell_h + tile.shape[0], c * cell_w : c * cell_w + tile.shape[1]] = tile
    buffer = io.BytesIO()
    Image.fromarray(sheet).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _run(tasks: list[dict[str, Any]], jobs: int) -> Iterator[dict[str, Any]]:
    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield _process_one(task)
        return
    import multiprocessing as mp

    with mp.get_context("spawn" if os.name == "nt" else "fork").Pool(jobs) as pool:
        yield from pool.imap_unordered(_process_one, tasks, chunksize=1)
