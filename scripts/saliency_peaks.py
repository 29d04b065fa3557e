"""Where a trained model's malignant saliency peaks lie on the grid, over a split's first images.

    python scripts/saliency_peaks.py RUN_DIR [--model best_model.safetensors] [--split test] [--limit 160]

Prints the eight most frequent peak cells ``((row, col), count)`` and the mean peak value. A model whose global
path has locked onto an image corner (docs/localization.md, "Maps stuck on a corner") puts nearly every peak on
a few border cells, whatever the image holds.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch
import yaml

from mammogmic.models.checkpoint import load_model
from mammogmic.training.config import TrainConfig
from mammogmic.training.data import split_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="run folder holding config.yaml and the model")
    parser.add_argument("--model", default="best_model.safetensors", help="model file inside RUN")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=160, help="first N images of the split")
    args = parser.parse_args(argv)

    config = TrainConfig.from_dict(yaml.safe_load((args.run / "config.yaml").read_text()))
    images = split_dataset(config, args.split, masks=False)
    model = load_model(args.run / args.model).eval()
    counts: collections.Counter[tuple[int, int]] = collections.Counter()
    peaks: list[float] = []
    n = min(len(images), args.limit)
    with torch.no_grad():
        for start in range(0, n, 16):
            x = torch.stack([images.load(i)["image"] for i in range(start, min(start + 16, n))])
            malignant = model.forward_global(x)[1][:, 1]
            width, maps = malignant.shape[-1], malignant.flatten(1)
            for index, value in zip(maps.argmax(1).tolist(), maps.amax(1).tolist(), strict=True):
                counts[(index // width, index % width)] += 1
                peaks.append(value)
    print(counts.most_common(8), f"mean peak {sum(peaks) / max(1, len(peaks)):.3f} over {len(peaks)} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
