"""Where a trained model's saliency peaks lie relative to the lesions of one split (docs/localization.md).

    python scripts/saliency_offsets.py RUN_DIR [--model best_dice_model.safetensors] [--split val] [--limit N]
        [--symmetry none|point|point_at_inference|flips_at_inference] [--grid native|fine_at_inference]
        [--subdivide F]

RUN_DIR is a ``mammogmic train`` / ``mammogmic demo`` run folder (its ``config.yaml`` gives the manifest and the
input contract). Prints one JSON object: hard Dice with both upsamplings, and
:func:`mammogmic.evaluation.localization.peak_offsets`' summary (distance from each lesion's centroid to the
saliency peak in pixels and cells, its signed rows/cols components, and how often it points into the breast),
for the malignant and the benign class, over the split's images that hold a lesion of any class; and, over the
split's images labelled without any finding (``normal_images``), the median of each map's maximum and the share of maps
that reach 0.5 (a mark on a normal breast). ``--symmetry`` reads the same weights with another
``saliency_symmetry`` (the model runs in eval mode, so ``point`` is the mean of the maps of the image and of its
180-degree turn, ``point_at_inference`` their geometric mean, ``flips_at_inference`` the geometric mean over the
image, its left-right and top-bottom mirror images and its 180-degree turn); ``--grid`` with another
``saliency_grid``. ``--subdivide F`` reads the maps on a grid F times finer again by shift-and-stitch: the model
also runs on the input shifted by every multiple of 1/F of the map's spacing (F² passes; the maps of the
shifted inputs fill the cells in between), a read-out for measuring only. The ``_cells`` figures are in the global
network's own cells (its stride), also on a finer grid.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from mammogmic.data.dataset import MammogramDataset
from mammogmic.evaluation.localization import DiceResult, PeakOffsets, dice_scores, peak_offsets
from mammogmic.models.checkpoint import load_model
from mammogmic.models.config import SALIENCY_GRIDS, SYMMETRIES
from mammogmic.training.config import TrainConfig
from mammogmic.training.data import split_dataset


def run_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every saliency script takes: a run folder, a model file inside it and a split."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run folder holding config.yaml and the model")
    parser.add_argument("--model", default="best_dice_model.safetensors", help="model file inside RUN")
    parser.add_argument("--split", default="val", help="manifest split (val)")
    return parser


def load_run(args: argparse.Namespace, *, masks: bool) -> tuple[MammogramDataset, Any]:
    """The split's images through the run's input contract, and the run's model in eval mode."""
    config = TrainConfig.from_dict(yaml.safe_load((args.run / "config.yaml").read_text()))
    return split_dataset(config, args.split, masks=masks), load_model(args.run / args.model).eval()


def subdivided(model: Any, x: torch.Tensor, saliency: torch.Tensor, factor: int) -> torch.Tensor:
    """``saliency`` (the model's maps of ``x``) on a grid ``factor`` times finer: cell ``(F·i + u, F·j + v)`` is
    the model's cell ``(i, j)`` on the input shifted by ``(u, v)`` times 1/F of the map's spacing (shifted
    up-left, the rows and columns uncovered at the bottom and right filled with the image's minimum, its
    background)."""
    if factor == 1:
        return saliency
    spacing = x.shape[2] // saliency.shape[2]
    if (
        spacing * saliency.shape[2] != x.shape[2]
        or spacing * saliency.shape[3] != x.shape[3]
        or spacing % factor
    ):
        raise SystemExit(f"--subdivide {factor}: the map's spacing of {spacing} pixels does not divide by it")
    step = spacing // factor
    n, c, h, w = saliency.shape
    fine = saliency.new_empty(n, c, h * factor, w * factor)
    background = x.amin(dim=(2, 3), keepdim=True)
    for u in range(factor):
        for v in range(factor):
            dy, dx = u * step, v * step
            shifted = torch.nn.functional.pad(x - background, (0, dx, 0, dy))[..., dy:, dx:] + background
            fine[:, :, u::factor, v::factor] = saliency if u == v == 0 else model.forward_global(shifted)[1]
    return fine


def main(argv: list[str] | None = None) -> int:
    parser = run_parser(__doc__)
    parser.add_argument("--limit", type=int, default=None, help="at most N images with a lesion")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--symmetry", choices=SYMMETRIES, default=None, help="saliency_symmetry to read with")
    parser.add_argument("--grid", choices=SALIENCY_GRIDS, default=None, help="saliency_grid to read with")
    parser.add_argument(
        "--subdivide",
        type=int,
        default=1,
        help="read the maps on a grid F times finer by shift-and-stitch (1)",
    )
    args = parser.parse_args(argv)
    if args.subdivide < 1:
        parser.error(f"--subdivide: expected a positive integer, got {args.subdivide}")
    images, model = load_run(args, masks=True)
    if args.symmetry is not None:
        model.config = dataclasses.replace(model.config, saliency_symmetry=args.symmetry)
    if args.grid is not None:
        model.config = dataclasses.replace(model.config, saliency_grid=args.grid)
    lesion = [bool(item.malignant_mask_path or item.benign_mask_path) for item in images.items]
    indices = [i for i in range(len(images)) if lesion[i]][: args.limit]
    dice: dict[str, list[DiceResult]] = {"aligned": [], "nearest": []}
    offsets: dict[str, list[PeakOffsets]] = {"benign": [], "malignant": []}
    with torch.no_grad():
        for start in range(0, len(indices), args.batch_size):
            batch = [images.load(i) for i in indices[start : start + args.batch_size]]
            x = torch.stack([s["image"] for s in batch])
            masks = torch.stack([s["masks"] for s in batch])
            out = model(x)
            saliency = subdivided(model, x, out.saliency, args.subdivide)
            for mode, parts in dice.items():
                parts.append(dice_scores(saliency, masks, upsample=mode))
            for class_index, name in enumerate(("benign", "malignant")):
                offsets[name].append(
                    peak_offsets(
                        saliency,
                        masks,
                        out.patch_locations,
                        model.config.crop_size,
                        class_index,
                        x,
                        cell_px=model.global_net.stride,
                    )
                )
    maxima = []
    normal = [i for i in range(len(images)) if not images.labels[i].any()][: args.limit]  # no finding
    with torch.no_grad():
        for start in range(0, len(normal), args.batch_size):
            x = torch.stack([images.load(i)["image"] for i in normal[start : start + args.batch_size]])
            maxima.append(subdivided(model, x, model(x).saliency, args.subdivide).flatten(2).amax(dim=2))
    peaks = torch.cat(maxima) if maxima else torch.zeros(0, 2)
    result = {
        "run": str(args.run),
        "model": args.model,
        "saliency_symmetry": model.config.saliency_symmetry,
        "saliency_grid": model.config.saliency_grid,
        "subdivide": args.subdivide,
        "split": args.split,
        "images": len(indices),
        "normal_images": {
            "n_images": len(normal),
            **{
                name: {
                    "median_map_maximum": float(peaks[:, c].median()) if len(normal) else None,
                    "fraction_marked": float((peaks[:, c] >= 0.5).float().mean()) if len(normal) else None,
                }
                for c, name in enumerate(("benign", "malignant"))
            },
        },
        "dice": {mode: DiceResult.concatenate(parts).summary() for mode, parts in dice.items()},
        "offsets": {name: PeakOffsets.concatenate(parts).summary() for name, parts in offsets.items()},
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
