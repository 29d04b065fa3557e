"""Data-pipeline throughput on one core: raw PNG/DICOM -> model input, and cache -> training sample.

Uses the real mammograms of the official fixtures (``../shared/fixtures/official_gmic``; the 3328x2560
originals ``1_R_CC`` and ``2_L_CC`` plus the four pre-cropped GMIC sample images). DICOM copies
(uncompressed and JPEG 2000 lossless) are written to a temporary folder. Everything runs with one
OpenCV/torch thread. Not a test: prints a table and writes JSON.

    python benchmarks/bench_data.py [--repeats 5] [--json bench_data.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _timing import median_seconds

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / ".." / "shared" / "fixtures" / "official_gmic"


def _write_dicoms(png: Path, folder: Path) -> dict[str, Path]:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    from mammogmic.data import read_image

    pixels, _ = read_image(png)
    out = {}
    for name, syntax in (("dicom", None), ("dicom_j2k", JPEG2000Lossless)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.ImageLaterality, ds.ViewPosition = "MG", "L", "CC"
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels.astype("<u2").tobytes()
        if syntax is not None:
            ds.compress(syntax)
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out[name] = path
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if not (FIXTURES / "metadata.json").is_file():
        print(f"fixtures not found at {FIXTURES}", file=sys.stderr)
        return 1
    cv2.setNumThreads(1)
    torch.set_num_threads(1)

    from scipy import ndimage

    from mammogmic.data import best_center, crop_breast, model_input, read_image
    from mammogmic.data.cache import preprocess_manifest
    from mammogmic.data.dataset import MammogramDataset
    from mammogmic.data.manifest import load_manifest
    from mammogmic.data.preprocessing import _erode

    metadata = json.loads((FIXTURES / "metadata.json").read_text())
    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        "threads": 1,
        "repeats": args.repeats,
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        full = FIXTURES / "images" / "original" / "2_L_CC.png"
        sources = {
            "png16 3328x2560": full,
            **{f"{k} 3328x2560": v for k, v in _write_dicoms(full, tmp).items()},
        }
        for label, path in sources.items():
            read_s = median_seconds(lambda p=path: read_image(p), args.repeats)

            def pipeline(p: Path = path) -> np.ndarray:
                image, _ = read_image(p)
                info = crop_breast(image, "L-CC")
                return model_input(info.cropped, "L-CC", best_center(info))

            total_s = median_seconds(pipeline, args.repeats)
            rows.append((f"raw {label} -> model input", total_s, f"read {read_s * 1000:.0f} ms"))
        image, _ = read_image(full)
        mask = image > 0
        crop_s = median_seconds(lambda: crop_breast(image, "L-CC"), args.repeats)
        erode_ours = median_seconds(lambda: _erode(mask, 100), args.repeats)
        erode_scipy = median_seconds(
            lambda: ndimage.binary_erosion(mask, iterations=100), max(1, args.repeats // 2)
        )
        rows.append(("crop_breast (whole stage)", crop_s, ""))
        rows.append(
            ("erosion x100: distance transform", erode_ours, f"scipy iterations: {erode_scipy * 1000:.0f} ms")
        )

        data = tmp / "in"
        data.mkdir()
        lines = ["image_id,image_path,patient_id,exam_id,laterality,view,malignant_label"]
        for name, entry in metadata["images"].items():
            side, view = entry["view"].split("-")
            lines.append(
                f"{name},{FIXTURES / entry['original_png']},p,e{entry['exam_index']},{side},{view},0"
            )
        (data / "manifest.csv").write_text("\n".join(lines) + "\n")
        start = time.perf_counter()
        preprocess_manifest(load_manifest(data / "manifest.csv"), tmp / "out")
        prep_s = (time.perf_counter() - start) / len(metadata["images"])
        rows.append(("preprocess (-j 1, per image, 6 fixture images)", prep_s, "incl. SHA-256 + .npy write"))
        for mode in ("train", "eval"):
            dataset = MammogramDataset(tmp / "out" / "manifest.csv", mode=mode, seed=0)
            state = {"i": 0}

            def sample(ds: MammogramDataset = dataset, state: dict[str, int] = state) -> Any:
                state["i"] += 1
                return ds[state["i"] % len(ds)]

            sample_s = median_seconds(sample, args.repeats * len(dataset))
            note = "mmap read + noisy window + cubic resize + standardise" if mode == "train" else "no noise"
            rows.append((f"cache -> {mode} sample 2944x1920", sample_s, note))

    width = max(len(r[0]) for r in rows)
    print(f"{'stage':<{width}}  {'ms':>7}  {'img/s/core':>10}  note")
    for name, seconds, note in rows:
        print(f"{name:<{width}}  {seconds * 1000:7.1f}  {1 / seconds:10.1f}  {note}")
        results[name] = {"seconds": seconds, "images_per_second": 1 / seconds, "note": note}
    print(results["machine"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
