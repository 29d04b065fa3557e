"""``mammogmic predict`` / ``visualize`` on a folder of good and bad files with a tiny model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mammogmic.cli.main import main
from mammogmic.runtime import allocator_in_use


def _folder(root: Path, write_breast_png) -> Path:  # type: ignore[no-untyped-def]
    scans = root / "scans"
    write_breast_png(scans / "0_L-CC.png", "L", 0)
    write_breast_png(scans / "0_L-MLO.png", "L", 1)
    write_breast_png(scans / "0_R-CC.png", "R", 2)
    write_breast_png(scans / "sub" / "1_R-MLO.png", "R", 3)
    write_breast_png(scans / "3_L-CC.png", "L", 6)
    (scans / "broken_L-CC.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (scans / "empty_R-CC.dcm").write_bytes(b"")
    Image.fromarray(np.zeros((300, 200), dtype=np.uint8)).save(scans / "black_L-MLO.png")  # no contrast
    speckle = np.zeros((300, 200), dtype=np.uint8)
    speckle[::7, ::9] = np.arange(speckle[::7, ::9].size).reshape(speckle[::7, ::9].shape) % 200 + 20
    Image.fromarray(speckle).save(scans / "speckle_R-MLO.png")  # contrast, but no breast: the crop fails
    write_breast_png(scans / "noview.png", "L", 4)  # laterality/view unknown
    (scans / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    return scans


def test_predict_folder_good_and_bad(tmp_path: Path, tiny_model: Path, breast_png, size_args) -> None:  # type: ignore[no-untyped-def]
    write_breast_png = breast_png
    scans = _folder(tmp_path, breast_png)
    before = {p: p.read_bytes() for p in scans.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    args = [
        "predict",
        str(scans),
        "--model",
        str(tiny_model),
        "--out",
        str(out),
        *size_args,
        "--batch-size",
        "3",
    ]
    rc = main([*args, "--save-saliency", "--save-patches"])
    assert rc == 1  # some images failed
    preds = pd.read_csv(out / "image_predictions.csv", dtype={"image_index": str})
    assert sorted(preds["image_index"]) == ["0_L-CC", "0_L-MLO", "0_R-CC", "3_L-CC", "sub_1_R-MLO"]
    assert list(preds.columns[:3]) == ["image_index", "benign_pred", "malignant_pred"]
    assert preds[["benign_pred", "malignant_pred"]].apply(lambda c: c.between(0, 1)).all().all()
    assert "malignant_label" not in preds.columns  # no labels known
    errors = pd.read_csv(out / "errors.csv")
    by_id = dict(zip(errors["image_id"], errors["stage"], strict=True))
    assert set(by_id) == {"broken_L-CC", "empty_R-CC", "black_L-MLO", "speckle_R-MLO", "noview"}
    assert by_id["speckle_R-MLO"] == "crop" and by_id["black_L-MLO"] == "read"
    assert "no tissue contrast" in errors.set_index("image_id").loc["black_L-MLO", "error"]
    for _, row in errors.iterrows():
        assert row["path"] in row["error"]  # each message names its file
    # breast level: exam 0 has L (CC + MLO) and R (CC); "1" comes from the sub-folder name prefix.
    breasts = pd.read_csv(out / "breast_predictions.csv", dtype={"exam_id": str})
    left = breasts[breasts["breast_id"] == "0_L"].iloc[0]
    expected = preds.set_index("image_index").loc[["0_L-CC", "0_L-MLO"], "malignant_pred"].mean()
    assert left["malignant_pred"] == pytest.approx(expected, abs=1e-5)
    wide = pd.read_csv(out / "breast_predictions_metarepository.csv", dtype={"index": str})
    assert list(wide.columns[:3]) == ["index", "left_malignant", "right_malignant"]
    assert (out / "exam_summary.csv").exists()
    npz = np.load(out / "saliency" / "0_L-CC.npz")
    assert npz["saliency"].shape == (2, 4, 3) and npz["patch_locations"].shape == (2, 2)
    patches = json.loads((out / "patches.json").read_text())
    assert set(patches) == set(preds["image_index"]) and len(patches["0_L-CC"]["attention"]) == 2
    # inputs untouched, nothing written into the input folder
    assert {p: p.read_bytes() for p in scans.rglob("*") if p.is_file()} == before

    # A rerun skips what was predicted; new files are added.
    write_breast_png(scans / "3_R-CC.png", "R", 5)  # a new breast of exam 3, predicted in the first run
    stamp = (out / "image_predictions.csv").read_text()
    assert main(args) == 1
    again = pd.read_csv(out / "image_predictions.csv", dtype={"image_index": str})
    assert len(again) == 6 and "3_R-CC" in set(again["image_index"])
    old = again.set_index("image_index").loc["0_L-CC", "malignant_pred"]
    assert old == pytest.approx(preds.set_index("image_index").loc["0_L-CC", "malignant_pred"])
    assert stamp != (out / "image_predictions.csv").read_text()
    breasts = pd.read_csv(out / "breast_predictions.csv", dtype=str)
    assert breasts["breast_id"].is_unique  # old rows (read back from CSV) and new rows group together
    assert breasts.set_index("breast_id").loc["0_L", "n_images"] == "2"
    exams = pd.read_csv(out / "exam_summary.csv", dtype=str)
    assert exams["exam_id"].is_unique and set(exams["exam_id"]) == {"0", "3", "sub_1"}
    assert exams.set_index("exam_id").loc["3", "n_breasts"] == "2"
    run = json.loads((out / "run.json").read_text())
    assert run["n_run"] == 6  # 1 new good image + the 5 bad ones retried
    assert run["n_predicted"] == 6
    assert run["n_inputs"] == run["n_already_predicted"] + run["n_run"] == 11
    assert run["n_run"] == run["n_predicted_now"] + run["n_errors"]
    # float32 predict's default profile, and the malloc this (test) process runs on
    assert run["allocator"] == {"profile": "lean", "malloc": allocator_in_use()}


def _predict_process(
    args: list[str], options: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``mammogmic [options] predict [args]`` in a process of its own, started as the console script starts it
    (so that it can restart itself on jemalloc), without this process's allocator settings, plus ``env``."""
    mine = ("LD_PRELOAD", "MAMMOGMIC_JEMALLOC", "MALLOC_CONF")
    full_env = {k: v for k, v in os.environ.items() if k not in mine} | env
    command = [sys.executable, "-m", "mammogmic.cli.main", *options, "predict", *args]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=300)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux-only")
