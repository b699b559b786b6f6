"""Bootstrap statistics shared by the benchmarks: percentile CIs, paired comparisons, Holm, power.

Two levels. A run trained with several training seeds is scored on the same prompts (and sampling seeds) under
every seed, so its data is an array ``(S, P, ...)``: seed s, prompt p. The run's score is the mean over its seeds
of ``statistic(data[s])``. The hierarchical bootstrap draws, for every resample, the prompts (rows of axis 1,
within strata such as GenEval tasks) and then the training seeds (with replacement), and scores the drawn prompts
under every drawn seed. Prompts are crossed with seeds, not nested in them (each seed sees the same prompts), so
one prompt draw serves all the seeds of a resample: drawing prompts anew inside each seed would divide the prompt
variance by the number of seeds and make the intervals too narrow. With a single seed only prompts vary: the
interval then says nothing about training variance ("prompt-level CI only").

Prompt indices are drawn first, exactly as ``scipy.stats.bootstrap(..., method="percentile")`` draws them from the
same ``numpy`` Generator (without strata), so a one-seed bootstrap agrees with scipy to the last bit (tested); the
seed indices come after them from the same Generator.

Multiple comparisons: ``holm`` (statsmodels' ``multipletests``). Power: ``min_detectable_difference``, a normal
approximation around the bootstrap standard error of a difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def _check(n: int, n_resamples: int, alpha: float, strata: np.ndarray | None) -> None:
    if n < 1:
        raise ValueError("bootstrap needs at least one row of data")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if strata is not None and len(strata) != n:
        raise ValueError(f"strata has {len(strata)} labels but data has {n} rows")


def resample_indices(n: int, n_resamples: int, rng: np.random.Generator, strata=None) -> np.ndarray:
    """Bootstrap row indices, int ``(n_resamples, n)``.

    Without strata: ``rng.integers(0, n, (n_resamples, n))`` (scipy's draw). With strata: for each stratum in
    sorted label order, its rows are drawn with replacement among themselves; columns keep the strata's order.
    """
    if strata is None:
        return rng.integers(0, n, (n_resamples, n))
    labels = np.asarray(strata)
    cols = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        cols.append(members[rng.integers(0, len(members), (n_resamples, len(members)))])
    return np.concatenate(cols, axis=1)


def hierarchical_indices(n_seeds: int, n_prompts: int, n_resamples: int, rng: np.random.Generator,
                         strata=None) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt indices (R, P), seed indices (R, S))`` of a two-level bootstrap: the prompts first (as
    ``resample_indices``, within ``strata``), then ``rng.integers(0, S, (R, S))`` for the training seeds."""
    prompts = resample_indices(n_prompts, n_resamples, rng, strata)
    return prompts, rng.integers(0, n_seeds, (n_resamples, n_seeds))


def seed_mean(data, statistic: Callable[[np.ndarray], float]) -> float:
    """A run's score: the mean over training seeds of ``statistic(data[s])``; data ``(S, P, ...)``."""
    return float(np.mean([statistic(d) for d in np.asarray(data)]))


def seed_sd(data, statistic: Callable[[np.ndarray], float]) -> float:
    """Seed-to-seed standard deviation (ddof 1) of ``statistic(data[s])``; NaN with a single seed."""
    values = [statistic(d) for d in np.asarray(data)]
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def _replicates(arrays: list[np.ndarray], statistic: Callable[[np.ndarray], float], prompt_idx: np.ndarray,
                seed_idx: np.ndarray) -> list[np.ndarray]:
    """For each ``(S, P, ...)`` array: the resampled score of every resample, ``(R,)``, using the same draws."""
    out = [np.empty(len(prompt_idx)) for _ in arrays]
    for r, (p, s) in enumerate(zip(prompt_idx, seed_idx, strict=True)):
        for values, data in zip(out, arrays, strict=True):
            per_seed = np.array([statistic(d[p]) for d in data], dtype=float)  # each seed once, then the draw
            values[r] = per_seed[s].mean()
    return out


def _two_level(data, strata) -> tuple[np.ndarray, np.ndarray | None]:
    data = np.asarray(data)
    if data.ndim < 2:
        raise ValueError(f"two-level data must be (seeds, prompts, ...), got shape {data.shape}")
    if data.shape[0] < 1:
        raise ValueError("two-level data needs at least one training seed")
    return data, None if strata is None else np.asarray(strata)


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])  # linear interpolation, as scipy
    return float(lo), float(hi)


