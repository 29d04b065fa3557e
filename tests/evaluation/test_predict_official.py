"""``mammogmic predict`` from raw PNGs with the official-format checkpoint reproduces the official outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mammogmic.cli.main import main

pytestmark = pytest.mark.fixtures


def test_predict_matches_official_fusion(tmp_path: Path, fixtures_dir: Path) -> None:
    fixtures = fixtures_dir  # tests/conftest.py: fails (not skips) when CI is set and they are missing
    # 0_L-CC is already cropped by NYU; 1_R_CC is a full image that goes through crop + centre.
    names = ["0_L-CC", "1_R_CC"]
    out = tmp_path / "out"
    rc = main(
        [
            "predict",
            *(str(fixtures / "images" / "original" / f"{n}.png") for n in names),
            "--model",
            str(fixtures / "official_format_seed0.p"),
            "--percent-t",
            "0.02",
            "--out",
            str(out),
            "--workers",
            "0",
            "--batch-size",
            "2",
            "--no-progress",
            "--save-saliency",
            "--save-patches",
        ]
    )
    assert rc == 0
    preds = pd.read_csv(out / "image_predictions.csv").set_index("image_index")
    patches = json.loads((out / "patches.json").read_text())
    for name in names:
        expected = np.load(fixtures / "expected" / f"{name}.npz")
        got = preds.loc[name, ["benign_pred", "malignant_pred"]].to_numpy(dtype=float)
        # Measured (scripts/conformance_report.py): y_fusion 2.4e-7, saliency 2.44e-4, attention 4.3e-7.
        # CSV and patches.json keep 6 decimals (rounding <= 5e-7) on top of the model's <= 3e-7.
        np.testing.assert_allclose(got, expected["y_fusion"][0], rtol=0, atol=1e-6)
        saliency = np.load(out / "saliency" / f"{name}.npz")["saliency"].astype(np.float32)
        # Stored as float16: half its spacing below 1 is 2**-12 = 2.44e-4, plus the model's 5e-7.
        np.testing.assert_allclose(saliency, expected["saliency_map"][0], rtol=0, atol=2.5e-4)
        np.testing.assert_array_equal(patches[name]["locations"], expected["patch_locations"][0].astype(int))
        np.testing.assert_allclose(patches[name]["attention"], expected["patch_attns"][0], rtol=0, atol=1e-6)
    wide = pd.read_csv(out / "breast_predictions_metarepository.csv", dtype={"index": str}).set_index("index")
    assert wide.loc["1", "right_malignant"] == pytest.approx(preds.loc["1_R_CC", "malignant_pred"])