def test_float32_predict_runs_on_jemalloc_where_it_is_installed(  # type: ignore[no-untyped-def]
    tmp_path: Path, tiny_model: Path, breast_png, size_args, jemalloc: str
) -> None:
    """The float32 default of a console ``predict`` (mammogmic.runtime.default_allocator): jemalloc, with the
    same predictions as lean; where jemalloc cannot be loaded, a warning and lean, not a failed run."""
    scans = tmp_path / "scans"
    for i, name in enumerate(["0_L-CC", "0_L-MLO", "0_R-CC"]):
        breast_png(scans / f"{name}.png", name[2], i)
    not_a_library = {"MAMMOGMIC_JEMALLOC": str(scans / "0_L-CC.png")}  # the dynamic loader refuses it
    runs = {}
    for name, options, env in [
        ("default", [], {}),
        ("lean", ["--allocator", "lean"], {}),
        ("refused", [], not_a_library),
    ]:
        out = tmp_path / name
        run = _predict_process(
            [str(scans), "--model", str(tiny_model), "--out", str(out), *size_args], options, env
        )
        assert run.returncode == 0, run.stderr
        runs[name] = (
            run.stderr,
            json.loads((out / "run.json").read_text()),
            pd.read_csv(out / "image_predictions.csv"),
        )
    assert runs["default"][1]["allocator"] == {"profile": "jemalloc", "malloc": "jemalloc"}
    assert (
        runs["lean"][1]["allocator"]
        == runs["refused"][1]["allocator"]
        == {"profile": "lean", "malloc": "glibc"}
    )
    assert "warning" not in runs["default"][0] + runs["lean"][0]
    refused = runs["refused"][0]
    assert (
        refused.count("warning: jemalloc: the dynamic loader did not load") == 1
        and "running on lean" in refused
    )
    columns = ["benign_pred", "malignant_pred"]
    for name in ("lean", "refused"):
        np.testing.assert_allclose(runs[name][2][columns], runs["default"][2][columns], rtol=0, atol=1e-6)


