"""Metrics against scikit-learn on random data, bootstrap behaviour, hybrid and ensemble by hand.

The hand-calculated cases need numpy only and always run. The scikit-learn cases take the ``sk_metrics``
fixture (tests/conftest.py): without scikit-learn they skip locally and fail under CI (a dev dependency).
"""

from __future__ import annotations

import numpy as np
import pytest
from reference_metrics import independent_paired_bootstrap

from mammogmic.evaluation import metrics as m


def _random_case(rng: np.random.Generator, n: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    while True:
        y = rng.integers(0, 2, n)
        if 0 < y.sum() < n:
            break
    s = rng.random(n) + 0.4 * y
    if ties:
        s = np.round(s, 1)
    return y, s


@pytest.mark.parametrize("ties", [False, True])
def test_areas_equal_sklearn(ties: bool, sk_metrics) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    for _ in range(50):
        y, s = _random_case(rng, int(rng.integers(2, 200)), ties)
        precision, recall, _ = sk_metrics.precision_recall_curve(y, s)
        assert m.auroc(y, s) == pytest.approx(sk_metrics.roc_auc_score(y, s), abs=1e-12)
        assert m.auprc(y, s) == pytest.approx(sk_metrics.auc(recall, precision), abs=1e-12)
        assert m.average_precision(y, s) == pytest.approx(sk_metrics.average_precision_score(y, s), abs=1e-12)


def test_curves_equal_sklearn(sk_metrics) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    y, s = _random_case(rng, 300, ties=True)
    fpr, tpr, _ = m.roc_curve(y, s)
    sk_fpr, sk_tpr, _ = sk_metrics.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    recall, precision, _ = m.pr_curve(y, s)
    sk_p, sk_r, _ = sk_metrics.precision_recall_curve(y, s)
    np.testing.assert_allclose(recall, sk_r[::-1])
    np.testing.assert_allclose(precision, sk_p[::-1])


def test_hand_made_auroc_with_tie() -> None:
    # Positives 0.9 and 0.5, negatives 0.5 and 0.1: pairs won 1 + 1 + 0.5 (tie) + 1 of 4.
    assert m.auroc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(3.5 / 4)


def test_hand_made_areas_with_ties() -> None:
    # 3 cancers (0.9, 0.7, 0.4), 5 negatives (0.7, 0.4, 0.3, 0.2, 0.1). Pairs won of 15:
    # 0.9 beats all 5; 0.7 ties one and beats 4 (4.5); 0.4 ties one and beats 3 (3.5): 13 / 15.
    y = [1, 1, 1, 0, 0, 0, 0, 0]
    s = [0.9, 0.7, 0.4, 0.7, 0.4, 0.3, 0.2, 0.1]
    assert m.auroc(y, s) == pytest.approx(13 / 15, abs=1e-15)
    # Distinct thresholds 0.9 / 0.7 / 0.4 give (recall, precision) (1/3, 1), (2/3, 2/3), (1, 3/5).
    assert m.average_precision(y, s) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3, abs=1e-15)  # 34/45
    # Trapezoids from (0, 1): (1 + 1)/2, (1 + 2/3)/2, (2/3 + 3/5)/2, each over a recall step of 1/3.
    assert m.auprc(y, s) == pytest.approx((1 + 5 / 6 + 19 / 30) / 3, abs=1e-15)  # 37/45
    fpr, tpr, thresholds = m.roc_curve(y, s)
    np.testing.assert_allclose(thresholds[1:4], [0.9, 0.7, 0.4])
    np.testing.assert_allclose(fpr[:4], [0, 0, 1 / 5, 2 / 5])
    np.testing.assert_allclose(tpr[:4], [0, 1 / 3, 2 / 3, 1])


def test_hand_made_bootstrap_interval() -> None:
    """The CI is read at order statistics int(0.025 n) and int(0.975 n) of the valid resamples' values."""
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0])
    s = y + np.arange(10) / 100  # every cancer above every negative: AUROC 1 on every two-class resample
    res = m.bootstrap_metric(y, s, n_resamples=50, seed=0)
    assert res.ci["auroc"] == (1.0, 1.0)
    assert res.n_valid == 50  # P(one class in 10 draws) = 2 / 2**10: none of 50 here
    flipped = m.bootstrap_metric(y, -s, n_resamples=50, seed=0)
    assert flipped.ci["auroc"] == (0.0, 0.0) and flipped.estimate["auroc"] == 0.0


