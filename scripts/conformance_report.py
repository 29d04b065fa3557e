"""Measure how closely we reproduce the official GMIC fixtures: the largest difference per output.

The tolerances in tests/models/test_conformance.py, tests/data/test_data_preprocessing_official.py and
tests/evaluation/test_predict_official.py are set from these figures (with the margin stated there); rerun
this after changing the model, the preprocessing or torch, and on a new kind of CPU::

    PYTHONPATH=src python scripts/conformance_report.py [--compiled] [--json out.json]

Prints ``{check: max |ours - reference|}`` as JSON, plus the CPU and torch build it ran on. Model outputs
use the test's own input rebuild (``tests/models/test_conformance.py::_reference_input``), so the report and
the tests compare the same numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "models"))

from test_conformance import ATOL, NAMES, REF_KEY, _reference_input  # noqa: E402

from mammogmic import load_official_checkpoint  # noqa: E402
from mammogmic.data import best_center, crop_breast, model_input, read_image  # noqa: E402
from mammogmic.models import compile_for_inference, fuse_for_inference  # noqa: E402

FIXTURES = (ROOT / ".." / "shared" / "fixtures" / "official_gmic").resolve()


def _max(report: dict[str, float], key: str, value: Any) -> None:
    report[key] = max(report.get(key, 0.0), float(np.max(np.abs(value))))


def model_outputs(compiled: bool) -> dict[str, float]:
    """Max differences of every recorded output: plain model, the fused fast path (and compiled), stages."""
    path = FIXTURES / "official_format_seed0.p"
    plain = load_official_checkpoint(path, percent_t=0.02)
    t01 = load_official_checkpoint(path, percent_t=0.1)
    fast = {"fused": fuse_for_inference(plain).to(memory_format=torch.channels_last)}
    if compiled:
        fast["compiled"] = compile_for_inference(
            fuse_for_inference(plain).to(memory_format=torch.channels_last)
        )
    report: dict[str, float] = {}
    for name in NAMES:
        expected = dict(np.load(FIXTURES / "expected" / f"{name}.npz"))
        x = _reference_input(FIXTURES, name)
        probes = expected["input_probe_positions"]
        _max(report, "rebuilt_input.probe", x[probes[:, 0], probes[:, 1]] - expected["input_probe_values"])
        _max(report, "rebuilt_input.sub16", x[::16, ::16] - expected["input_sub16"])
        with torch.no_grad():
            batch = torch.from_numpy(x)[None, None]
            outs = {"plain": plain(batch), **{k: m(batch) for k, m in fast.items()}}
            _max(
                report,
                "plain.y_global_t0.1",
                t01(batch).y_global.numpy() - expected["y_global_percent_t_0p1"],
            )
        for kind, out in outs.items():
            for field in ATOL:
                if kind != "plain" and field == "patches" and name == "0_R-CC":
                    continue  # patches 5 and 6 may come from the other tied window
                ref = expected[REF_KEY.get(field, field)]
                _max(report, f"{kind}.{field}", getattr(out, field).float().numpy() - ref)
        out = outs["plain"]
        concat = torch.cat([out.h_g.flatten(2).amax(dim=2), out.z], dim=1).numpy()
        _max(report, "stage.concat_vec", concat - expected["concat_vec"])
        with torch.no_grad():
            y = torch.sigmoid(plain.fusion(torch.from_numpy(expected["concat_vec"])))
            h_crops = plain.forward_local(torch.from_numpy(expected["patches"]).unsqueeze(2))
            z, alpha = plain.attention(h_crops)
            y_local = torch.sigmoid(plain.local_classifier(z))
        _max(report, "stage.fusion_from_concat", y.numpy() - expected["y_fusion"])
        _max(report, "stage.local_h_crops", h_crops.numpy() - expected["h_crops"])
        _max(report, "stage.local_attention", alpha.numpy() - expected["patch_attns"])
        _max(report, "stage.local_y_local", y_local.numpy() - expected["y_local"])
    return report


def preprocessing() -> dict[str, float]:
    """Max differences of our model inputs (raw PNG -> crop -> centre -> window) from the recorded ones."""
    metadata = json.loads((FIXTURES / "metadata.json").read_text())
    report: dict[str, float] = {}
    for name in NAMES:
        entry = metadata["images"][name]
        image, _ = read_image(FIXTURES / entry["original_png"])
        crop = crop_breast(image, entry["view"], entry["horizontal_flip"])
        expected = np.load(FIXTURES / entry["expected_npz"])
        centre = best_center(crop)
        _max(report, "preprocess.best_center", np.subtract(centre, entry["best_center"]))
        x = model_input(crop.cropped, entry["view"], centre, horizontal_flip=entry["horizontal_flip"])
        rows, cols = expected["input_probe_positions"].T
        _max(report, "preprocess.input_sub16", x[::16, ::16] - expected["input_sub16"])
        _max(report, "preprocess.input_probe", x[rows, cols] - expected["input_probe_values"])
        x64 = x.astype(np.float64)
        _max(report, "preprocess.input_mean", x64.mean() - float(expected["input_mean"]))
        _max(report, "preprocess.input_std", x64.std() - float(expected["input_std"]))
        _max(report, "preprocess.input_sum", x64.sum() - float(expected["input_sum_f64"]))
        _max(
            report,
            "preprocess.input_min_max",
            [x.min() - expected["input_min"], x.max() - expected["input_max"]],
        )
    large = np.load(FIXTURES / "expected" / "process_image_large.npz")
    image, _ = read_image(FIXTURES / "images" / "original" / "2_L_CC.png")
    rows, cols = large["probe_positions"].T
    for i, view in enumerate(large["views"]):
        for j, centre in enumerate(large["centers"]):
            x = model_input(image, str(view), (int(centre[0]), int(centre[1])))
            _max(report, "preprocess.large_sub16", x[::16, ::16] - large["sub16"][i, j])
            _max(report, "preprocess.large_probe", x[rows, cols] - large["probe_values"][i, j])
            _max(report, "preprocess.large_mean", x.astype(np.float64).mean() - large["mean"][i, j])
            _max(report, "preprocess.large_std", x.astype(np.float64).std() - large["std"][i, j])
    return report


def predict_cli() -> dict[str, float]:
    """Max differences of ``mammogmic predict``'s written outputs (CSV, saliency .npz, patches.json)."""
    import tempfile

    import pandas as pd

    from mammogmic.cli.main import main as cli

    names = ["0_L-CC", "1_R_CC"]
    report: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        args = [str(FIXTURES / "images" / "original" / f"{n}.png") for n in names]
        args += ["--model", str(FIXTURES / "official_format_seed0.p"), "--percent-t", "0.02"]
        args += ["--out", str(out), "--workers", "0", "--no-progress", "--save-saliency", "--save-patches"]
        if cli(["predict", *args]) != 0:
            raise RuntimeError("predict failed")
        preds = pd.read_csv(out / "image_predictions.csv").set_index("image_index")
        patches = json.loads((out / "patches.json").read_text())
        for name in names:
            expected = np.load(FIXTURES / "expected" / f"{name}.npz")
            got = preds.loc[name, ["benign_pred", "malignant_pred"]].to_numpy(dtype=float)
            _max(report, "predict.y_fusion_csv", got - expected["y_fusion"][0])
            saliency = np.load(out / "saliency" / f"{name}.npz")["saliency"].astype(np.float32)
            _max(report, "predict.saliency_npz", saliency - expected["saliency_map"][0])
            locations = np.asarray(patches[name]["locations"]) - expected["patch_locations"][0]
            _max(report, "predict.patch_locations", locations)
            _max(
                report,
                "predict.attention_json",
                np.subtract(patches[name]["attention"], expected["patch_attns"][0]),
            )
    return report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compiled", action="store_true", help="also the TorchInductor path (slow)")
    parser.add_argument("--only-predict", action="store_true", help="only mammogmic predict's outputs")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    if not (FIXTURES / "metadata.json").is_file():
        print(f"error: official fixtures not found at {FIXTURES}", file=sys.stderr)
        return 2
    report = {
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "max_abs_difference": (
            predict_cli()
            if args.only_predict
            else {**preprocessing(), **model_outputs(args.compiled), **predict_cli()}
        ),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
