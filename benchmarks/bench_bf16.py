"""The bf16 inference and training paths against the plain float32 model, in one alternated run.

    python benchmarks/bench_bf16.py                  # 3 rounds x 5 passes, markdown table on stdout
    python benchmarks/bench_bf16.py --rounds 5 --json bf16.json

The first row is the stand-in for the official GMIC release (not part of this repository, and it imports
torchvision, which does not install beside this CPU torch build): our plain model (NCHW, BatchNorms unfused, float32, glibc's own allocator) runs the official sequence of operations
(equal outputs to float32 rounding, tests/models/test_conformance.py). Then what ``mammogmic predict`` runs:
float32 (BN folded, channels-last, lean allocator), bf16 autocast on that model and ``--amp bf16`` (bf16
backbone weights cast once, :func:`mammogmic.models.cast_for_bf16`), each with both allocator profiles, and
``--amp bf16`` on 4 KiB pages, then as it runs by default (fast profile on 4 KiB pages, the heap kept once the
model is prepared: ``mammogmic.runtime.default_allocator``), and
with ``--jemalloc`` float32 (``predict``'s float32 default where jemalloc is installed) and ``--amp bf16`` under
``mammogmic --allocator jemalloc``; then
one training step at batch 1 (float32, and bf16 autocast as ``mammogmic train`` runs it with
``runtime.amp: bf16``, channels-last, fast allocator). Each configuration is its own process, which runs
``--warmup`` untimed passes (3: the first two bf16 passes are 10-40% slower than the rest) and ``--repeats``
timed ones; the list runs ``--rounds`` times in turn, and a row gives the median over rounds of each process's
median time per image, its ratio to the first row of its mode, and the largest peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_model import measure, print_table


def _spec(
    mode: str,
    dtype: str,
    fast_layout: bool,
    tune: bool,
    repeats: int,
    warmup: int,
    thp: bool = True,
    jemalloc: bool = False,
    keep_heap: bool = False,
) -> dict[str, object]:
    return {
        "model_name": "gmic",
        "mode": mode,
        "batch": 1,
        "dtype": dtype,
        "channels_last": fast_layout,
        "repeats": repeats,
        "warmup": warmup,
        "thp": thp,
        "tune": tune,
        "fuse": fast_layout and mode == "infer",
        "jemalloc": jemalloc,
        "keep_heap": keep_heap,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds (3)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per process (5)")
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed passes first (3): the bf16 path takes two or three passes to reach its steady speed",
    )
    p.add_argument("--no-train", action="store_true", help="inference rows only")
    p.add_argument(
        "--jemalloc",
        action="store_true",
        help="also the inference rows under `mammogmic --allocator jemalloc` (needs the system's jemalloc; "
        "float32 predict's default where it is installed)",
    )
    p.add_argument("--json", help="also write the rows as JSON to this path")
    args = p.parse_args()
    r = (args.repeats, args.warmup)
    infer = [
        _spec("infer", "fp32", False, False, *r),  # the official stand-in
        _spec("infer", "fp32", True, True, *r),  # predict's float32 default without jemalloc (lean)
        _spec("infer", "bf16", True, True, *r),  # autocast
        _spec("infer", "bf16", True, False, *r),  # ... with mammogmic --allocator fast
        _spec("infer", "bf16-cast", True, True, *r),  # mammogmic --allocator lean predict --amp bf16
        _spec("infer", "bf16-cast", True, False, *r),  # mammogmic --allocator fast predict --amp bf16
        _spec("infer", "bf16-cast", True, False, *r, thp=False),  # ... on 4 KiB pages
        # predict --amp bf16 as it comes: fast on 4 KiB pages, the heap kept once the model is prepared
        # (mammogmic.runtime.default_allocator)
        _spec("infer", "bf16-cast", True, False, *r, thp=False, keep_heap=True),
    ]
    if args.jemalloc:  # mammogmic --allocator jemalloc predict [--amp bf16]
        infer += [
            _spec("infer", "fp32", True, False, *r, jemalloc=True),  # predict's float32 default with it
            _spec("infer", "bf16-cast", True, False, *r, jemalloc=True),
        ]
    rows = measure(infer, args.rounds)
    if not args.no_train:
        train = [
            _spec("train", "fp32", False, False, *r),  # the official stand-in
            _spec("train", "fp32", True, False, *r),
            _spec("train", "bf16", True, False, *r),
        ]
        rows += measure(train, args.rounds)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