def test_single_class_gives_nan() -> None:
    assert np.isnan(m.auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    res = m.bootstrap_metric([0] * 10, np.linspace(0, 1, 10))
    assert np.isnan(res.ci["auroc"][0])


def test_bad_labels_rejected() -> None:
    with pytest.raises(ValueError, match="0 or 1"):
        m.auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="differ in length"):
        m.auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        m.auroc([0, 1], [0.1, np.nan])


def test_bootstrap_ci_contains_estimate_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(2)
    widths = []
    for n in (100, 2500):
        y, s = _random_case(rng, n, ties=False)
        res = m.bootstrap_metric(y, s, n_resamples=500, seed=3)
        for key in m.METRICS:
            low, high = res.ci[key]
            assert low <= res.estimate[key] <= high
        widths.append(res.ci["auroc"][1] - res.ci["auroc"][0])
    assert widths[1] < widths[0] / 2  # width ~ 1/sqrt(n): 25x the rows → about 1/5 the width


def test_bootstrap_matches_explicit_resampling(sk_metrics) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(4)
    y, s = _random_case(rng, 40, ties=True)
    res = m.bootstrap_metric(y, s, n_resamples=300, seed=11)
    # Rebuild the same resamples with the same generator stream and score them with scikit-learn.
    gen = np.random.default_rng(11)
    idx = gen.integers(0, y.size, size=(300, y.size))
    values = [sk_metrics.roc_auc_score(y[i], s[i]) for i in idx if 0 < y[i].sum() < y.size]
    values = np.sort(values)
    assert res.n_valid == len(values)
    n = len(values)
    assert res.ci["auroc"] == pytest.approx((values[int(0.025 * n)], values[int(0.975 * n)]))


def test_bootstrap_skips_single_class_resamples() -> None:
    y = np.array([1] + [0] * 9)
    s = np.linspace(0, 1, 10)
    res = m.bootstrap_metric(y, s, n_resamples=400, seed=0)
    # P(no positive drawn) = 0.9^10 ≈ 0.349: about 140 ± 10 of 400 resamples must be skipped.
    assert 110 < 400 - res.n_valid < 170


def test_paired_difference_equals_independent_resampling(sk_metrics) -> None:  # type: ignore[no-untyped-def]
    """CI and p-value of the paired bootstrap, rebuilt with numpy draws and scikit-learn AUROCs."""
    rng = np.random.default_rng(8)
    y, a = _random_case(rng, 30, ties=True)
    b = np.round(a + rng.normal(0, 0.3, a.size), 1)
    res = m.paired_auroc_difference(y, a, b, n_resamples=400, seed=5)
    expected = independent_paired_bootstrap(sk_metrics, y, a, b, 400, 5)
    assert res.n_valid == expected["n_valid"]
    assert res.difference == pytest.approx(expected["difference"], abs=1e-12)
    assert res.ci == pytest.approx(expected["ci"], abs=1e-12)
    assert res.p_value == pytest.approx(expected["p_value"], abs=1e-12)
    assert 0 < res.p_value < 1  # a case where the p-value is neither trivial end


def test_paired_difference() -> None:
    rng = np.random.default_rng(5)
    y, s = _random_case(rng, 400, ties=False)
    noise = rng.random(400)
    res = m.paired_auroc_difference(y, s, noise, n_resamples=500, seed=0)
    assert res.difference == pytest.approx(m.auroc(y, s) - m.auroc(y, noise))
    assert res.ci[0] <= res.difference <= res.ci[1]
    assert res.ci[0] > 0 and res.p_value < 0.01
    same = m.paired_auroc_difference(y, s, s, n_resamples=200, seed=0)
    assert same.difference == 0 and same.ci == (0.0, 0.0)


def test_p_values_never_print_as_zero() -> None:
    assert m.format_p_value(0.4617) == "0.462" and m.format_p_value(0.4617, 2) == "0.46"
    assert m.format_p_value(0.0542, 2) == "0.05" and m.format_p_value(1.0, 2) == "1.00"
    # "0.00" would read as certainty:
    assert m.format_p_value(0.0027, 2) == m.format_p_value(0.0027) == "0.003"
    assert m.format_p_value(0.0004) == m.format_p_value(0.0, 2) == "<0.001"
    assert m.format_p_value(float("nan")) == m.format_p_value(None) == "n/a"


