"""Bootstrap CIs and paired comparisons (common/stats.py) against scipy and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from common.stats import bootstrap_ci, paired_bootstrap, resample_indices


def test_bootstrap_ci_matches_scipy_percentile_exactly():
    x = np.random.default_rng(0).normal(size=40)
    ours = bootstrap_ci(x, np.mean, n_resamples=500, seed=7)
    ref = sps.bootstrap((x,), np.mean, n_resamples=500, method="percentile", vectorized=False,
                        rng=np.random.default_rng(7)).confidence_interval
    assert ours == pytest.approx((ref.low, ref.high), abs=1e-12)
    ours90 = bootstrap_ci(x, np.median, n_resamples=300, seed=1, alpha=0.1)
    ref90 = sps.bootstrap((x,), np.median, n_resamples=300, method="percentile", confidence_level=0.9,
                          vectorized=False, rng=np.random.default_rng(1)).confidence_interval
    assert ours90 == pytest.approx((ref90.low, ref90.high), abs=1e-12)


def test_bootstrap_ci_is_percentile_of_hand_resamples():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    idx = np.random.default_rng(5).integers(0, 4, (50, 4))
    values = x[idx].mean(axis=1)
    expected = tuple(np.quantile(values, [0.025, 0.975]))
    assert bootstrap_ci(x, np.mean, n_resamples=50, seed=5) == pytest.approx(expected)


def test_constant_data_gives_a_point_interval_and_rows_are_resampled_whole():
    assert bootstrap_ci(np.full(10, 3.0), np.mean) == (3.0, 3.0)
    pairs = np.stack([np.arange(6.0), np.arange(6.0)], 1)  # columns stay paired within a row
    assert bootstrap_ci(pairs, lambda s: float(np.abs(s[:, 0] - s[:, 1]).max()), n_resamples=50) == (0.0, 0.0)


def test_strata_keep_their_members_and_sizes():
    strata = np.array(["b", "a", "b", "a", "a", "c"])
    idx = resample_indices(6, 100, np.random.default_rng(0), strata)
    assert idx.shape == (100, 6)
    # columns are laid out per stratum in sorted order: a (3), b (2), c (1)
    assert np.isin(idx[:, :3], [1, 3, 4]).all() and np.isin(idx[:, 3:5], [0, 2]).all() and (idx[:, 5] == 5).all()
    # stratum means are fixed when each stratum is constant -> a stratified mean of means has zero-width CI
    data = np.array([5.0, 1.0, 5.0, 1.0, 1.0, 9.0])

    def mean_of_strata(s: np.ndarray) -> float:
        return float(np.mean([s[s == v].mean() for v in np.unique(s)]))

    assert bootstrap_ci(data, mean_of_strata, n_resamples=200, strata=strata) == pytest.approx((5.0, 5.0))
    lo, hi = bootstrap_ci(data, np.mean, n_resamples=200)  # unstratified: the mix changes
    assert hi - lo > 1.0


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1.0, 2.0], np.mean, alpha=1.5)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([1.0, 2.0], np.mean, n_resamples=0)
    with pytest.raises(ValueError, match="strata has 1 labels but data has 2 rows"):
        bootstrap_ci([1.0, 2.0], np.mean, strata=["a"])
    with pytest.raises(ValueError, match="same number of rows"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one row"):
        bootstrap_ci([], np.mean)


def test_paired_bootstrap_degenerate_cases():
    a = np.random.default_rng(0).random(20)
    same = paired_bootstrap(a, a, n_resamples=99)
    assert (same.diff, same.lo, same.hi, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    shifted = paired_bootstrap(a + 1.0, a, n_resamples=99)
    assert shifted.diff == pytest.approx(1.0)
    assert (shifted.lo, shifted.hi) == pytest.approx((1.0, 1.0))
    assert shifted.p_value == pytest.approx(1 / 100)  # no resample is as far from d as 0 is


def test_paired_bootstrap_ci_equals_bootstrap_of_differences():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=50), rng.normal(size=50)
    res = paired_bootstrap(a, b, n_resamples=400, seed=4)
    assert res.diff == pytest.approx(a.mean() - b.mean())
    assert (res.lo, res.hi) == pytest.approx(bootstrap_ci(a - b, np.mean, n_resamples=400, seed=4))


def test_paired_bootstrap_p_value_tracks_the_paired_t_test():
    rng = np.random.default_rng(3)
    b = rng.normal(size=300)
    for effect in (0.0, 0.1, 0.2):
        a = b + effect + rng.normal(scale=1.0, size=300)
        p_boot = paired_bootstrap(a, b, n_resamples=2000, seed=0).p_value
        p_t = sps.ttest_rel(a, b).pvalue
        assert abs(p_boot - p_t) < 0.05, (effect, p_boot, p_t)
