"""``mammogmic evaluate`` end to end on small CSVs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mammogmic.cli.main import main
from mammogmic.evaluation import metrics as m


def _reader_table(path: Path, n: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    df = pd.DataFrame(
        {
            "cancer": y,
            "reader_1": np.clip(y * 0.3 + rng.random(n), 0, 1.3),
            "reader_2": np.round(y * 0.2 + rng.random(n), 1),
            "model": y * 0.5 + rng.random(n),
        }
    )
    df.to_csv(path, index=False)
    return df


def test_evaluate_json_contract(tmp_path: Path) -> None:
    csv = tmp_path / "readers.csv"
    df = _reader_table(csv)
    out = tmp_path / "out.json"
    md = tmp_path / "out.md"
    rc = main(
        [
            "evaluate",
            str(csv),
            "--label",
            "cancer",
            "--scores",
            "reader_*",
            "model",
            "--hybrid-model",
            "model",
            "--lambdas",
            "0,0.25,0.5,0.75,1",
            "--bootstrap",
            "200",
            "--thresholds",
            "0.5",
            "--json",
            str(out),
            "--markdown",
            str(md),
            "--plots",
            str(tmp_path / "plots"),
            "--compare",
            "model",
            "reader_1",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert list(res["metrics"]) == ["reader_1", "reader_2", "model"]
    for col in ("reader_1", "reader_2", "model"):
        entry = res["metrics"][col]
        assert entry["auroc"] == pytest.approx(m.auroc(df["cancer"], df[col]))
        assert entry["auprc"] == pytest.approx(m.auprc(df["cancer"], df[col]))
        assert entry["average_precision"] == pytest.approx(m.average_precision(df["cancer"], df[col]))
        assert entry["auroc_ci"][0] <= entry["auroc"] <= entry["auroc_ci"][1]
        assert entry["n"] == len(df) and entry["n_positive"] == int(df["cancer"].sum())
    assert set(res["hybrid"]) == {"reader_1", "reader_2"}
    assert list(res["hybrid"]["reader_1"]) == ["0", "0.25", "0.5", "0.75", "1"]
    mixed = 0.25 * df["reader_2"] + 0.75 * df["model"]
    assert res["hybrid"]["reader_2"]["0.25"] == pytest.approx(m.auroc(df["cancer"], mixed))
    assert res["hybrid"]["reader_1"]["1"] == pytest.approx(res["metrics"]["reader_1"]["auroc"])
    mean_half = (res["hybrid"]["reader_1"]["0.5"] + res["hybrid"]["reader_2"]["0.5"]) / 2
    assert res["hybrid_mean"]["0.5"] == pytest.approx(mean_half)
    comp = res["comparisons"][0]
    assert comp["difference"] == pytest.approx(
        res["metrics"]["model"]["auroc"] - res["metrics"]["reader_1"]["auroc"]
    )
    assert "| reader_1 |" in md.read_text()
    assert (tmp_path / "plots" / "roc.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "pr.png").stat().st_size > 1000


def test_evaluate_breast_group_and_ensemble(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rows = []
    for exam in range(30):
        for side in "LR":
            cancer = int(rng.random() < 0.4)
            for view in ("CC", "MLO"):
                rows.append(
                    {
                        "image_index": f"{exam}_{side}-{view}",
                        "malignant_label": cancer,
                        "model_a": cancer * 0.4 + rng.random(),
                        "model_b": cancer * 0.4 + rng.random(),
                    }
                )
    test = pd.DataFrame(rows)
    test_csv = tmp_path / "test.csv"
    test.to_csv(test_csv, index=False)
    val_csv = tmp_path / "val.csv"
    test.assign(model_b=test["model_b"] * 0.0 + rng.random(len(test))).to_csv(val_csv, index=False)
    out = tmp_path / "res.json"
    rc = main(
        [
            "evaluate",
            str(test_csv),
            "--label",
            "malignant_label",
            "--scores",
            "model_*",
            "--group",
            "breast",
            "--ensemble-val",
            str(val_csv),
            "--ensemble-step",
            "0.25",
            "--bootstrap",
            "100",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n_rows"] == 60 and res["metrics"]["model_a"]["n"] == 60
    breast_a = test.assign(b=test["image_index"].str.split("-").str[0]).groupby("b", sort=False)
    expected = m.auroc(breast_a["malignant_label"].max(), breast_a["model_a"].mean())
    assert res["metrics"]["model_a"]["auroc"] == pytest.approx(expected)
    # model_b is pure noise on the validation table, so it should get little weight.
    weights = res["ensemble"]["weights"]
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights["model_a"] > weights["model_b"]
    assert "ensemble" in res["metrics"]


def test_evaluate_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "r.csv"
    _reader_table(csv)
    assert main(["evaluate", str(csv), "--label", "cancer", "--scores", "nothing_*"]) == 2
    assert "matches no column" in capsys.readouterr().err
    assert main(["evaluate", str(csv), "--label", "missing", "--scores", "model"]) == 2
    assert "no label column" in capsys.readouterr().err
    assert main(["evaluate", str(csv), "--label", "cancer", "--scores", "model", "--json", str(csv)]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nope.csv"), "--label", "c", "--scores", "m"]) == 2


def test_hybrid_uses_each_readers_own_cases(tmp_path: Path) -> None:
    csv = tmp_path / "partial.csv"
    df = _reader_table(csv, n=80, seed=5)
    df.loc[:39, "reader_2"] = np.nan  # reader 2 read only the second half
    df.to_csv(csv, index=False)
    out = tmp_path / "h.json"
    args = ["evaluate", str(csv), "--label", "cancer", "--scores", "reader_*", "model"]
    assert (
        main([*args, "--hybrid-model", "model", "--lambdas", "0.5", "--bootstrap", "0", "--json", str(out)])
        == 0
    )
    res = json.loads(out.read_text())
    assert res["hybrid_n"] == {"reader_1": 80, "reader_2": 40}
    full = 0.5 * df["reader_1"] + 0.5 * df["model"]
    half = (0.5 * df["reader_2"] + 0.5 * df["model"])[40:]
    assert res["hybrid"]["reader_1"]["0.5"] == pytest.approx(m.auroc(df["cancer"], full))
    assert res["hybrid"]["reader_2"]["0.5"] == pytest.approx(m.auroc(df["cancer"][40:], half))
    assert res["metrics"]["reader_2"]["n"] == 40
