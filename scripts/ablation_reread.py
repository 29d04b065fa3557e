"""Score a finished ablation study again with other inference-only settings, no training (docs/ablations.md).

    python scripts/ablation_reread.py STUDY_DIR OUT_DIR [--symmetry S] [--grid G]

STUDY_DIR is a ``mammogmic ablate`` output folder. Every evaluated run is read again, its ``best_model`` and
``best_dice_model`` files as the study selected them, with ``saliency_symmetry`` / ``saliency_grid`` set (by
default to what the demo reads now), and OUT_DIR gets the table, CSVs, picture and per-run results that
``mammogmic ablate`` writes, each row's minutes being the study's. The study is only read. Prints one line per run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mammogmic.models.config import INFERENCE_SETTINGS, SALIENCY_GRIDS, SYMMETRIES
from mammogmic.training.ablate import describe_row, reread_ablations
from mammogmic.training.demo import demo_train_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("study", type=Path, help="output folder of `mammogmic ablate`")
    parser.add_argument("out", type=Path, help="folder for the re-read table (not the study)")
    demo = demo_train_config("manifest.csv").model  # only its inference settings are read
    parser.add_argument("--symmetry", choices=SYMMETRIES, default=demo.saliency_symmetry)
    parser.add_argument("--grid", choices=SALIENCY_GRIDS, default=demo.saliency_grid)
    args = parser.parse_args(argv)
    inference = dict(zip(INFERENCE_SETTINGS, (args.symmetry, args.grid), strict=True))

    def show(name: str, row: dict[str, Any]) -> None:
        print(f"{name}: {describe_row(row)}")

    reread_ablations(args.study, args.out, inference, on_run=show)
    print(f"table: {args.out / 'ablations.md'} (read with {inference})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