def _four_view_manifest(root: Path, write_breast_png) -> Path:  # type: ignore[no-untyped-def]
    rows = []
    for i, (side, view) in enumerate([("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]):
        write_breast_png(root / "img" / f"a{i}.png", side, i)
        rows.append(
            {
                "image_id": f"img{i}",
                "image_path": f"img/a{i}.png",
                "patient_id": "p1",
                "exam_id": "e1",
                "laterality": side,
                "view": view,
                "benign_label": 0,
                "malignant_label": int(side == "R"),
            }
        )
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def test_predict_manifest_labels_ensemble_tta(
    tmp_path: Path, tiny_model: Path, tiny_model_b: Path, breast_png, size_args, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import mammogmic.runtime as runtime

    kept: list[
        str
    ] = []  # the bf16 profile keeps the heap once the models are loaded (not in this test process)
    monkeypatch.setattr(runtime, "keep_freed_heap", lambda: kept.append("kept") is None)
    manifest = _four_view_manifest(tmp_path, breast_png)
    out = tmp_path / "out"
    rc = main(
        [
            "predict",
            "--manifest",
            str(manifest),
            "--model",
            str(tiny_model),
            "--model",
            str(tiny_model_b),
            "--tta",
            "2",
            "--out",
            str(out),
            *size_args,
        ]
    )
    assert rc == 0
    preds = pd.read_csv(out / "image_predictions.csv")
    assert preds["malignant_label"].tolist() == [0, 0, 1, 1]
    members = ["malignant_pred__tiny", "malignant_pred__tiny_b"]
    assert [c for c in preds.columns if c.startswith("malignant_pred__")] == members
    assert (preds[members[0]] - preds[members[1]]).abs().min() > 1e-4  # two different models
    np.testing.assert_allclose(preds[members].mean(axis=1), preds["malignant_pred"], atol=1e-6)
    breasts = pd.read_csv(out / "breast_predictions.csv")
    assert breasts["breast_id"].tolist() == ["e1_L", "e1_R"]
    assert breasts["malignant_label"].tolist() == [0, 1]
    # bf16 (backbones in bf16, heads in float32) gives nearly the same probabilities (same TTA windows: seeded per image id).
    out_bf16 = tmp_path / "out_bf16"
    common = ["--model", str(tiny_model), "--model", str(tiny_model_b), "--tta", "2", *size_args]
    assert (
        main(["predict", "--manifest", str(manifest), "--out", str(out_bf16), "--amp", "bf16", *common]) == 0
    )
    bf16 = pd.read_csv(out_bf16 / "image_predictions.csv")
    np.testing.assert_allclose(bf16["malignant_pred"], preds["malignant_pred"], atol=0.05)
    assert not np.array_equal(bf16["malignant_pred"], preds["malignant_pred"])  # bf16 really ran
    assert kept == ["kept"]  # once, for both models; the float32 run kept nothing
    run = json.loads((out_bf16 / "run.json").read_text())
    assert run["allocator"]["profile"] == "fast, 4 KiB pages, heap kept"
    assert (
        main(["predict", "--manifest", str(manifest), "--model", str(tiny_model), "--out", str(manifest)])
        == 2
    )


def _by_hand(model_path: Path, manifest: Path, contract_dict: dict, tta: int, seed: int) -> np.ndarray:  # type: ignore[type-arg]
    """(benign, malignant) per image: each window built by ``window_samples``, through the plain model, averaged."""
    import torch

    from mammogmic import load_model
    from mammogmic.data.sample import InputContract, items_from_manifest, load_source, window_samples

    contract = InputContract.from_dict(contract_dict)
    model = load_model(model_path).eval()
    probs = []
    for item in items_from_manifest(manifest):
        windows, _ = window_samples(load_source(item, contract), contract, tta, seed, item.image_id)
        assert windows.shape[0] == max(tta, 1)
        with torch.no_grad():
            per_window = model(torch.from_numpy(windows)).prediction.double().numpy()  # (T, 2)
        probs.append(per_window.mean(axis=0))
    return np.array(probs)


def test_predict_tta_and_ensemble_equal_the_windows_by_hand(
    tmp_path: Path, tiny_model: Path, tiny_model_b: Path, breast_png, size_args
) -> None:  # type: ignore[no-untyped-def]
    """--tta N averages the N windows of ``window_samples(..., N, seed, image_id)``; the ensemble averages
    its members; each member column is that member's own TTA mean."""
    manifest = _four_view_manifest(tmp_path, breast_png)
    base = ["predict", "--manifest", str(manifest), "--model", str(tiny_model), "--model", str(tiny_model_b)]
    tables = {}
    for tta in (1, 3):
        out = tmp_path / f"tta{tta}"
        assert (
            main([*base, "--tta", str(tta), "--seed", "4", "--no-fuse", "--out", str(out), *size_args]) == 0
        )
        tables[tta] = pd.read_csv(out / "image_predictions.csv").set_index("image_index")
        run = json.loads((out / "run.json").read_text())
        contract = run["models"][0]["input_contract"]
        by_hand = [_by_hand(path, manifest, contract, tta, 4) for path in (tiny_model, tiny_model_b)]
        preds = tables[tta].loc[[f"img{i}" for i in range(4)]]
        for name, expected in zip(("tiny", "tiny_b"), by_hand, strict=True):
            got = preds[[f"benign_pred__{name}", f"malignant_pred__{name}"]].to_numpy()
            np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)  # CSV keeps 6 decimals
        mean = (by_hand[0] + by_hand[1]) / 2
        np.testing.assert_allclose(
            preds[["benign_pred", "malignant_pred"]].to_numpy(), mean, rtol=0, atol=2e-6
        )
    # TTA really changed the inputs: every image's score moved.
    moved = (tables[3]["malignant_pred"] - tables[1]["malignant_pred"]).abs()
    assert moved.min() > 1e-5, moved


def test_visualize_report(tmp_path: Path, tiny_model: Path, breast_png, size_args) -> None:  # type: ignore[no-untyped-def]
    write_breast_png = breast_png
    rows = []
    for i, side in enumerate("LRLR"):
        img = write_breast_png(tmp_path / f"s{i}.png", side, i)
        mask = np.zeros(img.shape, dtype=np.uint8)
        mask[140:180, 20:60] = 255
        Image.fromarray(mask).save(tmp_path / f"s{i}_mal.png")
        rows.append(
            {
                "image_id": f"s{i}",
                "image_path": f"s{i}.png",
                "exam_id": f"e{i // 2}",
                "patient_id": "p",
                "laterality": side,
                "view": "CC",
                "malignant_label": i % 2,
                "benign_label": 0,
                "malignant_mask_path": f"s{i}_mal.png",
            }
        )
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    out = tmp_path / "vis"
    rc = main(
        [
            "visualize",
            "--manifest",
            str(manifest),
            "--model",
            str(tiny_model),
            "--out",
            str(out),
            "--report",
            "--max-exams",
            "1",
            "--dpi",
            "50",
            *size_args,
        ]
    )
    assert rc == 0
    figures = sorted((out / "figures").glob("*.png"))
    assert [f.stem for f in figures] == ["s0", "s1", "s2", "s3"]
    assert sorted(f.stem for f in (out / "figures").glob("*.npz")) == ["s0", "s1", "s2", "s3"]
    width, height = Image.open(figures[0]).size
    assert width == 4 * 2.6 * 50  # four panels of 2.6 inches at 50 dpi
    assert height > width / 2
    html = (out / "report.html").read_text()
    assert "AUROC" in html
    exams = pd.read_csv(out / "exam_summary.csv").sort_values("malignant_pred", ascending=False)
    shown = re.findall(r'<section class="exam" id="[^"]+" data-exam="([^"]+)"', html)
    assert shown == exams["exam_id"].tolist()[:1]  # --max-exams 1: the highest exam score
    top, other = exams["exam_id"].tolist()
    # Every exam is listed; the drawn one links to its section.
    assert f'<tr><td><a href="#exam-{top}">{top}</a></td>' in html
    assert f"<tr><td>{other}</td>" in html
    loc = json.loads((out / "localization.json").read_text())
    assert loc["malignant"]["n_images"] == 4 and 0 <= loc["malignant"]["soft_dice"] <= 1


def test_predict_from_preprocess_cache_matches_raw(
    tmp_path: Path, tiny_model: Path, breast_png, size_args
) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    rows = []
    for i, (side, view) in enumerate([("L", "CC"), ("R", "MLO")]):
        img = breast_png(data / f"x{i}.png", side, 10 + i)
        mask = np.zeros(img.shape, dtype=np.uint8)
        mask[150:170, 30:60] = 1 if side == "L" else 0
        mask[150:170, 180:210] = 1 if side == "R" else 0
        Image.fromarray(mask * 255).save(data / f"x{i}_mal.png")
        rows.append(
            {
                "image_id": f"x{i}",
                "image_path": f"x{i}.png",
                "patient_id": "p",
                "exam_id": "e",
                "laterality": side,
                "view": view,
                "malignant_label": i,
                "malignant_mask_path": f"x{i}_mal.png",
            }
        )
    manifest = data / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    cache = tmp_path / "cache"
    assert (
        main(
            [
                "preprocess",
                str(manifest),
                "--out",
                str(cache),
                "--crop-iterations",
                "3",
                "--window-size",
                "256",
                "192",
                "--no-progress",
            ]
        )
        == 0
    )
    cached_manifest = cache / "manifest.csv"
    assert pd.read_csv(cached_manifest)["cached_path"].str.endswith(".npy").all()
    raw_out, cached_out = tmp_path / "raw", tmp_path / "cached"
    base = ["--model", str(tiny_model), *size_args]
    assert main(["predict", "--manifest", str(manifest), "--out", str(raw_out), *base]) == 0
    # The cached run also keeps the BatchNorms unfused: both differences must vanish.
    assert (
        main(["predict", "--manifest", str(cached_manifest), "--out", str(cached_out), "--no-fuse", *base])
        == 0
    )
    raw = pd.read_csv(raw_out / "image_predictions.csv").set_index("image_index")
    cached = pd.read_csv(cached_out / "image_predictions.csv").set_index("image_index")
    np.testing.assert_allclose(
        cached.loc[raw.index, ["benign_pred", "malignant_pred"]],
        raw[["benign_pred", "malignant_pred"]],
        atol=1e-6,
    )
    # Masks: cropped raw masks and the cache's cropped masks give the same Dice.
    dice = []
    for m, out in ((manifest, tmp_path / "vis_raw"), (cached_manifest, tmp_path / "vis_cached")):
        assert main(["visualize", "--manifest", str(m), "--out", str(out), "--dpi", "30", *base]) == 0
        dice.append(json.loads((out / "localization.json").read_text())["malignant"])
    assert dice[0]["n_images"] == 2
    assert dice[0] == dice[1]


def test_predict_refuses_bad_device_and_clobbering_outputs(
    tmp_path: Path, tiny_model: Path, breast_png, size_args, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    breast_png(tmp_path / "a.png", "L", 0)
    manifest = tmp_path / "image_predictions.csv"  # a manifest that happens to carry an output's name
    pd.DataFrame(
        [
            {
                "image_id": "a",
                "image_path": "a.png",
                "patient_id": "p",
                "exam_id": "e",
                "laterality": "L",
                "view": "CC",
            }
        ]
    ).to_csv(manifest, index=False)
    before = manifest.read_bytes()
    base = ["predict", "--manifest", str(manifest), "--model", str(tiny_model), *size_args]
    assert main([*base, "--out", str(tmp_path)]) == 2
    assert "overwrite input" in capsys.readouterr().err
    assert manifest.read_bytes() == before
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        assert main([*base, "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "o"), "--device", "tpu7"]) == 2
    assert "not a device name" in capsys.readouterr().err


def test_predict_compiled_matches_eager(tmp_path: Path, tiny_model: Path, breast_png, size_args) -> None:  # type: ignore[no-untyped-def]
    scans = tmp_path / "scans"
    breast_png(scans / "0_L-CC.png", "L", 0)
    breast_png(scans / "0_R-MLO.png", "R", 1)
    base = ["predict", str(scans), "--model", str(tiny_model), *size_args, "--batch-size", "2"]
    assert main([*base, "--out", str(tmp_path / "eager")]) == 0
    assert main([*base, "--out", str(tmp_path / "compiled"), "--compile"]) == 0
    eager = pd.read_csv(tmp_path / "eager" / "image_predictions.csv").set_index("image_index")
    compiled = pd.read_csv(tmp_path / "compiled" / "image_predictions.csv").set_index("image_index")
    assert list(compiled.index) == list(eager.index) == ["0_L-CC", "0_R-MLO"]
    diff = (compiled[["benign_pred", "malignant_pred"]] - eager[["benign_pred", "malignant_pred"]]).abs()
    assert float(diff.to_numpy().max()) < 1e-5
    run = json.loads((tmp_path / "compiled" / "run.json").read_text())
    assert run["compiled"] is True
