"""``mammogmic evaluate`` end to end on small CSVs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from reference_metrics import independent_paired_bootstrap

from mammogmic.cli.main import main


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


def test_evaluate_by_hand(tmp_path: Path, sk_metrics) -> None:  # type: ignore[no-untyped-def]
    """Values computed on paper (AUROC with ties, AUPRC, operating points) and a paired comparison checked
    against an independent numpy + scikit-learn bootstrap on the same resamples."""
    table = pd.DataFrame(
        {
            "cancer": [1, 1, 1, 0, 0, 0, 0, 0],
            "model": [0.9, 0.7, 0.4, 0.7, 0.4, 0.3, 0.2, 0.1],
            "reader": [0.8, 0.3, 0.6, 0.5, 0.2, 0.6, 0.1, 0.0],
        }
    )
    csv = tmp_path / "hand.csv"
    table.to_csv(csv, index=False)
    out = tmp_path / "hand.json"
    args = ["evaluate", str(csv), "--label", "cancer", "--scores", "model", "reader", "--bootstrap", "300"]
    rc = main(
        [*args, "--seed", "7", "--thresholds", "0.5,0.4", "--compare", "model", "reader", "--json", str(out)]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    model = res["metrics"]["model"]
    # 15 cancer/negative pairs. model: 0.9 beats 5; 0.7 ties 0.7 and beats 4 (4.5); 0.4 ties 0.4, beats 3 (3.5).
    assert model["auroc"] == pytest.approx(13 / 15, abs=1e-12)
    # reader: 0.8 beats 5; 0.3 beats 0.2, 0.1, 0.0 (3); 0.6 ties 0.6 and beats 4 (4.5).
    assert res["metrics"]["reader"]["auroc"] == pytest.approx(12.5 / 15, abs=1e-12)
    # (recall, precision) at 0.9 / 0.7 / 0.4: (1/3, 1), (2/3, 2/3), (1, 3/5).
    assert model["average_precision"] == pytest.approx(34 / 45, abs=1e-12)
    assert model["auprc"] == pytest.approx(37 / 45, abs=1e-12)  # trapezoids from (0, 1)
    assert (model["n"], model["n_positive"]) == (8, 3)
    at_05, at_04 = model["operating_points"]
    # score >= 0.5: 0.9, 0.7 (cancers) and 0.7 (negative) called positive.
    assert (at_05["threshold"], at_05["tp"], at_05["fp"], at_05["tn"], at_05["fn"]) == (0.5, 2, 1, 4, 1)
    assert at_05["sensitivity"] == pytest.approx(2 / 3) and at_05["specificity"] == pytest.approx(4 / 5)
    # score >= 0.4 also calls the 0.4 cancer and the 0.4 negative.
    assert (at_04["tp"], at_04["fp"], at_04["tn"], at_04["fn"]) == (3, 2, 3, 0)
    assert at_04["sensitivity"] == 1.0 and at_04["specificity"] == pytest.approx(3 / 5)
    (comp,) = res["comparisons"]
    assert (comp["a"], comp["b"], comp["n"]) == ("model", "reader", 8)
    assert comp["difference"] == pytest.approx(0.5 / 15, abs=1e-12)
    y, a, b = (table[c].to_numpy() for c in ("cancer", "model", "reader"))
    expected = independent_paired_bootstrap(sk_metrics, y, a, b, 300, 7)
    assert comp["n_bootstrap_valid"] == expected["n_valid"]
    assert comp["difference_ci"] == pytest.approx(list(expected["ci"]), abs=1e-12)
    assert comp["p_value"] == pytest.approx(expected["p_value"], abs=1e-12)
    assert comp["difference_ci"][0] < 0 < comp["difference_ci"][1] and 0 < comp["p_value"] <= 1


def test_evaluate_json_contract(tmp_path: Path, sk_metrics) -> None:  # type: ignore[no-untyped-def]
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
    for col in ("reader_1", "reader_2", "model"):  # expected values from scikit-learn, not from our metrics
        entry = res["metrics"][col]
        precision, recall, _ = sk_metrics.precision_recall_curve(df["cancer"], df[col])
        assert entry["auroc"] == pytest.approx(sk_metrics.roc_auc_score(df["cancer"], df[col]))
        assert entry["auprc"] == pytest.approx(sk_metrics.auc(recall, precision))
        assert entry["average_precision"] == pytest.approx(
            sk_metrics.average_precision_score(df["cancer"], df[col])
        )
        assert entry["auroc_ci"][0] <= entry["auroc"] <= entry["auroc_ci"][1]
        assert entry["n"] == len(df) and entry["n_positive"] == int(df["cancer"].sum())
    assert set(res["hybrid"]) == {"reader_1", "reader_2"}
    assert list(res["hybrid"]["reader_1"]) == ["0", "0.25", "0.5", "0.75", "1"]
    mixed = 0.25 * df["reader_2"] + 0.75 * df["model"]
    assert res["hybrid"]["reader_2"]["0.25"] == pytest.approx(sk_metrics.roc_auc_score(df["cancer"], mixed))
    assert res["hybrid"]["reader_1"]["1"] == pytest.approx(res["metrics"]["reader_1"]["auroc"])
    mean_half = (res["hybrid"]["reader_1"]["0.5"] + res["hybrid"]["reader_2"]["0.5"]) / 2
    assert res["hybrid_mean"]["0.5"] == pytest.approx(mean_half)
    comp = res["comparisons"][0]
    assert comp["difference"] == pytest.approx(
        res["metrics"]["model"]["auroc"] - res["metrics"]["reader_1"]["auroc"]
    )
    at_half = res["metrics"]["model"]["operating_points"][0]
    called, cancer = df["model"] >= 0.5, df["cancer"] == 1
    assert (at_half["tp"], at_half["fp"]) == (int((called & cancer).sum()), int((called & ~cancer).sum()))
    assert "| reader_1 |" in md.read_text()
    assert (tmp_path / "plots" / "roc.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "pr.png").stat().st_size > 1000


def test_evaluate_breast_group_and_ensemble(tmp_path: Path, sk_metrics) -> None:  # type: ignore[no-untyped-def]
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
    expected = sk_metrics.roc_auc_score(breast_a["malignant_label"].max(), breast_a["model_a"].mean())
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


def test_hybrid_uses_each_readers_own_cases(tmp_path: Path, sk_metrics) -> None:  # type: ignore[no-untyped-def]
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
    assert res["hybrid"]["reader_1"]["0.5"] == pytest.approx(sk_metrics.roc_auc_score(df["cancer"], full))
    assert res["hybrid"]["reader_2"]["0.5"] == pytest.approx(
        sk_metrics.roc_auc_score(df["cancer"][40:], half)
    )
    assert res["metrics"]["reader_2"]["n"] == 40
