"""Speed and peak memory of GMIC vs the ResNet-34 baseline on one full-size (2944x1920) input, on CPU.

Each configuration runs in its own process so that peak RSS (``ru_maxrss``) belongs to it alone.

    python benchmarks/bench_model.py                      # the default matrix, markdown table on stdout
    python benchmarks/bench_model.py --models gmic --modes infer --batches 1 --repeats 5
    python benchmarks/bench_model.py --json results.json
    python benchmarks/bench_model.py --roofline            # GFLOP per image and this CPU's GEMM peak

Columns: seconds per image (median over repeats, after ``--warmup`` untimed passes, one by default), per-stage
seconds per image for GMIC (global network + saliency + top-t, retrieve_roi, crop gather, local network,
attention + fusion; from a separate staged pass, so they need not add up exactly), and the process's peak RSS
in MiB. ``--compile yes`` (inference only) runs :func:`mammogmic.models.compile_for_inference`; its warm-up call
is the compilation, reported as ``compile_s``, and it has no stage breakdown (the staged pass would run the eager
modules).

``--roofline`` prints the arithmetic lower bound instead: the model's floating-point operations per image
(``torch.utils.flop_counter``; convolutions are >99.9% of them) divided by the throughput of a large matrix
multiply measured in the same process with the same threads, the best rate this CPU sustains on this work.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from _timing import median_seconds


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
    compile: bool = False,
    mmap_threshold_mib: float = 1.0,
    warmup: int = 1,
    thp: bool = True,
    jemalloc: bool = False,
    keep_heap: bool = False,
) -> dict[str, Any]:
    import torch

    from mammogmic.runtime import allocator_in_use, keep_freed_heap, tune_allocator

    # What the mammogmic command-line tools do: huge pages always; "lean" also fixes glibc's mmap threshold.
    if not thp:  # glibc as it comes: tune_allocator leaves a THP_MEM_ALLOC_ENABLE it finds set
        os.environ["THP_MEM_ALLOC_ENABLE"] = "0"
    if jemalloc:  # `mammogmic --allocator jemalloc`: measure() started this process with jemalloc preloaded
        if allocator_in_use() != "jemalloc":
            raise SystemExit("jemalloc was asked for but is not loaded")
        tune_allocator("jemalloc")
    else:
        tune_allocator("lean" if tune else "fast", int(mmap_threshold_mib * 2**20))

    torch.manual_seed(0)
    model = _build(model_name)
    if dtype == "fp32" and not (channels_last or fuse or compile):
        # The stand-in for the official release (the first row of bench_bf16.py's tables) pools with ATen's
        # kernel, as the release does; the library's models pool with MaxPool3x3s2 (same values).
        from mammogmic.models.resnet import with_aten_max_pools

        model = with_aten_max_pools(model)
    x = torch.randn(batch, 1, 2944, 1920)
    channels_last = channels_last or fuse  # predict's fused model is always channels-last
    if fuse or compile or dtype == "bf16-cast":
        # Exactly what `predict` runs (fused implies channels-last there); bf16-cast is `predict --amp bf16`:
        # bf16 backbone weights cast once, no autocast.
        from mammogmic.models import prepare_for_inference

        model = prepare_for_inference(model, fuse=fuse, bf16=dtype == "bf16-cast", compile=compile)
        x = x.contiguous(memory_format=torch.channels_last)
    elif channels_last:
        model = model.to(memory_format=torch.channels_last)
    if keep_heap and not keep_freed_heap():  # once the model is prepared, as `predict` does
        raise SystemExit("keep_heap: glibc's mallopt is not available here")
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
    t = time.perf_counter()
    step()  # warm-up (and, with compile, the compilation)
    compile_s = time.perf_counter() - t
    for _ in range(warmup - 1):  # oneDNN and the allocator settle over the first few passes
        step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    if model_name == "gmic" and mode == "infer" and not compile:
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
        "allocator": "jemalloc"
        if jemalloc
        else ("lean" if tune else "fast")
        + ("" if thp else ", 4 KiB pages")
        + (", heap kept" if keep_heap else ""),
        "mmap_threshold_mib": mmap_threshold_mib if tune else None,
        "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        "fused": fuse,
        "compiled": compile,
        "compile_s": round(compile_s, 1) if compile else None,
        "warmup": warmup,
        "seconds_min": round(min(times) / batch, 4),
        "torch": torch.__version__,
    }


def roofline() -> dict[str, Any]:
    """GFLOP per image (inference; training step = forward + backward) and the best rate this CPU reaches."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    rates: dict[str, dict[str, float]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        key = "fp32" if dtype == torch.float32 else "bf16"
        a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
        # One of GMIC's own layers (global stage 4: 128 -> 128 channels, 3x3, 92x60), channels-last.
        x = torch.randn(1, 128, 92, 60, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(128, 128, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
        conv_flop = 2 * 92 * 60 * 128 * 128 * 9
        rates[key] = {
            "gemm_4096": 2 * 4096**3 / median_seconds(lambda: a @ b) / 1e9,  # noqa: B023
            "conv3x3_128": conv_flop / median_seconds(lambda: torch.conv2d(x, w, padding=1), 21) / 1e9,  # noqa: B023
        }
    peak = {k: max(v.values()) for k, v in rates.items()}
    rows = {}
    x = torch.randn(1, 1, 2944, 1920)
    for name in ("gmic", "resnet34"):
        model = _build(name)
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            model.eval()(x)
        infer = counter.get_total_flops() / 1e9
        counter = FlopCounterMode(display=False)
        with counter:
            out = model.train()(x)
            (out.y_fusion.sum() + (out.y_global.sum() if name == "gmic" else 0)).backward()
        train = counter.get_total_flops() / 1e9
        rows[name] = {
            "infer_gflop": round(infer, 2),
            "train_gflop": round(train, 2),
            "infer_bound_s": {k: round(infer / v, 3) for k, v in peak.items()},
            "train_bound_s": {k: round(train / v, 3) for k, v in peak.items()},
        }
    return {
        "threads": torch.get_num_threads(),
        "gflops_measured": {k: {n: round(r, 1) for n, r in v.items()} for k, v in rates.items()},
        "gflops_peak_used": {k: round(v, 1) for k, v in peak.items()},
        "models": rows,
        "torch": torch.__version__,
    }


def measure(specs: list[dict[str, Any]], rounds: int = 1) -> list[dict[str, Any]]:
    """Run each configuration in its own process, the whole list ``rounds`` times in turn (so that slow
    phases of a shared machine fall on every row alike); one row per configuration, ``ratio_to_first`` its
    time over the first row's."""
    runs: list[list[dict[str, Any]]] = [[] for _ in specs]
    for _ in range(rounds):
        for spec, done in zip(specs, runs, strict=True):
            env = dict(os.environ)
            if spec.get("jemalloc"):  # as mammogmic.runtime.ensure_jemalloc restarts a command
                from mammogmic.runtime import JEMALLOC_CONF, jemalloc_library

                env["LD_PRELOAD"] = jemalloc_library() or "libjemalloc.so.2"
                env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
            res = subprocess.run(
                [sys.executable, __file__, "--single", json.dumps(spec)],
                capture_output=True,
                text=True,
                env=env,
            )
            if res.returncode != 0:
                print(f"failed: {spec}: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            done.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(done[-1]), file=sys.stderr, flush=True)
    rows = [_over_rounds(done) for done in runs if done]
    for r in rows:
        r["ratio_to_first"] = round(r["seconds_per_image"] / rows[0]["seconds_per_image"], 3)
        r["rss_ratio_to_first"] = round(r["peak_rss_mib"] / rows[0]["peak_rss_mib"], 3)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "| model | mode | batch | dtype | channels-last | fused | compiled | allocator | s/image (median) "
        "| s/image (min) | time ratio to first row | peak RSS MiB (ratio) | stages s/image (global, retrieve, "
        "crops, local, attn+fusion) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        st = r["stages_per_image"]
        stages = ", ".join(f"{st[k]:.3f}" for k in st) if st else ""
        print(
            f"| {r['model']} | {r['mode']} | {r['batch']} | {r['dtype']} | {'yes' if r['channels_last'] else 'no'} "
            f"| {'yes' if r['fused'] else 'no'} | {'yes' if r['compiled'] else 'no'} | {r['allocator']} "
            f"| {r['seconds_per_image']:.3f} | {r['seconds_min']:.3f} | {r['ratio_to_first']:.2f} "
            f"| {r['peak_rss_mib']:.0f} ({r['rss_ratio_to_first']:.2f}) | {stages} |"
        )


def _over_rounds(done: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's processes in one row: the median of their medians, the minimum of their minima,
    the largest peak RSS; the rest from the first process."""
    row = dict(done[0])
    row["seconds_per_image"] = round(statistics.median(r["seconds_per_image"] for r in done), 4)
    row["seconds_min"] = min(r["seconds_min"] for r in done)
    row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in done)
    row["processes"] = len(done)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gmic", "resnet34"], choices=["gmic", "resnet34"])
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["fp32", "bf16"],
        choices=["fp32", "bf16", "bf16-cast"],
        help="bf16: autocast; bf16-cast: bf16 backbone weights, no autocast (what predict --amp bf16 runs; inference)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole list of configurations this many times in turn (alternated processes); a row "
        "reports the median over rounds of each process's median, and its ratio to the first row",
    )
    p.add_argument("--channels-last", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed passes before the timed ones (1)")
    p.add_argument(
        "--fuse", nargs="+", default=["no"], choices=["no", "yes"], help="BN folding (inference only)"
    )
    p.add_argument(
        "--no-tune-allocator",
        action="store_true",
        help="allocator profile 'fast' (glibc's own mmap threshold) instead of 'lean' (see mammogmic.runtime)",
    )
    p.add_argument(
        "--mmap-threshold-mib", type=float, default=1.0, help="glibc mmap threshold when tuned (1)"
    )
    p.add_argument(
        "--skip-baseline-batch4",
        action="store_true",
        default=True,
        help="skip ResNet-34 at batch 4 (several GiB; default on)",
    )
    p.add_argument(
        "--compile",
        nargs="+",
        default=["no"],
        choices=["no", "yes"],
        help="TorchInductor compilation (inference only; needs g++)",
    )
    p.add_argument("--roofline", action="store_true", help="print GFLOP per image and the GEMM-bound seconds")
    p.add_argument("--json", help="also write the rows as JSON to this path")
    p.add_argument("--single", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        spec = json.loads(args.single)
        print(json.dumps(run_single(**spec)))
        return 0
    if args.roofline:
        print(json.dumps(roofline(), indent=2))
        return 0
    specs = []
    for model, mode, batch, dtype, cl, fuse, comp in itertools.product(
        args.models, args.modes, args.batches, args.dtypes, args.channels_last, args.fuse, args.compile
    ):
        if (fuse == "yes" or comp == "yes" or dtype == "bf16-cast") and mode == "train":
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
            "compile": comp == "yes",
            "mmap_threshold_mib": args.mmap_threshold_mib,
            "warmup": args.warmup,
        }
        specs.append(spec)
    rows = measure(specs, args.rounds)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
