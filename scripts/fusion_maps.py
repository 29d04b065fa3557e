"""Does the fusion head's own class-activation map find the lesions where a run's saliency maps do not?
(docs/localization.md, "The fusion head's own maps").

    python scripts/fusion_maps.py RUN_DIR [--model best_dice_model.safetensors] [--split test]

The fusion head reads the global features ``h_g`` pooled over the cells; its weights for them, applied to each
cell's features, give a class-activation map (CAM) of the evidence it reads. This script compares, on the split's
images with a lesion of the class, the run's plain saliency maps (one orientation, the network's own grid) with
the CAM of all the fusion weights and of their positive part, each scaled to [0, 1] per image (so that Dice at
0.5 measures where a map is, not how high), and reports the cosine between the saliency head's and the fusion
head's weights. For ``saliency_head: fusion`` the saliency maps are the sigmoid of the CAM (cosine 1). Also the
AUROC of each map's maximum between the images with a lesion of the class and those labelled without any
finding: whether the map separates them, wherever it lies. Prints one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import numpy as np
import torch
from saliency_offsets import load_run, run_parser
from sklearn.metrics import roc_auc_score

from mammogmic.evaluation.localization import dice_scores

CLASSES = ("benign", "malignant")


def scaled(maps: torch.Tensor) -> torch.Tensor:
    """Each ``(h, w)`` map moved and scaled to span [0, 1]."""
    low = maps.flatten(2).amin(2)[..., None, None]
    span = (maps.flatten(2).amax(2)[..., None, None] - low).clamp_min(1e-12)
    return (maps - low) / span


def main(argv: list[str] | None = None) -> int:
    parser = run_parser(__doc__)
    parser.set_defaults(split="test")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    images, model = load_run(args, masks=True)
    model.config = dataclasses.replace(model.config, saliency_symmetry="none", saliency_grid="native")
    dim = model.config.global_dim
    fusion_w = model.fusion.weight[:, :dim].detach()
    head_w = model.saliency_head.weight[:, :, 0, 0].detach()
    cams = {"fusion": fusion_w, "fusion_positive": fusion_w.clamp_min(0)}
    items = images.items
    normal = [i for i, it in enumerate(items) if it.benign_label == 0 and it.malignant_label == 0]
    report: dict[str, object] = {
        "run": str(args.run),
        "model": args.model,
        "split": args.split,
        "saliency_head": model.config.saliency_head,
        "normal_images": len(normal),
    }
    for c, name in enumerate(CLASSES):
        lesion = [i for i, it in enumerate(items) if getattr(it, f"{name}_label") == 1]
        maps: dict[str, list[torch.Tensor]] = {"saliency": [], **{k: [] for k in cams}}
        peaks: dict[str, list[torch.Tensor]] = {k: [] for k in maps}
        masks = []
        with torch.no_grad():
            for chunk, keep in ((lesion, True), (normal, False)):
                for s in range(0, len(chunk), args.batch_size):
                    batch = [images.load(i) for i in chunk[s : s + args.batch_size]]
                    h_g, saliency, _ = model.forward_global(torch.stack([b["image"] for b in batch]))
                    found = {"saliency": saliency[:, c]}
                    for k, w in cams.items():
                        found[k] = torch.einsum("d,ndhw->nhw", w[c], h_g)
                    for k, m in found.items():
                        peaks[k].append(m.flatten(1).amax(1))
                        if keep:
                            maps[k].append(m)
                    if keep:
                        masks.append(torch.stack([b["masks"][c] for b in batch]))
        entry: dict[str, object] = {
            "images": len(lesion),
            "cosine_saliency_head_fusion": float(torch.cosine_similarity(head_w[c], fusion_w[c], dim=0)),
        }
        if lesion:
            mask = torch.cat(masks)[:, None]
            labels = [1] * len(lesion) + [0] * len(normal)
            for k in maps:
                dice = dice_scores(scaled(torch.cat(maps[k])[:, None]), mask, upsample="aligned").hard[:, 0]
                auroc = float(roc_auc_score(labels, torch.cat(peaks[k]).numpy())) if normal else math.nan
                entry[k] = {"scaled_dice": float(np.nanmean(dice)), "auroc_of_maximum": auroc}
        report[name] = entry
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
