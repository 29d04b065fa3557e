"""GMIC's convolution layers one at a time: oneDNN (NCHW and channels-last) against NNPACK's fast algorithms.

    python benchmarks/bench_conv_layers.py [--repeats 11] [--json out.json]

For each 3x3 stride-1 layer shape of GMIC-ResNet-18 at 2944x1920 (global network stages 1-5, local network
layers 1-4 on six 256x256 patches) and the global 7x7/2 stem on one input band: milliseconds (median), GFLOP/s,
and the largest absolute error against a float64 convolution on the same data (inputs N(0,1), weights scaled so
outputs are O(1), like GMIC's activations). NNPACK (bundled with PyTorch's CPU build) uses Winograd/FFT
algorithms for 3x3 kernels, so it does fewer operations; the point of running it is to see whether that beats
oneDNN's direct convolution here, and at what accuracy (the fixtures allow 1e-5 on ``h_g``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from _timing import median_seconds

# (batch, channels, height, width) of GMIC's 3x3 stride-1 convolutions at 2944x1920, K=6.
LAYERS = [
    ("global stage 1", (1, 16, 735, 479)),
    ("global stage 2", (1, 32, 368, 240)),
    ("global stage 3", (1, 64, 184, 120)),
    ("global stage 4", (1, 128, 92, 60)),
    ("global stage 5", (1, 256, 46, 30)),
    ("local layer 1", (6, 64, 64, 64)),
    ("local layer 2", (6, 128, 32, 32)),
    ("local layer 3", (6, 256, 16, 16)),
    ("local layer 4", (6, 512, 8, 8)),
]


def run(repeats: int) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    rows = []
    for name, (n, c, h, w) in LAYERS:
        x = torch.randn(n, c, h, w)
        weight = torch.randn(c, c, 3, 3) / (3 * c**0.5)
        bias = torch.zeros(c)
        ref = F.conv2d(x.double(), weight.double(), padding=1)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        w_cl = weight.contiguous(memory_format=torch.channels_last)
        gflop = 2 * n * h * w * c * c * 9 / 1e9
        row: dict[str, Any] = {"layer": name, "shape": [n, c, h, w], "gflop": round(gflop, 3)}
        candidates = {
            "onednn_nchw": lambda: F.conv2d(x, weight, padding=1),  # noqa: B023
            "onednn_cl": lambda: F.conv2d(x_cl, w_cl, padding=1),  # noqa: B023
            "nnpack": lambda: torch._nnpack_spatial_convolution(x, weight, bias, [1, 1]),  # noqa: B023
        }
        for key, fn in candidates.items():
            if key == "nnpack" and not torch._nnpack_available():
                continue
            ms = median_seconds(fn, repeats) * 1e3
            err = (fn().double() - ref).abs().max().item()
            row[key] = {
                "ms": round(ms, 2),
                "gflops": round(gflop / ms * 1e3, 1),
                "max_abs_err": float(f"{err:.2e}"),
            }
        rows.append(row)
    # The global stem: 1 -> 16 channels, 7x7, stride 2, on one band of the banded stem (391 input rows).
    band = torch.randn(1, 1, 391, 1920)
    stem = torch.nn.Conv2d(1, 16, 7, 2, bias=False).to(memory_format=torch.channels_last).weight.detach()
    out_h, out_w = (391 - 7) // 2 + 1, (1920 + 6 - 7) // 2 + 1
    gflop = 2 * out_h * out_w * 16 * 49 / 1e9
    ms = median_seconds(lambda: F.conv2d(band, stem, None, 2, (0, 3)), repeats) * 1e3
    rows.append(
        {
            "layer": "global stem band (7x7/2)",
            "shape": [1, 1, 391, 1920],
            "gflop": round(gflop, 3),
            "onednn_cl": {"ms": round(ms, 2), "gflops": round(gflop / ms * 1e3, 1)},
        }
    )
    return rows


def _cell(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    return f"{v['ms']:.1f} ({v['gflops']:.0f})" if v else ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--json", help="also write the rows as JSON to this path")
    args = p.parse_args()
    import torch

    rows = run(args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        "| layer | shape | GFLOP | oneDNN NCHW ms (GFLOP/s) | oneDNN channels-last ms (GFLOP/s) | NNPACK ms (GFLOP/s) | NNPACK max abs error | oneDNN max abs error |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        nnp_err = r["nnpack"]["max_abs_err"] if "nnpack" in r else ""
        dnn_err = r["onednn_cl"].get("max_abs_err", "")
        print(
            f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['gflop']:.2f} | {_cell(r, 'onednn_nchw')} "
            f"| {_cell(r, 'onednn_cl')} | {_cell(r, 'nnpack')} | {nnp_err} | {dnn_err} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
