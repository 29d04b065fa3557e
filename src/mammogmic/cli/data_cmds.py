"""``mammogmic prepare`` (dataset -> manifest) and ``mammogmic preprocess`` (manifest -> crop cache)."""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Any

from mammogmic.cli import deprecated_alias, progress_bar, warn_deprecated

logger = logging.getLogger(__name__)

DATASETS = ("cbis-ddsm", "vindr", "rsna", "cmmd", "inbreast", "nyu")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Create the ``prepare`` and ``preprocess`` subcommands."""
    prep = subparsers.add_parser(
        "prepare",
        help="turn a public dataset as distributed into a manifest CSV",
        description=(
            "Build a manifest (one row per image) from a dataset folder: OUT/manifest.csv, OUT/skipped.csv "
            "(what was left out, and why) and, for datasets with lesion masks, OUT/masks/. Labelling rules per "
            "dataset are in docs/data.md. Nothing is written into SOURCE."
        ),
    )
    prep.add_argument("dataset", choices=DATASETS, help="which dataset layout SOURCE has")
    prep.add_argument("source", type=Path, help="dataset folder (for nyu: the exam-list .pkl or its folder)")
    prep.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder: OUT/manifest.csv, OUT/skipped.csv (a value ending in .csv, the manifest file "
        "itself, is deprecated)",
    )
    prep.add_argument("--images", type=Path, default=None, help="nyu only: folder of the PNGs")
    prep.add_argument(
        "--birads3",
        choices=("unknown", "benign"),
        default=None,
        help="vindr only: malignant label of BI-RADS 3 (default unknown)",
    )
    prep.add_argument("--no-masks", action="store_true", help="cbis-ddsm/inbreast: no lesion masks")
    prep.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the manifest and skipped list of an earlier run in --out",
    )
    deprecated_alias(prep, "--force", "--overwrite")
    prep.set_defaults(func=run_prepare)

    pre = subparsers.add_parser(
        "preprocess",
        help="crop every image of a manifest into a fast cache (official GMIC preprocessing)",
        description=(
            "Read each image, crop the breast and find the optimal window centre as the official GMIC "
            "pipeline does, and write cropped 16-bit .npy files, OUT/manifest.csv (with the preprocessing "
            "columns) and OUT/errors.csv. Resumable: a rerun skips images whose source, view, flip and masks "
            "are unchanged (same settings). OUT must be new, empty or an earlier preprocess OUT (other files "
            "need --force; files we did not write are never overwritten); one run at a time (--wait)."
        ),
    )
    pre.add_argument("manifest", type=Path, help="manifest CSV")
    pre.add_argument("--out", type=Path, required=True, help="output folder (not inside an input folder)")
    pre.add_argument("-j", "--workers", type=int, default=1, help="worker processes (default 1)")
    pre.add_argument(
        "--crop-iterations",
        type=int,
        default=100,
        help="breast-crop erosion/dilation iterations (official 100)",
    )
    pre.add_argument("--buffer-size", type=int, default=50, help="crop buffer in pixels (official 50)")
    pre.add_argument(
        "--window-size",
        type=int,
        nargs=2,
        default=(2944, 1920),
        metavar=("H", "W"),
        help="the model's window, cut around the optimal centre (official 2944 1920)",
    )
    pre.add_argument(
        "--orientation-check",
        choices=("dicom", "all", "none"),
        default="dicom",
        help="check the chest-wall side against the pixels for these inputs (default dicom)",
    )
    pre.add_argument("--no-voi", action="store_true", help="do not apply the DICOM VOI LUT / window")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.add_argument("--preview", type=int, default=16, help="images in OUT/preview.png (0: none)")
    pre.add_argument(
        "--force",
        action="store_true",
        help="write into an --out that holds other files (never overwriting any of them)",
    )
    pre.add_argument(
        "--wait", action="store_true", help="wait for another run writing into --out instead of failing"
    )
    deprecated_alias(pre, "--jobs", "--workers")
    deprecated_alias(pre, "--iterations", "--crop-iterations")
    deprecated_alias(pre, "--window", "--window-size")
    pre.set_defaults(func=run_preprocess)
    return prep


def _prepare_paths(out: Path) -> tuple[Path, Path, Path]:
    """(folder, manifest, skipped list) of ``prepare --out``: ``OUT/manifest.csv`` and ``OUT/skipped.csv``; a
    value ending in ``.csv`` is the deprecated form that names the manifest file itself (skipped list beside it)."""
    if out.suffix.lower() == ".csv" and not out.is_dir():
        warn_deprecated(
            "mammogmic prepare",
            f"--out {out} (a manifest file)",
            "a folder: --out DIR writes DIR/manifest.csv",
        )
        return out.parent, out, out.with_name(out.stem + ".skipped.csv")
    return out, out / "manifest.csv", out / "skipped.csv"


def run_prepare(args: argparse.Namespace) -> int:
    """Run an adapter, validate its rows and write ``OUT/manifest.csv`` plus ``OUT/skipped.csv``."""
    from mammogmic._outdir import MARKER_NAME, removed_if_unused
    from mammogmic.data.adapters import prepare
    from mammogmic.data.manifest import save_manifest, validate_records
    from mammogmic.errors import MammogmicError

    if args.out.exists() and not args.out.is_dir() and args.out.suffix.lower() != ".csv":
        print(f"error: {args.out}: --out must be a folder, and this is an existing file", file=sys.stderr)
        return 2
    out_dir, out, skipped_path = _prepare_paths(args.out)
    if (out_dir / MARKER_NAME).exists():
        print(
            f"error: {out_dir} holds the outputs of another mammogmic command; choose another --out",
            file=sys.stderr,
        )
        return 2
    existing = [path for path in (out, skipped_path) if path.exists()]
    if existing and not args.overwrite:
        print(f"error: {existing[0]} exists (use --overwrite to replace it)", file=sys.stderr)
        return 2
    source = args.source.resolve()
    if out.resolve().is_relative_to(source if source.is_dir() else source.parent):
        print(
            f"error: --out {args.out} is inside the dataset folder {source}; choose another place",
            file=sys.stderr,
        )
        return 2
    # Options of one layout given for another are refused rather than silently ignored.
    for given, flag, datasets in (
        (args.images is not None, "--images", ("nyu",)),
        (args.birads3 is not None, "--birads3", ("vindr",)),
        (args.no_masks, "--no-masks", ("cbis-ddsm", "inbreast")),
    ):
        if given and args.dataset not in datasets:
            print(f"error: {flag} applies to {' and '.join(datasets)}, not {args.dataset}", file=sys.stderr)
            return 2
    options: dict[str, Any] = {}
    if args.dataset == "nyu" and args.images is not None:
        options["images"] = args.images
    if args.dataset == "vindr":
        options["birads3"] = args.birads3 or "unknown"
    if args.dataset in ("cbis-ddsm", "inbreast"):
        options["masks"] = not args.no_masks
    with removed_if_unused(out_dir):  # a dataset that cannot be read leaves no empty --out
        try:
            result = prepare(args.dataset, args.source, out_dir, **options)
            manifest = validate_records(result.records, out_dir, source=f"{args.dataset} adapter output")
        except MammogmicError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        save_manifest(manifest, out)
        with open(skipped_path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["item", "reason"])
            writer.writerows(result.skipped)
    print(f"wrote {out} ({len(manifest)} images); {len(result.skipped)} item(s) skipped -> {skipped_path}")
    return 0


def run_preprocess(args: argparse.Namespace) -> int:
    """Preprocess a manifest into a cache folder with a progress bar."""
    from mammogmic.data.cache import PreprocessSettings, preprocess_manifest
    from mammogmic.data.manifest import load_manifest
    from mammogmic.errors import MammogmicError

    try:
        manifest = load_manifest(args.manifest)
        settings = PreprocessSettings(
            iterations=args.crop_iterations,
            buffer_size=args.buffer_size,
            window_shape=(int(args.window_size[0]), int(args.window_size[1])),
            orientation_check=args.orientation_check,
            apply_voi=not args.no_voi,
        )
        with progress_bar(len(manifest), no_progress=args.no_progress, unit="img", desc="preprocess") as bar:
            summary = preprocess_manifest(
                manifest,
                args.out,
                settings=settings,
                jobs=args.workers,
                progress=bar.update,
                preview=args.preview,
                force=args.force,
                wait=args.wait,
            )
    except MammogmicError as exc:  # a bad manifest or --out (busy, not ours, inside an input folder)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{summary.processed} processed, {summary.skipped} unchanged (skipped), {summary.failed} failed; "
        f"manifest: {summary.manifest_path}; errors: {summary.errors_path}"
    )
    return 0 if summary.failed == 0 else 3
