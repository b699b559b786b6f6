"""Bootstrap CIs, paired comparisons, the two-level (training seed x prompt) bootstrap, Holm and power
(common/stats.py) against scipy, statsmodels, naive loops and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from common.stats import (
    bootstrap_ci,
    hierarchical_ci,
    hierarchical_indices,
    hierarchical_paired,
    holm,
    min_detectable_difference,
    paired_bootstrap,
    resample_indices,
    seed_mean,
    seed_sd,
)


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


# ---------------------------------------------------------------- two levels: training seeds x prompts
TASKS = np.array([0, 0, 0, 1, 1, 2, 2, 2])  # three strata of prompts (GenEval tasks)


def task_mean(rows: np.ndarray) -> float:
    """A GenEval-like score: mean over tasks of the mean within the task; rows (P, 2) = task id, value."""
    return float(np.mean([rows[rows[:, 0] == t, 1].mean() for t in np.unique(rows[:, 0])]))


def crossed_fixture(n_seeds: int = 3, seed: int = 0) -> np.ndarray:
    """(S, P, 2): every seed scores the same 8 prompts; column 0 the task, column 1 the score."""
    values = np.random.default_rng(seed).random((n_seeds, len(TASKS)))
    return np.stack([np.broadcast_to(TASKS, values.shape), values], -1).astype(float)


def naive_two_level(data: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """The documented draws (prompts within tasks, then seeds), scored by explicit loops over the drawn seeds
    and prompts: one value per resample."""
    rng = np.random.default_rng(seed)
    n_seeds, n_prompts = data.shape[:2]
    members = [np.flatnonzero(TASKS == t) for t in np.unique(TASKS)]
    picks = [m[rng.integers(0, len(m), (n_resamples, len(m)))] for m in members]
    seeds = rng.integers(0, n_seeds, (n_resamples, n_seeds))
    out = []
    for r in range(n_resamples):
        prompts = [int(i) for pick in picks for i in pick[r]]
        scores = []
        for s in seeds[r]:
            rows = np.array([data[s, p] for p in prompts])
            scores.append(task_mean(rows))
        out.append(sum(scores) / len(scores))
    return np.array(out)


def test_hierarchical_ci_equals_a_naive_nested_loop_on_the_same_draws():
    data = crossed_fixture()
    values = naive_two_level(data, 300, seed=11)
    expected = tuple(np.quantile(values, [0.025, 0.975]))
    assert hierarchical_ci(data, task_mean, n_resamples=300, seed=11, strata=TASKS) == pytest.approx(expected,
                                                                                                   abs=1e-12)
    # the score itself: the mean over seeds of the per-seed score
    assert seed_mean(data, task_mean) == pytest.approx(np.mean([task_mean(d) for d in data]))
    assert seed_sd(data, task_mean) == pytest.approx(np.std([task_mean(d) for d in data], ddof=1))
    assert np.isnan(seed_sd(data[:1], task_mean))


def test_hierarchical_paired_equals_the_naive_loop_of_differences():
    a, b = crossed_fixture(seed=1), crossed_fixture(seed=2)
    diff_rows = a.copy()
    diff_rows[..., 1] = a[..., 1] - b[..., 1]  # task_mean is linear in the values: d* = task_mean of differences
    values = naive_two_level(diff_rows, 400, seed=3)
    res = hierarchical_paired(a, b, task_mean, n_resamples=400, seed=3, strata=TASKS)
    d = seed_mean(a, task_mean) - seed_mean(b, task_mean)
    assert res.diff == pytest.approx(d)
    assert (res.lo, res.hi) == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])), abs=1e-12)
    assert res.se == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    assert res.p_value == pytest.approx((1 + np.sum(np.abs(values - d) >= abs(d) - 1e-12)) / 401)


def test_one_seed_is_the_one_level_bootstrap_and_its_draws():
    x = np.random.default_rng(4).normal(size=30)
    assert hierarchical_ci(x[None], np.mean, n_resamples=200, seed=9) == bootstrap_ci(x, np.mean, 200, seed=9)
    prompts, seeds = hierarchical_indices(1, 30, 200, np.random.default_rng(9))
    np.testing.assert_array_equal(prompts, np.random.default_rng(9).integers(0, 30, (200, 30)))  # scipy's draw
    assert (seeds == 0).all()


def test_hierarchical_bootstrap_variance_has_both_components():
    """Additive crossed data y[s, p] = u[s] + v[p]: the two-level mean resamples as mean(u*) + mean(v*) with
    independent draws, so its bootstrap variance is var(u)/S + var(v)/P (population variances) exactly in
    expectation. Drawing prompts anew inside each seed would give var(v)/(P S) instead."""
    rng = np.random.default_rng(5)
    n_seeds, n_prompts = 4, 40
    u, v = rng.normal(scale=0.3, size=n_seeds), rng.normal(scale=1.0, size=n_prompts)
    data = u[:, None] + v[None, :]
    expected = u.var() / n_seeds + v.var() / n_prompts
    prompts, seeds = hierarchical_indices(n_seeds, n_prompts, 6000, np.random.default_rng(6))
    boot = np.array([np.mean([data[s, p].mean() for s in ss]) for p, ss in zip(prompts, seeds, strict=True)])
    assert boot.var() == pytest.approx(expected, rel=0.06)
    assert u.var() / n_seeds > 0.3 * expected  # the seed term is a real share of it: the test can tell them apart
    # and the paired SE of a constant-shift comparison carries exactly the same two components
    res = hierarchical_paired(data + 1.0 + 0.5 * u[:, None], data, n_resamples=6000, seed=6)
    assert res.diff == pytest.approx(1.0 + 0.5 * u.mean())
    assert res.se ** 2 == pytest.approx(0.25 * u.var() / n_seeds, rel=0.06)  # prompts cancel in the pairing


def test_hierarchical_bad_shapes():
    with pytest.raises(ValueError, match=r"\(seeds, prompts, ...\)"):
        hierarchical_ci(np.arange(3.0), np.mean)
    with pytest.raises(ValueError, match="same seeds and rows"):
        hierarchical_paired(np.zeros((2, 5)), np.zeros((3, 5)))


# ---------------------------------------------------------------- Holm
def test_holm_on_a_hand_computed_family():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1
    np.testing.assert_allclose(holm([0.2]), [0.2])  # a family of one is not corrected
    assert holm([]).size == 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, float("nan")])


# ---------------------------------------------------------------- power
def test_min_detectable_difference_known_answers():
    # one test at alpha 0.05, 80% power: the textbook (1.96 + 0.84) standard errors
    assert min_detectable_difference(1.0) == pytest.approx(1.959964 + 0.841621, abs=1e-5)
    assert min_detectable_difference(0.02, n_tests=15) == pytest.approx(0.02 * (sps.norm.ppf(1 - 0.05 / 30)
                                                                              + sps.norm.ppf(0.8)))
    # statsmodels' normal power solver (one sample of size 1 = one estimate with unit SE), both tails included
    from statsmodels.stats.power import NormalIndPower

    for m in (1, 5, 15):
        ref = NormalIndPower().solve_power(effect_size=None, nobs1=1, alpha=0.05 / m, power=0.8, ratio=0)
        assert min_detectable_difference(1.0, n_tests=m) == pytest.approx(ref, abs=1e-4)
    with pytest.raises(ValueError, match="n_tests"):
        min_detectable_difference(1.0, n_tests=0)


def test_min_detectable_difference_has_80_percent_power_in_simulation():
    """Estimates drawn around a true difference of one MDE cross the Bonferroni (Holm's first step) threshold in
    80% of the draws."""
    se, m = 0.03, 15
    mde = min_detectable_difference(se, n_tests=m)
    est = np.random.default_rng(0).normal(mde, se, 200_000)
    p = 2 * sps.norm.sf(np.abs(est) / se)
    assert np.mean(p <= 0.05 / m) == pytest.approx(0.80, abs=0.005)
