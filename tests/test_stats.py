"""emokern.stats against SciPy and against planted signals; the NaN rule of the correlations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emokern.stats import (
    bootstrap_ci,
    fdr_bh,
    kendall_tau_b_many,
    pearson,
    ridge_cv_predict,
    rsa_permutation,
    spearman,
)

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("alternative", ["greater", "two-sided"])
def test_kendall_tau_b_matches_scipy_with_ties(alternative):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 30))
    x[1, :6] = x[1, 0]  # ties in x
    x[2, ::2] = 0.5
    y = np.round(rng.normal(size=(4, 30)), 1)  # ties in y
    tau, p = kendall_tau_b_many(x, y, chunk=4, alternative=alternative)
    for a in range(6):
        for b in range(4):
            ref = scipy_stats.kendalltau(x[a], y[b], method="asymptotic",
                                         alternative=alternative)
            assert tau[a, b] == pytest.approx(ref.statistic, abs=1e-12)
            assert p[a, b] == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)


def test_kendall_constant_row_is_nan_with_p_one():
    tau, p = kendall_tau_b_many(np.ones((1, 10)), np.arange(10.0)[None])
    assert np.isnan(tau[0, 0]) and p[0, 0] == 1.0


def test_spearman_pearson_fdr_match_scipy():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=50), rng.normal(size=50)
    y[:10] = np.round(y[:10])
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(scipy_stats.pearsonr(x, y).statistic, abs=1e-12)
    p = rng.uniform(size=200) ** 3
    assert np.allclose(fdr_bh(p), scipy_stats.false_discovery_control(p), atol=1e-12)


def test_rsa_permutation_detects_shared_structure_and_not_noise():
    rng = np.random.default_rng(2)
    points = rng.normal(size=(12, 2))
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)
    rho, p = rsa_permutation(dist, dist + 0.01 * rng.random((12, 12)).clip(0), n_perm=999)
    assert rho > 0.95 and p <= 0.002
    other = rng.normal(size=(12, 2))
    noise = np.linalg.norm(other[:, None] - other[None], axis=-1)
    _, p_noise = rsa_permutation(dist, noise, n_perm=999)
    assert p_noise > 0.01


def test_ridge_cv_recovers_a_linear_signal_and_does_not_leak():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 12))
    y = x @ rng.normal(size=12) + 0.5 * rng.normal(size=400)
    pred, alphas = ridge_cv_predict(x, y, folds=10)
    assert pearson(pred, y) > 0.9 and len(alphas) == 10
    noise = rng.normal(size=400)
    pred_noise, _ = ridge_cv_predict(x, noise, folds=10)
    assert pearson(pred_noise, noise) < 0.15  # held-out rows: no fitting of the noise
    with pytest.raises(ValueError, match="at least 10 rows"):
        ridge_cv_predict(x[:5], y[:5])


def test_bootstrap_ci_brackets_the_estimate():
    rng = np.random.default_rng(4)
    x = rng.normal(size=300)
    y = x + rng.normal(size=300)
    lo, hi = bootstrap_ci(x, y, n_boot=500)
    assert lo < pearson(x, y) < hi and hi - lo < 0.25
    lo_s, hi_s = bootstrap_ci(x, y, n_boot=200, stat=spearman)
    assert lo_s < spearman(x, y) < hi_s


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    y[3] = np.nan
    ok = np.isfinite(y)
    assert pearson(x, y) == pytest.approx(scipy_stats.pearsonr(x[ok], y[ok])[0])
    ties = np.round(x, 0)
    assert spearman(ties, y) == pytest.approx(scipy_stats.spearmanr(ties[ok], y[ok])[0])
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2], [1, 2]))
    assert math.isnan(pearson([1.0, np.nan, 2.0, 3.0], [1.0, 2.0, np.inf, 4.0]))  # 2 pairs left
    assert spearman([1.0, np.nan, 2.0, 3.0, 5.0], [2.0, 0.0, 3.0, 4.0, 1.0]) == pytest.approx(
        scipy_stats.spearmanr([1, 2, 3, 5], [2, 3, 4, 1]).statistic)
    with pytest.raises(ValueError, match="same length"):
        pearson([1, 2, 3], [1, 2])