def test_sensitivity_specificity_by_hand() -> None:
    rows = m.sensitivity_specificity([1, 1, 0, 0, 0], [0.9, 0.4, 0.6, 0.2, 0.1], [0.5, 0.4])
    assert rows[0]["sensitivity"] == pytest.approx(0.5)
    assert rows[0]["specificity"] == pytest.approx(2 / 3)
    assert (rows[0]["tp"], rows[0]["fp"], rows[0]["tn"], rows[0]["fn"]) == (1, 1, 2, 1)
    # score >= threshold is positive: at 0.4 the cancer scored exactly 0.4 is found.
    assert (rows[1]["tp"], rows[1]["fp"], rows[1]["tn"], rows[1]["fn"]) == (2, 1, 2, 0)


def test_hybrid_by_hand() -> None:
    y = np.array([1, 1, 0, 0])
    reader = np.array([1.0, 0.0, 0.0, 0.0])  # finds one cancer
    model = np.array([0.2, 0.9, 0.1, 0.3])  # misranks the first cancer below a negative
    per_reader, mean = m.hybrid_auroc(y, {"r1": reader}, model, lambdas=[0.0, 0.5, 1.0])
    assert per_reader["r1"][1.0] == pytest.approx(0.75)  # 1 + 1 + 0.5 + 0.5 of 4 pairs
    assert per_reader["r1"][0.0] == pytest.approx(0.75)  # 0.2 > 0.1 only; 0.9 beats both
    # hybrid 0.6, 0.45, 0.05, 0.15: both cancers above both negatives.
    assert per_reader["r1"][0.5] == pytest.approx(1.0)
    assert mean[0.5] == pytest.approx(1.0)
    _, mean2 = m.hybrid_auroc(y, {"a": reader, "b": model}, model, lambdas=[1.0])
    assert mean2[1.0] == pytest.approx(0.75)


def test_ensemble_grid_on_simplex() -> None:
    grid = m.ensemble_weights_grid(3, 0.25)
    assert grid.shape == (15, 3)  # C(4 + 2, 2)
    np.testing.assert_allclose(grid.sum(axis=1), 1.0)
    assert len({tuple(r) for r in grid}) == 15
    with pytest.raises(ValueError):
        m.ensemble_weights_grid(2, 0.3)


def test_ensemble_weights_by_hand() -> None:
    y = np.array([1, 1, 0, 0])
    a = np.array([0.9, 0.1, 0.2, 0.0])  # orders cancer 1 right, cancer 2 wrong
    b = np.array([0.0, 0.9, 0.1, 0.2])  # the opposite
    res = m.fit_ensemble_weights(y, {"a": a, "b": b}, y, {"a": a, "b": b}, step=0.5)
    # Only the equal mix (0.45, 0.5, 0.15, 0.1) separates the classes.
    assert res.weights == [0.5, 0.5]
    assert res.val_auroc == pytest.approx(1.0)
    assert res.test_auroc == pytest.approx(1.0)
    assert res.member_val_auroc["a"] == pytest.approx(0.75)  # 0.1 loses only to 0.2
    one = m.fit_ensemble_weights(y, {"a": a, "good": y * 0.8 + 0.1}, step=0.5)
    assert one.weights[1] >= 0.5 and one.val_auroc == pytest.approx(1.0)


def test_column_metrics_dict_keys() -> None:
    rng = np.random.default_rng(6)
    y, s = _random_case(rng, 50, ties=False)
    d = m.column_metrics(y, s, n_resamples=100, thresholds=[0.5]).to_dict()
    assert {"auroc", "auroc_ci", "auprc", "average_precision", "n", "n_positive"} <= set(d)
    assert d["n"] == 50 and d["n_positive"] == int(y.sum())
    assert len(d["auroc_ci"]) == 2 and len(d["operating_points"]) == 1


