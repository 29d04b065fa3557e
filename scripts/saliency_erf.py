"""Where a trained model's saliency cells look: the centre of each cell's effective receptive field.

    python scripts/saliency_erf.py RUN_DIR [--model best_dice_model.safetensors] [--split val] [--images 40]

For a few interior cells of each image, the gradient of the cell's saliency logit with respect to the input
image; the centre of a cell's effective receptive field is the centroid of that gradient's magnitude. Prints
one JSON object with, per class, the median and mean offset (rows, cols) in pixels of that centroid from the
cell's nominal centre (``stride * index + cell_origin``: where docs/localization.md places the cell). No lesion
mask is read: this checks the cell -> pixel mapping of the trained network, not where its marks land.
"""

from __future__ import annotations

import json
import sys

import torch
from saliency_offsets import load_run, run_parser  # the sibling script (scripts/ is on sys.path)

from mammogmic.models.gmic import GMIC


def erf_offsets(model: GMIC, x: torch.Tensor, cells: list[tuple[int, int]]) -> torch.Tensor:
    """Offsets (classes, cells, 2) in pixels of each cell's gradient centroid from its nominal centre."""
    x = x.detach().clone().requires_grad_(True)
    logits = model.saliency_head(model.global_net(x))  # (1, C, h, w)
    stride, origin = model.global_net.stride, model.global_net.cell_origin
    rows = torch.arange(x.shape[-2], dtype=torch.float64)[:, None]
    cols = torch.arange(x.shape[-1], dtype=torch.float64)[None, :]
    out = torch.empty(logits.shape[1], len(cells), 2, dtype=torch.float64)
    for c in range(logits.shape[1]):
        for k, (i, j) in enumerate(cells):
            (grad,) = torch.autograd.grad(logits[0, c, i, j], x, retain_graph=True)
            weight = grad[0, 0].abs().double()
            weight = weight / weight.sum()
            out[c, k, 0] = (weight * rows).sum() - (stride * i + origin)
            out[c, k, 1] = (weight * cols).sum() - (stride * j + origin)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = run_parser(__doc__)
    parser.add_argument("--images", type=int, default=40, help="first N images of the split (40)")
    args = parser.parse_args(argv)
    images, model = load_run(args, masks=False)
    parts = []
    for index in range(min(args.images, len(images))):
        x = images.load(index)["image"][None]
        with torch.no_grad():  # the network's own cells (a model may read a finer grid at inference)
            h, w = model.global_net(x).shape[-2:]
        # interior cells, at least three cells from every edge where the grid allows
        cells = [(h // 2 - 3, w // 2 - 1), (h // 2, w // 2), (h // 2 + 3, w // 2 + 1), (h // 2, w // 2 - 2)]
        parts.append(erf_offsets(model, x, cells))
    offsets = torch.cat(parts, dim=1)  # (C, cells, 2)
    result = {
        "run": str(args.run),
        "model": args.model,
        "split": args.split,
        "cells": offsets.shape[1],
        "stride_px": model.global_net.stride,
        "offset_rows_cols_px": {
            name: {
                "median": offsets[c].median(dim=0).values.round(decimals=1).tolist(),
                "mean": offsets[c].mean(dim=0).round(decimals=1).tolist(),
            }
            for c, name in enumerate(("benign", "malignant"))
        },
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
