"""The GMIC paper's comparison on the demo's synthetic data: GMIC vs DMV-CNN (image-only and image + heat maps)
vs GMIC with heat-map channels vs the GMIC + DMV-CNN ensemble, test AUROC per breast with bootstrap CIs and
paired comparisons (``mammogmic evaluate``).

Every step is a ``mammogmic`` command (written to ``OUT/commands.sh`` as run); a step whose output exists is
skipped, so a rerun with the same arguments resumes::

    python benchmarks/dmv_comparison.py --out /tmp/cmp --exams 100 --epochs 4

Data and the GMIC run are the demo's (:func:`mammogmic.training.demo.demo_synth_config`,
:func:`~mammogmic.training.demo.demo_train_config`); the other models take the demo config's data, optimiser and
schedule settings with their own ``model`` section (DMV-CNN: 4 exams per batch, the same images per optimizer
step as GMIC's 16). Writes ``OUT/breasts.csv`` (one row per test breast, every model's scores),
``OUT/comparison_malignant.md`` / ``.json`` and ``OUT/comparison_benign.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

MODELS = ("gmic", "dmv_image", "dmv_heatmaps", "gmic_heatmaps", "gmic+dmv_image")
PATCH_MODEL = {"type": "patch", "growth_rate": 8, "block_config": [2, 2, 2], "num_init_features": 16}


def _run(out: Path, args: list[str], done: Path) -> None:
    """Run ``mammogmic ARGS`` unless ``done`` exists; log the command and its time."""
    line = "mammogmic " + " ".join(shlex.quote(a) for a in args)
    if done.exists():
        print(f"skip (done): {line}", flush=True)
        return
    with open(out / "commands.sh", "a") as fh:
        fh.write(line + "\n")
    print(f"run: {line}", flush=True)
    start = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", "mammogmic.cli.main", *args])
    seconds = time.perf_counter() - start
    with open(out / "timings.json", "a") as fh:
        fh.write(json.dumps({"command": line, "exit": code, "seconds": round(seconds, 1)}) + "\n")
    if code not in (0, 1) or not done.exists():  # 1: some images failed (listed in errors.csv)
        raise SystemExit(f"failed ({code}): {line}")


def _configs(manifest: Path, args: argparse.Namespace, maps: Path) -> dict[str, dict[str, Any]]:
    from mammogmic.training.demo import DemoSettings, demo_train_config

    settings = DemoSettings(n_exams=args.exams, epochs=args.epochs, seed=args.seed)
    gmic = demo_train_config(manifest, settings).to_dict()
    # the other models: the demo's data/optim/schedule without GMIC's saliency Dice selection
    base = json.loads(json.dumps(gmic))
    base["schedule"].update(keep_best_dice=False, dice_upsample="nearest")
    dmv = json.loads(json.dumps(base))
    dmv["model"] = {"type": "dmv"}
    dmv["data"]["batch_size"] = max(1, gmic["data"]["batch_size"] // 4)  # 4 views per exam
    dmv["data"]["eval_batch_size"] = max(1, gmic["data"]["eval_batch_size"] // 4)
    dmv_heat = json.loads(json.dumps(dmv))
    dmv_heat["model"]["in_channels"] = 3
    dmv_heat["data"]["heatmaps_dir"] = str(maps)
    gmic_heat = json.loads(json.dumps(gmic))
    gmic_heat["model"]["in_channels"] = 3
    gmic_heat["data"]["heatmaps_dir"] = str(maps)
    patch = json.loads(json.dumps(base))
    patch["model"] = dict(PATCH_MODEL)
    patch["patches"] = {"size": args.patch_size, "stride": args.patch_stride, "per_class": 2}
    patch["schedule"]["epochs"] = args.patch_epochs
    patch["data"]["batch_size"] = 32
    patch["data"]["eval_batch_size"] = 64
    return {
        "gmic": gmic,
        "patch": patch,
        "dmv_image": dmv,
        "dmv_heatmaps": dmv_heat,
        "gmic_heatmaps": gmic_heat,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--exams", type=int, default=600, help="synthetic exams (demo: 600)")
    p.add_argument("--epochs", type=int, default=12, help="epochs of GMIC and DMV-CNN (demo: 12)")
    p.add_argument("--patch-epochs", type=int, default=3, help="epochs of the patch classifier")
    p.add_argument("--patch-size", type=int, default=64, help="patch side at 512x320 (256 at full size)")
    p.add_argument("--patch-stride", type=int, default=32, help="heat-map stride (70 at full size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="data-generation processes")
    p.add_argument("--bootstrap", type=int, default=2000)
    args = p.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    from mammogmic.data.synth.dataset import generate_dataset
    from mammogmic.training.demo import DemoSettings, demo_synth_config

    data = out / "data"
    manifest = data / "manifest.csv"
    if not manifest.exists():
        start = time.perf_counter()
        generate_dataset(data, args.exams, DemoSettings().size, args.seed, demo_synth_config(), args.workers)
        print(f"data: {args.exams} exams in {time.perf_counter() - start:.0f} s", flush=True)
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    test_manifest = data / "test.csv"
    table[table["split"] == "test"].to_csv(test_manifest, index=False)

    maps = out / "heatmaps"
    configs = _configs(manifest, args, maps)
    (out / "configs").mkdir(exist_ok=True)
    for name, config in configs.items():
        (out / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    runs = out / "runs"

    def train(name: str) -> Path:
        run = runs / name
        _run(
            out,
            ["train", str(out / "configs" / f"{name}.yaml"), "--out", str(run), "--no-progress"],
            run / "result.json",
        )
        return run / "best_model.safetensors"

    model = {"gmic": train("gmic"), "patch": train("patch")}
    _run(
        out,
        [
            "heatmaps",
            "--manifest",
            str(manifest),
            "--model",
            str(model["patch"]),
            "--out",
            str(maps),
            "--no-progress",
        ],
        maps / "run.json",
    )
    for name in ("dmv_image", "dmv_heatmaps", "gmic_heatmaps"):
        model[name] = train(name)

    preds = out / "predictions"
    members = {
        "gmic": ["gmic"],
        "dmv_image": ["dmv_image"],
        "dmv_heatmaps": ["dmv_heatmaps"],
        "gmic_heatmaps": ["gmic_heatmaps"],
        "gmic+dmv_image": ["gmic", "dmv_image"],
    }
    for name in MODELS:
        cmd = ["predict", "--manifest", str(test_manifest), "--out", str(preds / name), "--no-progress"]
        for member in members[name]:
            cmd += ["--model", str(model[member])]
        if any(m.endswith("heatmaps") for m in members[name]):
            cmd += ["--heatmaps", str(maps)]
        _run(out, cmd, preds / name / "run.json")

    merged: pd.DataFrame | None = None
    for name in MODELS:
        breasts = pd.read_csv(preds / name / "breast_predictions.csv", dtype={"breast_id": str})
        keep = breasts.set_index("breast_id")[
            ["benign_pred", "malignant_pred", "benign_label", "malignant_label"]
        ]
        scores = keep[["benign_pred", "malignant_pred"]].rename(
            columns={"benign_pred": f"{name}_benign", "malignant_pred": f"{name}_malignant"}
        )
        merged = (
            keep[["benign_label", "malignant_label"]].join(scores) if merged is None else merged.join(scores)
        )
    assert merged is not None
    merged = merged.dropna(subset=[f"{n}_malignant" for n in MODELS])
    merged.reset_index().to_csv(out / "breasts.csv", index=False)
    for kind in ("malignant", "benign"):
        cmd = ["evaluate", str(out / "breasts.csv"), "--label", f"{kind}_label", "--scores"]
        cmd += [f"{n}_{kind}" for n in MODELS]
        for other in MODELS[1:]:
            cmd += ["--compare", f"gmic_{kind}", f"{other}_{kind}"]
        cmd += ["--compare", f"gmic+dmv_image_{kind}", f"dmv_image_{kind}"]
        cmd += ["--bootstrap", str(args.bootstrap), "--seed", str(args.seed)]
        cmd += [
            "--markdown",
            str(out / f"comparison_{kind}.md"),
            "--json",
            str(out / f"comparison_{kind}.json"),
        ]
        _run(out, cmd, out / f"comparison_{kind}.json")
    print((out / "comparison_malignant.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
