"""Batch outputs that never lie: provenance-keyed resume, one writer per folder, our folder or a new one."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import mammogmic
from mammogmic._outdir import MARKER_NAME, OutputFolder, OutputFolderError, OutputLayout, removed_if_unused
from mammogmic.cli.main import main
from mammogmic.evaluation.inference import ImageItem
from mammogmic.evaluation.outputs import PredictionWriter, input_provenance

SCORES = ["benign_pred", "malignant_pred"]
ScansOf = Callable[[Path, dict[str, int]], Path]
BreastPng = Callable[..., Any]


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """``tiny_model`` with other weights (same architecture and input contract)."""
    torch = pytest.importorskip("torch")
    from mammogmic import load_model, save_model

    model = load_model(tiny_model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    path = tmp_path_factory.mktemp("other") / "other.safetensors"
    save_model(model, path, metadata={"note": "other weights"})
    return path


@pytest.fixture()
def scans_of(breast_png: BreastPng) -> ScansOf:
    """``scans_of(folder, {"0_L-CC": seed, ...})`` writes synthetic breasts named like the official samples."""

    def write(folder: Path, names: dict[str, int]) -> Path:
        for name, seed in names.items():
            breast_png(folder / f"{name}.png", name.split("_")[1][0], seed)
        return folder

    return write


def _predict(inputs: list[Path], model: Path, out: Path, size_args: list[str], *extra: str) -> int:
    # One image per batch: a row's score never depends on which other images share its batch.
    return main(
        [
            "predict",
            *map(str, inputs),
            "--model",
            str(model),
            "--out",
            str(out),
            *size_args,
            "--batch-size",
            "1",
            *extra,
        ]
    )


def _table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "image_predictions.csv", dtype=str).set_index("image_index").sort_index()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rerun_with_another_model_gives_a_fresh_runs_scores(
    scans_of: ScansOf,
    tmp_path: Path,
    tiny_model: Path,
    other_model: Path,
    size_args: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    scans = scans_of(tmp_path / "scans", {"0_L-CC": 0, "0_R-CC": 1, "1_L-MLO": 2})
    extra = scans_of(tmp_path / "extra", {"2_R-MLO": 3})
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert _predict([scans, extra], tiny_model, out, size_args, "--save-saliency") == 0
    first = _table(out)
    assert len(first) == 4 and len(list((out / "saliency").glob("*.npz"))) == 4
    capsys.readouterr()

    assert _predict([scans], other_model, out, size_args) == 0
    err = capsys.readouterr().err
    assert "4 earlier prediction(s)" in err and "other models or settings" in err
    assert f"models[0].sha256 {_sha256(tiny_model)[:12]}" in err  # the message names what differs
    assert _predict([scans], other_model, fresh, size_args) == 0
    rerun, expected = _table(out), _table(fresh)
    # Exactly a fresh run: the same rows (the extra image of the other model is gone), the same scores.
    assert list(rerun.index) == list(expected.index) == ["0_L-CC", "0_R-CC", "1_L-MLO"]
    pd.testing.assert_frame_equal(rerun[SCORES], expected[SCORES])
    assert (
        (rerun.loc[expected.index, SCORES] != first.loc[expected.index, SCORES]).all().all()
    )  # really other
    run = json.loads((out / "run.json").read_text())
    assert run["complete"] is True and run["n_predicted"] == 3 and run["n_dropped_other_settings"] == 4
    assert [m["sha256"] for m in run["models"]] == [_sha256(other_model)]
    assert run["settings"]["models"][0]["sha256"] == _sha256(other_model)
    assert set(rerun["run_key"]) == {run["run_key"]}  # run.json describes every row
    for image_id, row in rerun.iterrows():
        assert row["input_sha256"] == _sha256(scans / f"{image_id}.png")
    assert not list((out / "saliency").glob("*.npz"))  # saliency maps of the other model are gone
    breasts = pd.read_csv(out / "breast_predictions.csv", dtype=str)
    assert set(breasts["breast_id"]) == {"0_L", "0_R", "1_L"}  # no breast of the dropped image


def test_changed_pixels_recompute_that_image_only(
    scans_of: ScansOf,
    breast_png: BreastPng,
    tmp_path: Path,
    tiny_model: Path,
    size_args: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    scans = scans_of(tmp_path / "scans", {"0_L-CC": 0, "0_R-CC": 1, "1_L-MLO": 2})
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert _predict([scans], tiny_model, out, size_args) == 0
    before = _table(out)
    breast_png(scans / "0_R-CC.png", "R", 99)  # other pixels, same name
    capsys.readouterr()
    assert _predict([scans], tiny_model, out, size_args) == 0
    err = capsys.readouterr().err
    assert "2 image(s) already predicted" in err and "1 image(s) changed since they were predicted" in err
    assert _predict([scans], tiny_model, fresh, size_args) == 0
    after, expected = _table(out), _table(fresh)
    pd.testing.assert_frame_equal(after.loc[["0_R-CC"], SCORES], expected.loc[["0_R-CC"], SCORES])
    assert (after.loc["0_R-CC", SCORES] != before.loc["0_R-CC", SCORES]).all()
    pd.testing.assert_frame_equal(after.loc[["0_L-CC", "1_L-MLO"]], before.loc[["0_L-CC", "1_L-MLO"]])
    assert after.loc["0_R-CC", "input_sha256"] == _sha256(scans / "0_R-CC.png")
    run = json.loads((out / "run.json").read_text())
    assert (run["n_run"], run["n_input_changed"], run["n_already_predicted"]) == (1, 1, 2)
    # Unchanged inputs, same model: nothing to do, and --overwrite still redoes everything.
    assert _predict([scans], tiny_model, out, size_args) == 0
    assert json.loads((out / "run.json").read_text())["n_run"] == 0
    assert _predict([scans], tiny_model, out, size_args, "--overwrite") == 0
    assert json.loads((out / "run.json").read_text())["n_run"] == 3
    pd.testing.assert_frame_equal(_table(out)[SCORES], after[SCORES])


def test_input_key_follows_pixels_cache_and_manifest_fields(breast_png: BreastPng, tmp_path: Path) -> None:
    breast_png(tmp_path / "a.png", "L", 0)
    item = ImageItem(image_id="a", path=tmp_path / "a.png", view="L-CC")
    key = input_provenance(item)
    assert key == input_provenance(ImageItem(image_id="a", path=tmp_path / "a.png", view="L-CC"))
    assert key.sha256 == _sha256(tmp_path / "a.png")
    assert input_provenance(ImageItem(image_id="a", path=tmp_path / "a.png", view="R-CC")).key != key.key
    assert (
        input_provenance(
            ImageItem(image_id="a", path=tmp_path / "a.png", view="L-CC", horizontal_flip="YES")
        ).key
        != key.key
    )
    (tmp_path / "c.npy").write_bytes(b"one")
    cached = ImageItem(
        image_id="a", path=tmp_path / "a.png", view="L-CC", cached_path=tmp_path / "c.npy", best_center=(5, 6)
    )
    first = input_provenance(cached)
    (tmp_path / "c.npy").write_bytes(b"two")  # the cache file changed, the image did not
    assert input_provenance(cached).key != first.key and input_provenance(cached).sha256 == first.sha256
    os.mkfifo(tmp_path / "fifo.png")  # never opened: a FIFO would block the hashing
    assert input_provenance(ImageItem(image_id="f", path=tmp_path / "fifo.png")).sha256 is None


def test_interrupted_run_leaves_only_its_own_rows(
    scans_of: ScansOf,
    tmp_path: Path,
    tiny_model: Path,
    other_model: Path,
    size_args: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scans = scans_of(tmp_path / "scans", {"0_L-CC": 0, "0_R-CC": 1, "1_L-MLO": 2})
    out = tmp_path / "out"
    assert _predict([scans], tiny_model, out, size_args) == 0
    real_add = PredictionWriter.add_result
    calls = []

    def add_then_stop(self: PredictionWriter, res: object) -> None:
        real_add(self, res)  # type: ignore[arg-type]
        calls.append(res)
        if len(calls) == 1:
            self.flush()  # as after a batch
            raise KeyboardInterrupt  # Ctrl-C after the first image of the other model

    monkeypatch.setattr(PredictionWriter, "add_result", add_then_stop)
    assert _predict([scans], other_model, out, size_args) == 130
    monkeypatch.undo()
    table = _table(out)  # parseable, and only rows of the interrupted run
    run = json.loads((out / "run.json").read_text())
    assert len(table) == 1 and set(table["run_key"]) == {run["run_key"]}
    assert run["complete"] is False and run["models"][0]["sha256"] == _sha256(other_model)
    assert not (out / "breast_predictions.csv").exists()  # no table of the first model's rows is left
    assert _predict([scans], other_model, out, size_args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["complete"] is True and (run["n_already_predicted"], run["n_run"]) == (1, 2)


def test_a_second_run_refuses_or_waits(
    scans_of: ScansOf,
    tmp_path: Path,
    tiny_model: Path,
    size_args: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    scans = scans_of(tmp_path / "scans", {"0_L-CC": 0})
    out = tmp_path / "out"
    holder = OutputFolder(out, OutputLayout("predict", frozenset()))  # another run, holding the folder
    holder.__enter__()
    try:
        assert _predict([scans], tiny_model, out, size_args) == 2
        err = capsys.readouterr().err
        assert "another mammogmic run" in err and f"pid {os.getpid()}" in err and "--wait" in err
        assert not (out / "image_predictions.csv").exists()
        threading.Timer(1.0, holder.__exit__, (None, None, None)).start()
        assert _predict([scans], tiny_model, out, size_args, "--wait") == 0
    finally:
        holder.__exit__(None, None, None)
    assert "waiting for another mammogmic run" in capsys.readouterr().err
    assert list(_table(out).index) == ["0_L-CC"]


def _cli(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(mammogmic.__file__).parents[1])}
    return subprocess.Popen(
        [sys.executable, "-m", "mammogmic.cli.main", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_concurrent_runs_lose_no_row(
    scans_of: ScansOf, tmp_path: Path, tiny_model: Path, size_args: list[str]
) -> None:
    sets = {
        "a": scans_of(tmp_path / "a", {"0_L-CC": 0, "0_R-CC": 1, "0_L-MLO": 2}),
        "b": scans_of(tmp_path / "b", {"5_L-CC": 3, "5_R-CC": 4, "5_R-MLO": 5}),
    }
    ids = {name: {p.stem for p in folder.glob("*.png")} for name, folder in sets.items()}
    for out, wait in ((tmp_path / "out", []), (tmp_path / "out_wait", ["--wait"])):
        runs = {
            name: _cli(
                ["predict", str(folder), "--model", str(tiny_model), "--out", str(out), *size_args, *wait]
            )
            for name, folder in sets.items()
        }
        results = {
            name: (p.wait(timeout=300), p.stderr.read() if p.stderr else "") for name, p in runs.items()
        }
        present = set(_table(out).index)
        for name, (code, err) in results.items():
            assert code in ((0,) if wait else (0, 2)), err
            if code == 0:
                assert ids[name] <= present, f"run {name} exited 0 but lost rows"
            else:
                assert "another mammogmic run" in err and not ids[name] & present
        assert any(code == 0 for code, _ in results.values())
    assert set(_table(tmp_path / "out_wait").index) == ids["a"] | ids["b"]


def test_folder_with_files_we_did_not_write(
    scans_of: ScansOf,
    tmp_path: Path,
    tiny_model: Path,
    size_args: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    scans = scans_of(tmp_path / "scans", {"0_L-CC": 0})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "errors.csv").write_bytes(b"my own error list\n")
    for extra in ([], ["--force"]):  # an output's name that is not ours: never overwritten, even with --force
        assert _predict([scans], tiny_model, mine, size_args, *extra) == 2
        assert "errors.csv was not written by 'mammogmic predict'" in capsys.readouterr().err
        assert (mine / "errors.csv").read_bytes() == b"my own error list\n"
        assert not (mine / "image_predictions.csv").exists()

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_bytes(b"keep me")
    (notes / "plan.md").write_bytes(b"and me")
    assert _predict([scans], tiny_model, notes, size_args) == 2
    err = capsys.readouterr().err
    assert "notes.txt, plan.md" in err and "--force" in err
    assert sorted(p.name for p in notes.iterdir()) == [".mammogmic.lock", "notes.txt", "plan.md"]
    assert _predict([scans], tiny_model, notes, size_args, "--force") == 0
    assert _predict([scans], tiny_model, notes, size_args, "--force") == 0  # a rerun beside them, too
    assert (notes / "notes.txt").read_bytes() == b"keep me" and (notes / "plan.md").read_bytes() == b"and me"
    assert list(_table(notes).index) == ["0_L-CC"]
    marker = json.loads((notes / MARKER_NAME).read_text())
    assert marker["command"] == "predict" and "notes.txt" not in marker["files"]

    # A folder of another command is not predict's.
    prep = tmp_path / "prep"
    with OutputFolder(prep, OutputLayout("preprocess", frozenset({"manifest.csv"}))) as folder:
        folder.claim("manifest.csv")
        (prep / "manifest.csv").write_text("image_id,image_path\n")
    assert _predict([scans], tiny_model, prep, size_args, "--force") == 2
    assert "holds the outputs of 'mammogmic preprocess'" in capsys.readouterr().err
    assert (prep / "manifest.csv").read_text() == "image_id,image_path\n"


def test_visualize_rerun_keeps_nothing_of_the_earlier_run(
    scans_of: ScansOf, tmp_path: Path, tiny_model: Path, other_model: Path, size_args: list[str]
) -> None:
    scans = scans_of(tmp_path / "scans", {"0_L-CC": 0, "0_R-CC": 1})
    out = tmp_path / "vis"
    base = ["visualize", "--out", str(out), "--dpi", "30", *size_args]
    assert main([*base, str(scans), "--model", str(tiny_model), "--report"]) == 0
    assert (out / "report.html").exists() and len(list((out / "figures").glob("*.png"))) == 2
    assert main([*base, str(scans / "0_L-CC.png"), "--model", str(other_model)]) == 0
    assert [p.stem for p in (out / "figures").glob("*.png")] == ["0_L-CC"]
    assert not (out / "report.html").exists()  # the earlier report showed the other model
    run = json.loads((out / "run.json").read_text())
    table = _table(out)
    assert list(table.index) == ["0_L-CC"] and set(table["run_key"]) == {run["run_key"]}
    assert run["models"][0]["sha256"] == _sha256(other_model)
    (out / "mine.txt").write_text("x")
    assert main([*base, str(scans), "--model", str(tiny_model)]) == 2


def test_output_folder_removes_its_temp_files_and_never_follows_a_linked_lock(tmp_path: Path) -> None:
    layout = OutputLayout("predict", frozenset({"errors.csv", "run.json"}))
    out = tmp_path / "out"
    with OutputFolder(out, layout) as folder:
        folder.claim("errors.csv")
        (out / "errors.csv").write_text("image_id\n")
    (out / ".errors.csv.k3j9x_2a.tmp").write_text("half")  # left by a killed atomic write
    (out / ".run.json.tmp").write_text("half")
    with OutputFolder(out, layout):
        pass
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, ".mammogmic.lock", "errors.csv"]

    target = tmp_path / "precious.txt"
    target.write_text("precious")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ".mammogmic.lock").symlink_to(target)
    with pytest.raises(OutputFolderError, match="cannot open the lock file"):
        OutputFolder(linked, layout).__enter__()
    assert target.read_text() == "precious"


def test_a_failed_start_leaves_no_folder_but_never_removes_one_that_existed(tmp_path: Path) -> None:
    layout = OutputLayout("predict", frozenset({"run.json"}), frozenset({"figures"}))
    new = tmp_path / "made" / "for" / "out"
    with pytest.raises(RuntimeError), OutputFolder(new, layout) as folder:
        folder.claim("run.json", "figures")
        (new / "figures").mkdir()  # an empty output folder holds nothing to lose
        raise RuntimeError("the model would not load")
    assert not (tmp_path / "made").exists()  # with the parents created for it

    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError), OutputFolder(existing, layout):
        raise RuntimeError("the model would not load")
    assert existing.is_dir()  # the user's folder stays, with our marker

    written = tmp_path / "written"
    with OutputFolder(written, layout) as folder:
        folder.claim("run.json")
        (written / "run.json").write_text("{}")
    assert (written / "run.json").read_text() == "{}"

    for path, existed in ((tmp_path / "a" / "b", False), (tmp_path / "existing", True)):
        with pytest.raises(KeyError), removed_if_unused(path):
            path.mkdir(parents=True, exist_ok=True)
            raise KeyError("config")
        assert path.exists() == existed and not (tmp_path / "a").exists()
    with removed_if_unused(tmp_path / "kept"):
        (tmp_path / "kept").mkdir()
        (tmp_path / "kept" / "config.yaml").write_text("x")
    assert (tmp_path / "kept" / "config.yaml").exists()


def test_precision_is_part_of_the_run_key() -> None:
    """fp32, bf16 and the former bf16 autocast runs (no "bf16" entry) have three different keys."""
    from mammogmic.evaluation.inference import Member
    from mammogmic.evaluation.outputs import run_key, run_settings

    members = [Member(name="m", model=None, source="m.safetensors", percent_t=0.03, sha256="ab" * 32)]
    fp32, bf16 = run_settings(members, 1, 0, "fp32"), run_settings(members, 1, 0, "bf16")
    assert "bf16" not in fp32 and bf16["bf16"] == "cast"
    autocast_era = {k: v for k, v in bf16.items() if k != "bf16"}
    assert len({run_key(fp32), run_key(bf16), run_key(autocast_era)}) == 3
