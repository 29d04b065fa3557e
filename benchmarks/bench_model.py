"""Speed and peak memory of GMIC vs the ResNet-34 baseline on one full-size (2944x1920) input, on CPU.

Each configuration runs in its own process so that peak RSS (``ru_maxrss``) belongs to it alone.

    python benchmarks/bench_model.py                      # the default matrix, markdown table on stdout
    python benchmarks/bench_model.py --models gmic --modes infer --batches 1 --repeats 5
    python benchmarks/bench_model.py --json results.json

Columns: seconds per image (median over repeats, after one warm-up), per-stage seconds per image for GMIC
(global network + saliency + top-t, retrieve_roi, crop gather, local network, attention + fusion; from a
separate staged pass, so they need not add up exactly), and the process's peak RSS in MiB.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(model_name: str):  # type: ignore[no-untyped-def]
    from mammogmic import GMIC, BaselineConfig, GMICConfig, ResNetBaseline

    if model_name == "gmic":
        return GMIC(GMICConfig())
    if model_name == "resnet34":
        return ResNetBaseline(BaselineConfig(arch="resnet34"))
    raise SystemExit(f"unknown model {model_name}")


def _staged_gmic(model: Any, x: Any) -> dict[str, float]:
    """Time each GMIC stage once (inference)."""
    import torch

    from mammogmic.models.roi import crop_patches

    times: dict[str, float] = {}
    t = time.perf_counter()
    h_g, saliency, _ = model.forward_global(x)
    times["global"] = time.perf_counter() - t
    t = time.perf_counter()
    loc = model.retrieve_rois(saliency, (x.shape[2], x.shape[3]))
    times["retrieve"] = time.perf_counter() - t
    t = time.perf_counter()
    patches = crop_patches(x, loc, model.config.crop_size)
    times["crops"] = time.perf_counter() - t
    t = time.perf_counter()
    h_crops = model.forward_local(patches)
    times["local"] = time.perf_counter() - t
    t = time.perf_counter()
    z, _ = model.attention(h_crops)
    torch.sigmoid(model.local_classifier(z))
    torch.sigmoid(model.fusion(torch.cat([h_g.flatten(2).amax(dim=2), z], dim=1)))
    times["attention_fusion"] = time.perf_counter() - t
    return times


def run_single(
    model_name: str,
    mode: str,
    batch: int,
    dtype: str,
    channels_last: bool,
    repeats: int,
    tune: bool = True,
    fuse: bool = False,
) -> dict[str, Any]:
    import torch

    from mammogmic.runtime import tune_allocator

    if tune:  # what the mammogmic command-line tools do
        tune_allocator()

    torch.manual_seed(0)
    model = _build(model_name)
    x = torch.randn(batch, 1, 2944, 1920)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if fuse:
        from mammogmic.models import fuse_for_inference

        model = fuse_for_inference(model)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    labels = torch.rand(batch, 2).round()
    stages: dict[str, float] = {}

    def step() -> None:
        if mode == "infer":
            with torch.inference_mode(), autocast:
                model(x)
        else:
            with autocast:
                out = model(x)
                pred = out.y_fusion
            loss = torch.nn.functional.binary_cross_entropy(pred.float().clamp(1e-6, 1 - 1e-6), labels)
            if model_name == "gmic":
                loss = loss + torch.nn.functional.binary_cross_entropy(
                    out.y_global.float().clamp(1e-6, 1 - 1e-6), labels
                )
            loss.backward()
            model.zero_grad(set_to_none=True)

    model.train(mode == "train")
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    if model_name == "gmic" and mode == "infer":
        with torch.inference_mode(), autocast:
            runs = [_staged_gmic(model, x) for _ in range(max(1, repeats // 2))]
        stages = {k: round(statistics.median(r[k] for r in runs) / batch, 4) for k in runs[0]}
    return {
        "model": model_name,
        "mode": mode,
        "batch": batch,
        "dtype": dtype,
        "channels_last": channels_last,
        "seconds_per_image": round(statistics.median(times) / batch, 4),
        "stages_per_image": stages,
        "peak_rss_mib": round(_peak_mib(), 1),
        "threads": torch.get_num_threads(),
        "allocator_tuned": tune,
        "fused": fuse,
        "torch": torch.__version__,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gmic", "resnet34"], choices=["gmic", "resnet34"])
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--channels-last", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--fuse", nargs="+", default=["no"], choices=["no", "yes"], help="BN folding (inference only)"
    )
    p.add_argument(
        "--no-tune-allocator",
        action="store_true",
        help="leave glibc malloc at its defaults (the CLI fixes the mmap threshold; see mammogmic.runtime)",
    )
    p.add_argument(
        "--skip-baseline-batch4",
        action="store_true",
        default=True,
        help="skip ResNet-34 at batch 4 (several GiB; default on)",
    )
    p.add_argument("--json", help="also write the rows as JSON to this path")
    p.add_argument("--single", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        spec = json.loads(args.single)
        print(json.dumps(run_single(**spec)))
        return 0
    rows = []
    for model, mode, batch, dtype, cl, fuse in itertools.product(
        args.models, args.modes, args.batches, args.dtypes, args.channels_last, args.fuse
    ):
        if fuse == "yes" and mode == "train":
            continue
        if model == "resnet34" and batch > 1 and args.skip_baseline_batch4:
            continue
        spec = {
            "model_name": model,
            "mode": mode,
            "batch": batch,
            "dtype": dtype,
            "channels_last": cl == "yes",
            "repeats": args.repeats,
            "tune": not args.no_tune_allocator,
            "fuse": fuse == "yes",
        }
        res = subprocess.run(
            [sys.executable, __file__, "--single", json.dumps(spec)], capture_output=True, text=True
        )
        if res.returncode != 0:
            print(f"failed: {spec}: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(
        "| model | mode | batch | dtype | channels-last | fused | s/image | peak RSS MiB | stages s/image (global, retrieve, crops, local, attn+fusion) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        st = r["stages_per_image"]
        stages = ", ".join(f"{st[k]:.3f}" for k in st) if st else ""
        print(
            f"| {r['model']} | {r['mode']} | {r['batch']} | {r['dtype']} | {'yes' if r['channels_last'] else 'no'} "
            f"| {'yes' if r['fused'] else 'no'} "
            f"| {r['seconds_per_image']:.3f} | {r['peak_rss_mib']:.0f} | {stages} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
