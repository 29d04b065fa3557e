"""Full heat-map conformance and speed: DMV-CNN's patch classifier on the six fixture images.

Makes the benign and malignant heat maps of all six images of ``../shared/fixtures/official_gmic`` with the
official fixture patch classifier, in the official order (exam by exam, L-CC, R-CC, L-MLO, R-MLO; one
``random.Random(0)`` for the run), and compares each with the official maps (``official_dmv/heatmaps_seed0.npz``,
tolerance 1e-5 max abs). Prints one line per image (patches, seconds, patches/s, max abs difference) and writes
JSON. Too slow for CI on 2 cores (about 2,400 DenseNet-121 passes); the test suite checks the corners of each
map instead (``tests/models/test_dmv_conformance.py``).

    python benchmarks/bench_heatmaps.py [--batch-size 64] [--amp none|bf16] [--channels-last] [--threads N]
        [--images 0_L-CC 2_L_CC] [--json bench_heatmaps.json]

``--images`` runs a subset but still draws the grids of all six, so the maps stay comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mammogmic.data.io import read_image
from mammogmic.evaluation.heatmaps import patch_grid, produce_heatmaps
from mammogmic.models import load_official_patch_classifier

REPO = Path(__file__).resolve().parents[1]
GMIC = REPO / ".." / "shared" / "fixtures" / "official_gmic"
DMV = REPO / ".." / "shared" / "fixtures" / "official_dmv"
ORDER = ("0_L-CC", "0_R-CC", "0_L-MLO", "0_R-MLO", "1_R_CC", "2_L_CC")  # the official run's order


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--images", nargs="*", default=list(ORDER), choices=ORDER)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = json.loads((GMIC / "metadata.json").read_text())["images"]
    reference = np.load(DMV / "heatmaps_seed0.npz")
    model = load_official_patch_classifier(DMV / "dmv_patch_densenet121_seed0.p")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    rng = random.Random(0)
    rows = []
    worst = 0.0
    for name in ORDER:
        info = meta[name]
        cropped, _ = read_image(GMIC / info["cropped_png"])
        if name not in args.images:
            patch_grid(cropped.shape, rng)  # keep the draws of the later images
            continue
        start, cpu = time.perf_counter(), time.process_time()
        maps = produce_heatmaps(model, cropped, info["view"], rng, batch_size=args.batch_size, amp=args.amp)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        n = maps.grid.shape[0] * maps.grid.shape[1]
        diff = max(
            float(np.abs(maps.benign - reference[f"{name}__benign"]).max()),
            float(np.abs(maps.malignant - reference[f"{name}__malignant"]).max()),
        )
        worst = max(worst, diff)
        row = {
            "image": name,
            "shape": list(cropped.shape),
            "patches": n,
            "seconds": round(seconds, 2),
            "patches_per_s": round(n / seconds, 2),
            "cpu_seconds_per_patch": round(cpu / n, 3),
            "load_avg_1min": round(os.getloadavg()[0], 1),
            "max_abs_diff": diff,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "images": rows,
        "max_abs_diff": worst,
        "within_1e-5": worst <= 1e-5,
        "settings": vars(args) | {"json": str(args.json) if args.json else None},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "images"}))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if args.amp == "bf16" or worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
