"""Bootstrap statistics shared by the benchmarks: percentile CIs and paired comparisons.

Resampling is over the first axis of ``data`` (one row = one independent unit: an image, or a prompt with all its
images aggregated into the row). ``strata`` resamples within each stratum, keeping its size (e.g. GenEval tasks,
so every resample keeps the task mix). Without strata the indices are drawn exactly as
``scipy.stats.bootstrap(..., method="percentile")`` draws them from the same ``numpy`` Generator, so the two agree
to the last bit (tested).
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


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])  # linear interpolation, as scipy
    return float(lo), float(hi)


def bootstrap_ci(data, statistic: Callable[[np.ndarray], float], n_resamples: int = 1000, seed: int = 0,
                 alpha: float = 0.05, strata=None) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` CI of ``statistic(data)``.

    data: array ``(N, ...)``, resampled along axis 0; statistic: maps an ``(N, ...)`` resample to a float;
    strata: optional length-N labels, resampled within. Returns ``(lo, hi)``.
    """
    data = np.asarray(data)
    strata = None if strata is None else np.asarray(strata)
    _check(len(data), n_resamples, alpha, strata)
    idx = resample_indices(len(data), n_resamples, np.random.default_rng(seed), strata)
    values = np.array([statistic(data[i]) for i in idx], dtype=float)
    return _percentile_interval(values, alpha)


@dataclass(frozen=True)
class PairedResult:
    """``diff = statistic(a) - statistic(b)``, its percentile CI ``(lo, hi)`` and a two-sided bootstrap p-value."""

    diff: float
    lo: float
    hi: float
    p_value: float


def paired_bootstrap(a, b, statistic: Callable[[np.ndarray], float] = np.mean, n_resamples: int = 1000,
                     seed: int = 0, alpha: float = 0.05, strata=None) -> PairedResult:
    """Paired bootstrap of ``statistic(a) - statistic(b)``: both arrays resampled with the SAME row indices.

    a, b: arrays ``(N, ...)`` whose row i is the same unit (prompt, seed) under two systems.
    p-value (H0: no difference), two-sided, from the bootstrap distribution shifted to the null:
    ``p = (1 + #{|d*_r - d| >= |d|}) / (1 + n_resamples)``; the +1 keeps p > 0 with finite resamples.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired samples need the same number of rows, got {a.shape[0]} and {b.shape[0]}")
    strata = None if strata is None else np.asarray(strata)
    _check(len(a), n_resamples, alpha, strata)
    diff = float(statistic(a) - statistic(b))
    idx = resample_indices(len(a), n_resamples, np.random.default_rng(seed), strata)
    values = np.array([statistic(a[i]) - statistic(b[i]) for i in idx], dtype=float)
    lo, hi = _percentile_interval(values, alpha)
    # tolerance: resamples that equal d up to float rounding count as "as extreme" when d == 0
    extreme = np.abs(values - diff) >= abs(diff) - 1e-12
    p_value = (1 + int(extreme.sum())) / (1 + n_resamples)
    return PairedResult(diff=diff, lo=lo, hi=hi, p_value=min(1.0, p_value))
