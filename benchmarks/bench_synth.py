"""Benchmark of the synthetic-data generator: images per second at a given size and worker count.

Usage::

    python benchmarks/bench_synth.py --exams 250 --image-size 3328 2560 -j 2      # 1,000 full-size images
    python benchmarks/bench_synth.py --exams 50 --image-size 736 480 -j 2 --profile

Prints one JSON line: size, exams, images, workers, wall seconds, images per second, CPU seconds (this
process and its workers; unlike wall time, not inflated by other jobs on the machine), MB written,
the 1-minute load average, and with --profile the render/PNG-write time per image in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def _stage_profile(size: tuple[int, int]) -> dict[str, float]:
    from mammogmic.data.synth import SynthConfig, generate_exam
    from mammogmic.data.synth.dataset import _write_png

    cfg = SynthConfig()
    generate_exam(0, size, cfg)  # warm-up
    t0 = time.perf_counter()
    views = generate_exam(1, size, cfg)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for view, image, masks, _ in views:
            _write_png(Path(tmp) / f"{view}.png", image, 1)
            for cls, m in masks.items():
                _write_png(Path(tmp) / f"{view}_{cls}.png", m, 1)
    t2 = time.perf_counter()
    return {"render_s_per_image": round((t1 - t0) / 4, 4), "png_write_s_per_image": round((t2 - t1) / 4, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exams", type=int, default=25)
    parser.add_argument("--image-size", type=int, nargs=2, default=(3328, 2560), metavar=("H", "W"))
    parser.add_argument("-j", "--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dicom", action="store_true")
    parser.add_argument("--out", type=Path, help="keep the data here (default: a temporary folder, deleted)")
    parser.add_argument("--profile", action="store_true", help="also time render vs PNG write for one exam")
    args = parser.parse_args()

    from mammogmic.data.synth import SynthConfig, generate_dataset

    size = (args.image_size[0], args.image_size[1])
    tmp = None if args.out else tempfile.mkdtemp(prefix="bench_synth_")
    out = args.out or Path(tmp or ".") / "set"
    try:
        c0 = os.times()
        t0 = time.perf_counter()
        generate_dataset(out, args.exams, size, args.seed, SynthConfig(), args.workers, dicom=args.dicom)
        seconds = time.perf_counter() - t0
        c1 = os.times()
        # CPU seconds of this process and its (finished) workers: robust to other load on the machine
        cpu = (c1.user - c0.user) + (c1.system - c0.system)
        cpu += (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
        written = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
        result: dict[str, object] = {
            "size": list(size),
            "exams": args.exams,
            "images": 4 * args.exams,
            "workers": args.workers,
            "dicom": args.dicom,
            "seconds": round(seconds, 2),
            "images_per_second": round(4 * args.exams / seconds, 3),
            "cpu_seconds": round(cpu, 2),
            "cpu_seconds_per_image": round(cpu / (4 * args.exams), 4),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "mb_written": round(written / 1e6, 1),
            "cpu_count": os.cpu_count(),
        }
        if args.profile:
            result.update(_stage_profile(size))
        print(json.dumps(result))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
