"""``mammogmic synth``: generate a synthetic screening-mammography dataset."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from mammogmic.cli import deprecated_alias, progress_bar

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "synth",
        help="generate synthetic four-view screening exams with lesion masks and a manifest",
        description="Generate mammogram-like four-view exams (L-CC, R-CC, L-MLO, R-MLO) as 16-bit PNGs with "
        "12-bit values in raw orientation, per-class lesion masks, a manifest CSV (image- and breast-level "
        "labels, exam-level train/val/test split, boxes), findings.csv, synth.json and preview.png. "
        "Deterministic in --seed/--exams/--image-size and the generator options, whatever -j is.",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (must not hold a generated set yet)"
    )
    p.add_argument("--exams", type=int, default=100, help="number of exams, 4 images each (default 100)")
    p.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=(736, 480),
        help="image height and width (default 736 480; full field is 3328 2560)",
    )
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument(
        "--preset",
        choices=("default", "demo"),
        default="default",
        help="generator preset: "
        "'demo' = ~40%% of breasts malignant, ~40%% benign, less dense, for the README demo",
    )
    p.add_argument("--dicom", action="store_true", help="also write MG DICOM files and manifest_dicom.csv")
    p.add_argument(
        "--density", help="BI-RADS density: 'mixed' (10/40/40/10%%), a letter A-D, or a list 'A,B'"
    )
    p.add_argument("--malignant-rate", type=float, help="probability that a breast has a malignant finding")
    p.add_argument("--benign-rate", type=float, help="probability that a breast has a benign finding")
    p.add_argument("--calcification-fraction", type=float, help="share of findings that are calcifications")
    p.add_argument("--noise", type=float, help="acquisition-noise scale (0 = none, 1 = default)")
    p.add_argument(
        "--split",
        type=float,
        nargs=3,
        metavar=("TRAIN", "VAL", "TEST"),
        help="exam split fractions (default 0.7 0.15 0.15)",
    )
    p.add_argument("-j", "--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--png-compression", type=int, default=1, help="PNG zlib level 0-9 (default 1)")
    p.add_argument(
        "--overwrite", action="store_true", help="write into a folder that already holds a generated set"
    )
    p.add_argument(
        "--no-preview", action="store_true", help="skip preview.png (contact sheet of the first exams)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    deprecated_alias(p, "--size", "--image-size")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import cv2

    from mammogmic.data.synth import VIEWS, SynthConfig, generate_dataset, parse_density
    from mammogmic.data.synth.dataset import exam_id
    from mammogmic.data.synth.exam import CLASSES
    from mammogmic.data.synth.preview import contact_sheet
    from mammogmic.errors import MammogmicError

    try:
        overrides: dict[str, Any] = {}
        if args.density is not None:
            overrides["density_weights"] = parse_density(args.density)
        for name in ("malignant_rate", "benign_rate", "calcification_fraction", "noise"):
            if getattr(args, name) is not None:
                overrides[name] = getattr(args, name)
        if args.split is not None:
            overrides["split_fractions"] = tuple(args.split)
        config = SynthConfig.demo(**overrides) if args.preset == "demo" else SynthConfig(**overrides)
        progress = _progress(args.exams, args.no_progress)
        manifest = generate_dataset(
            args.out,
            args.exams,
            tuple(args.image_size),
            args.seed,
            config,
            args.workers,
            dicom=args.dicom,
            overwrite=args.overwrite,
            png_compression=args.png_compression,
            progress=progress,
        )
    except MammogmicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if "progress" in locals():
            progress.close()
    out = manifest.parent
    summary = json.loads((out / "synth.json").read_text())
    if not args.no_preview:
        exams = []
        for i in range(min(3, args.exams)):
            views: list[tuple[str, Any, dict[str, Any], dict[str, Any]]] = []
            for view in VIEWS:
                image_id = f"{exam_id(i)}_{view}"
                image = cv2.imread(str(out / "images" / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
                masks = {
                    c: cv2.imread(str(out / "masks" / f"{image_id}_{c}.png"), cv2.IMREAD_UNCHANGED)
                    for c in CLASSES
                }
                views.append((view, image, masks, {}))
            exams.append(views)
        cv2.imwrite(str(out / "preview.png"), contact_sheet(exams, height=320, outline=True))
    print(
        f"wrote {summary['n_images']} images ({summary['malignant_images']} malignant, "
        f"{summary['benign_images']} benign, {summary['normal_images']} normal) in {summary['seconds']} s"
    )
    print(f"manifest: {manifest}")
    return 0


class _progress:
    """tqdm progress bar used as a callback (closed by the caller)."""

    def __init__(self, total: int, no_progress: bool) -> None:
        self.bar = progress_bar(total, no_progress=no_progress, unit="exam")
        self.done = 0

    def __call__(self, done: int) -> None:
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        self.bar.close()