def test_threshold_at_by_hand() -> None:
    # Cancers 0.9, 0.7, 0.4; negatives 0.7, 0.4, 0.3, 0.2, 0.1 (thresholds are the distinct scores).
    y = [1, 1, 1, 0, 0, 0, 0, 0]
    s = [0.9, 0.7, 0.4, 0.7, 0.4, 0.3, 0.2, 0.1]
    # Sensitivity >= 0.6 first reached at 0.7 (2 of 3 cancers, 1 false positive): the highest such threshold.
    point = m.threshold_at(y, s, sensitivity=0.6)
    assert (point["threshold"], point["tp"], point["fp"]) == (0.7, 2, 1)
    assert point["sensitivity"] == pytest.approx(2 / 3) and point["specificity"] == pytest.approx(4 / 5)
    point = m.threshold_at(y, s, sensitivity=1.0)
    assert (point["threshold"], point["tp"], point["fp"]) == (0.4, 3, 2)
    # Specificity >= 0.8 allows one false positive: the lowest threshold that keeps it is 0.7.
    point = m.threshold_at(y, s, specificity=0.8)
    assert (point["threshold"], point["tp"], point["fp"]) == (0.7, 2, 1)
    point = m.threshold_at(y, s, specificity=1.0)
    assert (point["threshold"], point["tp"], point["fp"]) == (0.9, 1, 0)
    # Only calling nothing keeps every negative negative: the threshold lies just above the highest score.
    point = m.threshold_at([1, 0], [0.1, 0.9], specificity=1.0)
    assert point["threshold"] > 0.9 and (point["tp"], point["fp"]) == (0, 0)
    with pytest.raises(ValueError, match="exactly one"):
        m.threshold_at(y, s, sensitivity=0.9, specificity=0.9)
    with pytest.raises(ValueError, match="exactly one"):
        m.threshold_at(y, s)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        m.threshold_at(y, s, sensitivity=1.5)
    with pytest.raises(ValueError, match="one class"):
        m.threshold_at([1, 1], [0.2, 0.3], sensitivity=0.9)


@pytest.mark.parametrize("kind", ["roc", "pr"])
def test_curve_bands_equal_an_independent_bootstrap(kind: str, sk_metrics) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(5)
    y, s = _random_case(rng, 40, ties=True)
    n_resamples, seed = 300, 3
    band = (m.roc_band if kind == "roc" else m.pr_band)(y, s, n_resamples=n_resamples, seed=seed, points=51)
    # The same draws as the metric CIs (one (B, n) draw for this size), each curve from scikit-learn.
    idx = np.random.default_rng(seed).integers(0, y.size, size=(n_resamples, y.size))
    grid = np.linspace(0, 1, 51)
    curves = []
    for i in idx:
        if not 0 < y[i].sum() < y.size:
            continue
        if kind == "roc":
            fpr, tpr, _ = sk_metrics.roc_curve(y[i], s[i], drop_intermediate=False)
            curves.append(np.interp(grid, fpr, tpr))
        else:
            precision, recall, _ = sk_metrics.precision_recall_curve(y[i], s[i])
            curves.append(np.interp(grid, recall[::-1], precision[::-1]))
    values = np.sort(np.stack(curves), axis=0)
    k = values.shape[0]
    assert band.n_valid == k
    np.testing.assert_allclose(band.low, values[int(0.025 * k)])
    np.testing.assert_allclose(band.high, values[int(0.975 * k)])
    assert (band.low <= band.high).all()


def test_curve_band_needs_rows_of_both_classes() -> None:
    band = m.roc_band([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.3])  # below min_n = 8
    assert band.n_valid == 0 and np.isnan(band.low).all()
    band = m.pr_band([1] * 10, np.linspace(0, 1, 10))
    assert band.n_valid == 0 and np.isnan(band.high).all()


@pytest.mark.parametrize("n", [2, 3, 5, 12, 40])
def test_paired_t_test_matches_scipy(n: int) -> None:
    from scipy import stats  # a dev dependency: present wherever the tests run

    rng = np.random.default_rng(n)
    a, b = rng.normal(size=n), rng.normal(size=n) + 0.4
    ours, ref = m.paired_t_test(a, b), stats.ttest_rel(a, b)
    assert ours.n == n
    assert ours.t == pytest.approx(ref.statistic, rel=1e-10)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-14)
    assert ours.mean_difference == pytest.approx(np.mean(a - b))


def test_paired_t_test_edge_cases() -> None:
    # A pair with a non-finite value is dropped; one pair left gives no test.
    one = m.paired_t_test([0.9, np.nan], [0.8, 0.7])
    assert one.n == 1 and one.mean_difference == pytest.approx(0.1) and np.isnan(one.p_value)
    # Equal non-zero differences: no spread, the difference is certain; all zero: no difference at all.
    assert m.paired_t_test([1.0, 2.0, 3.0], [0.5, 1.5, 2.5]).p_value == 0.0
    assert m.paired_t_test([1.0, 2.0], [1.0, 2.0]).p_value == 1.0
    with pytest.raises(ValueError, match="one length"):
        m.paired_t_test([1.0, 2.0], [1.0])