def hierarchical_ci(data, statistic: Callable[[np.ndarray], float], n_resamples: int = 1000, seed: int = 0,
                    alpha: float = 0.05, strata=None) -> tuple[float, float]:
    """Percentile ``(1 - alpha)`` CI of ``seed_mean(data, statistic)`` from the two-level bootstrap.

    data: ``(S, P, ...)`` (seed, prompt); statistic: maps a ``(P, ...)`` resample of one seed to a float;
    strata: optional length-P labels, prompts resampled within them. Returns ``(lo, hi)``.
    """
    data, strata = _two_level(data, strata)
    _check(data.shape[1], n_resamples, alpha, strata)
    idx = hierarchical_indices(data.shape[0], data.shape[1], n_resamples, np.random.default_rng(seed), strata)
    return _percentile_interval(_replicates([data], statistic, *idx)[0], alpha)


def bootstrap_ci(data, statistic: Callable[[np.ndarray], float], n_resamples: int = 1000, seed: int = 0,
                 alpha: float = 0.05, strata=None) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` CI of ``statistic(data)``: one level (``hierarchical_ci`` of a single
    seed).

    data: array ``(N, ...)``, resampled along axis 0; statistic: maps an ``(N, ...)`` resample to a float;
    strata: optional length-N labels, resampled within. Returns ``(lo, hi)``.
    """
    return hierarchical_ci(np.asarray(data)[None], statistic, n_resamples, seed, alpha, strata)


@dataclass(frozen=True)
class PairedResult:
    """``diff`` = score(a) - score(b), its percentile CI ``(lo, hi)``, a two-sided bootstrap p-value and the
    bootstrap standard error ``se`` of the difference."""

    diff: float
    lo: float
    hi: float
    p_value: float
    se: float


def hierarchical_paired(a, b, statistic: Callable[[np.ndarray], float] = np.mean, n_resamples: int = 1000,
                        seed: int = 0, alpha: float = 0.05, strata=None) -> PairedResult:
    """Paired two-level bootstrap of ``seed_mean(a) - seed_mean(b)``: both runs resampled with the SAME prompt
    and seed indices.

    a, b: ``(S, P, ...)`` whose ``[s, p]`` is the same training seed and prompt under two systems (pair them on the
    seeds and prompts both have). p-value (H0: no difference), two-sided, from the bootstrap distribution shifted
    to the null: ``p = (1 + #{|d*_r - d| >= |d|}) / (1 + n_resamples)``; the +1 keeps p > 0 with finite resamples.
    """
    a, strata = _two_level(a, strata)
    b, _ = _two_level(b, None)
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"paired samples need the same seeds and rows, got shapes {a.shape} and {b.shape}")
    _check(a.shape[1], n_resamples, alpha, strata)
    diff = seed_mean(a, statistic) - seed_mean(b, statistic)
    idx = hierarchical_indices(a.shape[0], a.shape[1], n_resamples, np.random.default_rng(seed), strata)
    va, vb = _replicates([a, b], statistic, *idx)
    values = va - vb
    lo, hi = _percentile_interval(values, alpha)
    # tolerance: resamples that equal d up to float rounding count as "as extreme" when d == 0
    extreme = np.abs(values - diff) >= abs(diff) - 1e-12
    p_value = (1 + int(extreme.sum())) / (1 + n_resamples)
    se = float(np.std(values, ddof=1)) if n_resamples > 1 else float("nan")
    return PairedResult(diff=diff, lo=lo, hi=hi, p_value=min(1.0, p_value), se=se)


def paired_bootstrap(a, b, statistic: Callable[[np.ndarray], float] = np.mean, n_resamples: int = 1000,
                     seed: int = 0, alpha: float = 0.05, strata=None) -> PairedResult:
    """Paired bootstrap of ``statistic(a) - statistic(b)`` over rows (one training seed: ``hierarchical_paired``
    of ``a[None]``, ``b[None]``).

    a, b: arrays ``(N, ...)`` whose row i is the same unit (prompt, seed) under two systems.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired samples need the same number of rows, got {a.shape[0]} and {b.shape[0]}")
    return hierarchical_paired(a[None], b[None], statistic, n_resamples, seed, alpha, strata)


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values of one family of tests (statsmodels ``multipletests(method="holm")``), in the
    input's order: a test is significant at level alpha when its adjusted p is <= alpha."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=float)
    if p.size == 0:
        return p
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    return multipletests(p, method="holm")[1]


def min_detectable_difference(se: float, n_tests: int = 1, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true difference a two-sided test finds with probability ``power`` when its estimate is normal with
    standard error ``se``: ``(z_{1 - alpha / (2 m)} + z_power) * se`` for a family of ``m = n_tests`` tests.

    alpha / m is Holm's first (Bonferroni) step: the level a single real difference among m - 1 null ones must
    beat, so for Holm this is slightly conservative when several differences are real. The far tail (an estimate
    significant with the wrong sign) is left out; it changes the result by < 1e-5 se at 80% power.
    """
    from scipy.stats import norm

    if n_tests < 1:
        raise ValueError(f"n_tests must be >= 1, got {n_tests}")
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"alpha and power must lie in (0, 1), got {alpha}, {power}")
    return float((norm.ppf(1 - alpha / (2 * n_tests)) + norm.ppf(power)) * se)
