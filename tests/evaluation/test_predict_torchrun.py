"""``torchrun --nproc_per_node=2 ... predict`` (gloo, CPU) writes what one process writes, row for row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mammogmic
from mammogmic.cli.main import main

TABLES = (
    "image_predictions.csv",
    "breast_predictions.csv",
    "breast_predictions_metarepository.csv",
    "exam_summary.csv",
    "errors.csv",
    "patches.json",
)


def _inputs(root: Path, write_breast_png) -> Path:  # type: ignore[no-untyped-def]
    scans = root / "scans"
    for seed, name in enumerate(("0_L-CC", "0_L-MLO", "0_R-CC", "0_R-MLO", "1_L-CC", "2_R-CC")):
        write_breast_png(scans / f"{name}.png", name[2], seed)
    (scans / "1_R-CC.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # input 5: an error in rank 1's shard
    return scans


def _torchrun(args: list[str]) -> subprocess.CompletedProcess[str]:
    src = str(Path(mammogmic.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "mammogmic.cli.main", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _same_outputs(single: Path, merged: Path, *, resumed: bool = False) -> None:
    """The same files; after a resume the derived tables average the kept rows' CSV values (6 decimals), as a
    resumed single run does, so they may differ from a fresh run's in the last decimal. The saved arrays' integers
    (patch locations, crop size) are equal and their floats equal to rounding: each rank batches other
    images together, and a matrix product over another batch may sum in another order (on a Xeon with AMX one
    attention weight differed by 3e-8, 2026-12-02)."""
    for name in TABLES:
        if resumed and name.startswith(("breast_", "exam_")):
            pd.testing.assert_frame_equal(
                pd.read_csv(merged / name), pd.read_csv(single / name), check_exact=False, rtol=0, atol=2e-6
            )
            continue
        assert (merged / name).read_text() == (single / name).read_text(), name
    for npz in sorted((single / "saliency").glob("*.npz")):
        a, b = np.load(npz), np.load(merged / "saliency" / npz.name)
        assert set(a.files) == set(b.files), npz.name
        for k in a.files:
            if np.issubdtype(a[k].dtype, np.integer):
                assert np.array_equal(a[k], b[k]), (npz.name, k)
            else:
                # one rounding step of a float16 map in [0, 1]; float32 to 1e-6
                atol = max(1e-6, float(np.finfo(a[k].dtype).eps))
                np.testing.assert_allclose(b[k], a[k], rtol=0, atol=atol, err_msg=f"{npz.name}: {k}")
    assert len(list((merged / "saliency").glob("*.npz"))) == 6


@pytest.mark.slow
def test_torchrun_predict_equals_one_process(tmp_path: Path, tiny_model: Path, breast_png, size_args) -> None:  # type: ignore[no-untyped-def]
    scans = _inputs(tmp_path, breast_png)
    common = [str(scans), "--model", str(tiny_model), *size_args, "--batch-size", "2"]
    common += ["--save-patches", "--save-saliency"]
    single, merged = tmp_path / "single", tmp_path / "merged"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank: the same kernels, the same float sums
    try:
        assert main(["predict", *common, "--out", str(single)]) == 1  # one unreadable image
    finally:
        torch.set_num_threads(threads)

    run = _torchrun(["predict", *common, "--out", str(merged)])
    assert run.returncode == 1, run.stderr[-3000:]  # rank 0 exits with the status of one process
    _same_outputs(single, merged)
    rows = pd.read_csv(merged / "image_predictions.csv", dtype=str)
    # input order (sorted file names), not rank order: rank 0 had inputs 0, 2, 4, 6, rank 1 had 1, 3, 5
    assert list(rows["image_index"]) == ["0_L-CC", "0_L-MLO", "0_R-CC", "0_R-MLO", "1_L-CC", "2_R-CC"]
    info = json.loads((merged / "run.json").read_text())
    assert info["complete"] and info["world_size"] == 2 and info["n_predicted"] == 6
    assert info["n_inputs"] == 7 and info["n_run"] == 7 and info["n_errors"] == 1
    part1 = pd.read_csv(merged / "parts" / "rank-1" / "image_predictions.csv", dtype=str)
    assert list(part1["image_index"]) == ["0_L-MLO", "0_R-MLO"]  # strided shard: inputs 1, 3 (5 failed)
    assert list(pd.read_csv(merged / "parts" / "rank-1" / "errors.csv")["image_id"]) == ["1_R-CC"]

    # Rank 1 "killed" before its second image was written: its part lost the last row. The same command resumes each part
    # like a single run: only that image (and the unreadable one, as always) is run again.
    part_csv = merged / "parts" / "rank-1" / "image_predictions.csv"
    lines = part_csv.read_text().splitlines(keepends=True)
    part_csv.write_text("".join(lines[:-1]))
    (merged / "parts" / "rank-1" / "saliency" / "0_R-MLO.npz").unlink()
    run = _torchrun(["predict", *common, "--out", str(merged)])
    assert run.returncode == 1, run.stderr[-3000:]
    info = json.loads((merged / "run.json").read_text())
    assert info["n_already_predicted"] == 5 and info["n_run"] == 2 and info["n_predicted_now"] == 1
    _same_outputs(single, merged, resumed=True)


@pytest.mark.parametrize("option", [["--dicom-out", "d"], ["--report"]])
def test_torchrun_predict_refuses_one_process_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], option: list[str]
) -> None:
    """Options that need one process stop at once with a message (no process group is started)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"")
    rc = main(["predict", str(tmp_path), "--model", str(model), "--out", str(tmp_path / "o"), *option])
    assert rc == 2
    assert option[0] in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
