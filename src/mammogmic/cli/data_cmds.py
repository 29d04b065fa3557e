"""``mammogmic prepare`` (dataset -> manifest) and ``mammogmic preprocess`` (manifest -> crop cache)."""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DATASETS = ("cbis-ddsm", "vindr", "rsna", "cmmd", "inbreast", "nyu")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Create the ``prepare`` and ``preprocess`` subcommands."""
    prep = subparsers.add_parser(
        "prepare",
        help="turn a public dataset as distributed into a manifest CSV",
        description=(
            "Build a manifest (one row per image) from a dataset folder. Labelling rules per dataset are "
            "in docs/data.md. Nothing is written into SOURCE."
        ),
    )
    prep.add_argument("dataset", choices=DATASETS, help="which dataset layout SOURCE has")
    prep.add_argument("source", type=Path, help="dataset folder (for nyu: the exam-list .pkl or its folder)")
    prep.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
    prep.add_argument("--images", type=Path, default=None, help="nyu only: folder of the PNGs")
    prep.add_argument(
        "--birads3",
        choices=("unknown", "benign"),
        default=None,
        help="vindr only: malignant label of BI-RADS 3 (default unknown)",
    )
    prep.add_argument("--no-masks", action="store_true", help="cbis-ddsm/inbreast: no lesion masks")
    prep.add_argument("--force", action="store_true", help="overwrite --out if it exists")
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
    pre.add_argument("-j", "--jobs", type=int, default=1, help="worker processes (default 1)")
    pre.add_argument("--iterations", type=int, default=100, help="erosion/dilation iterations (official 100)")
    pre.add_argument("--buffer-size", type=int, default=50, help="crop buffer in pixels (official 50)")
    pre.add_argument(
        "--window",
        type=int,
        nargs=2,
        default=(2944, 1920),
        metavar=("H", "W"),
        help="model window (official 2944 1920)",
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
    pre.set_defaults(func=run_preprocess)
    return prep


def run_prepare(args: argparse.Namespace) -> int:
    """Run an adapter, validate its rows and write the manifest plus ``<out>.skipped.csv``."""
    from mammogmic.data.adapters import prepare
    from mammogmic.data.manifest import save_manifest, validate_records
    from mammogmic.errors import MammogmicError

    out: Path = args.out
    if out.exists() and not args.force:
        print(f"error: {out} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    source = args.source.resolve()
    if out.resolve().is_relative_to(source if source.is_dir() else source.parent):
        print(
            f"error: --out {out} is inside the dataset folder {source}; choose another place", file=sys.stderr
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
    try:
        result = prepare(args.dataset, args.source, out.parent, **options)
        manifest = validate_records(result.records, out.parent, source=f"{args.dataset} adapter output")
    except MammogmicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    save_manifest(manifest, out)
    skipped_path = out.with_name(out.stem + ".skipped.csv")
    with open(skipped_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item", "reason"])
        writer.writerows(result.skipped)
    print(f"wrote {out} ({len(manifest)} images); {len(result.skipped)} item(s) skipped -> {skipped_path}")
    return 0


def run_preprocess(args: argparse.Namespace) -> int:
    """Preprocess a manifest into a cache folder with a progress bar."""
    from tqdm import tqdm

    from mammogmic._outdir import OutputFolderError
    from mammogmic.data.cache import PreprocessSettings, preprocess_manifest
    from mammogmic.data.manifest import load_manifest
    from mammogmic.errors import MammogmicError

    try:
        manifest = load_manifest(args.manifest)
        settings = PreprocessSettings(
            iterations=args.iterations,
            buffer_size=args.buffer_size,
            window_shape=(int(args.window[0]), int(args.window[1])),
            orientation_check=args.orientation_check,
            apply_voi=not args.no_voi,
        )
        with tqdm(total=len(manifest), unit="img", disable=args.no_progress, desc="preprocess") as bar:
            summary = preprocess_manifest(
                manifest,
                args.out,
                settings=settings,
                jobs=args.jobs,
                progress=bar.update,
                preview=args.preview,
                force=args.force,
                wait=args.wait,
            )
    except OutputFolderError as exc:  # busy, or holding files we did not write
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MammogmicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{summary.processed} processed, {summary.skipped} unchanged (skipped), {summary.failed} failed; "
        f"manifest: {summary.manifest_path}; errors: {summary.errors_path}"
    )
    return 0 if summary.failed == 0 else 3
