"""The interval helpers every result in em_interp uses: a paired t-interval over seeds, a (cluster) percentile
bootstrap of a mean, and a paired percentile bootstrap of a ratio of means.

>>> round(t_interval([0.1, 0.2, 0.3]).estimate, 6)
0.2
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from em_interp.errors import DataError

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval.

    Attributes:
        estimate: the mean (None when there are no finite values).
        low, high: the interval's bounds (None when it cannot be computed, e.g. n < 2).
        n: values (or clusters) it rests on.
        method: how it was computed ("t" or "bootstrap").
        level: its coverage (0.95).
    """

    estimate: float | None
    low: float | None
    high: float | None
    n: int
    method: str
    level: float = LEVEL

    @property
    def bounds(self) -> list[float | None]:
        """[low, high] (the layout `results.json` uses)."""
        return [self.low, self.high]


def _finite(values: Sequence[float] | np.ndarray, where: str) -> np.ndarray:
    arr = np.asarray([np.nan if v is None else v for v in np.ravel(np.asarray(values, dtype=object))], dtype=float)
    if arr.size and not np.isfinite(arr).all():
        raise DataError(f"{where}: values must be finite numbers; got {arr.tolist()}.")
    return arr


def t_interval(values: Sequence[float] | np.ndarray, level: float = LEVEL) -> Interval:
    """Student-t interval of the mean of `values` (e.g. one paired difference per training seed).

    Args:
        values: [n] finite numbers.
        level: coverage, e.g. 0.95.

    Returns:
        An `Interval`; with n < 2 (or all values equal and n ≥ 2: width 0) the bounds follow the formula,
        with n < 2 they are None.

    Raises:
        DataError: a value is not finite.
    """
    from scipy import stats

    arr = _finite(values, "t_interval")
    n = int(arr.size)
    if n == 0:
        return Interval(None, None, None, 0, "t", level)
    mean = float(arr.mean())
    if n < 2:
        return Interval(mean, None, None, n, "t", level)
    half = float(stats.t.ppf(0.5 + level / 2, df=n - 1)) * float(arr.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, "t", level)


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence[Any] | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """Percentile bootstrap of the mean of `values`, resampling whole clusters when `clusters` is given.

    With clusters (e.g. the question each answer belongs to), each resample draws clusters with replacement
    and takes the mean over all their values, so answers to the same question are not treated as independent.

    Args:
        values: [n] finite numbers (e.g. 0/1 flags).
        clusters: [n] a cluster label per value (None: every value is its own cluster).
        n_boot: resamples (0: no interval).
        seed: the resampling seed.
        level: coverage.

    Returns:
        An `Interval` whose `n` counts clusters.

    Raises:
        DataError: lengths differ, n_boot < 0, or a value is not finite.
    """
    arr = _finite(values, "bootstrap_interval")
    if n_boot < 0:
        raise DataError(f"bootstrap_interval: n_boot must be >= 0, got {n_boot}.")
    labels = list(range(arr.size)) if clusters is None else list(clusters)
    if len(labels) != arr.size:
        raise DataError(f"bootstrap_interval: {arr.size} values but {len(labels)} cluster labels.")
    if arr.size == 0:
        return Interval(None, None, None, 0, "bootstrap", level)
    index = {c: i for i, c in enumerate(dict.fromkeys(labels))}
    ids = np.array([index[c] for c in labels])
    k = len(index)
    sums, counts = np.bincount(ids, weights=arr, minlength=k), np.bincount(ids, minlength=k).astype(float)
    mean = float(arr.mean())
    if n_boot == 0:
        return Interval(mean, None, None, k, "bootstrap", level)
    draws = np.random.default_rng(seed).integers(0, k, size=(n_boot, k))
    weights = np.stack([np.bincount(row, minlength=k) for row in draws])  # [n_boot, k] times each cluster is drawn
    boot = (weights @ sums) / (weights @ counts)
    low, high = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)])
    return Interval(mean, float(low), float(high), k, "bootstrap", level)


def bootstrap_ratio(
    numerators: Sequence[float] | np.ndarray,
    denominators: Sequence[float] | np.ndarray,
    *,
    absolute: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """Percentile bootstrap of mean(numerators) / mean(denominators) over paired units (e.g. training seeds:
    unit i's numerator and denominator are resampled together).

    Args:
        numerators, denominators: [n] finite numbers, paired by position.
        absolute: use |mean(numerators)| (e.g. a shift's size whatever its sign).
        n_boot: resamples (0: no interval).
        seed: the resampling seed.
        level: coverage.

    Returns:
        An `Interval` of the ratio (estimate None when mean(denominators) ≤ 0). Resamples whose denominator mean is
        ≤ 0 are left out; when they are more than (1 − level) / 2 of all, the bounds are None.

    Raises:
        DataError: lengths differ, n_boot < 0, or a value is not finite.
    """
    num, den = _finite(numerators, "bootstrap_ratio"), _finite(denominators, "bootstrap_ratio")
    if num.size != den.size:
        raise DataError(f"bootstrap_ratio: {num.size} numerators but {den.size} denominators.")
    if n_boot < 0:
        raise DataError(f"bootstrap_ratio: n_boot must be >= 0, got {n_boot}.")
    n = int(num.size)

    def ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
        top = np.abs(top) if absolute else top
        return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), np.nan)

    if n == 0:
        return Interval(None, None, None, 0, "bootstrap", level)
    estimate = float(ratio(np.array([num.mean()]), np.array([den.mean()]))[0])
    estimate_or_none = None if math.isnan(estimate) else estimate
    if n_boot == 0 or n < 2:
        return Interval(estimate_or_none, None, None, n, "bootstrap", level)
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = ratio(num[draws].mean(axis=1), den[draws].mean(axis=1))
    if np.isnan(boot).mean() > (1 - level) / 2:
        return Interval(estimate_or_none, None, None, n, "bootstrap", level)
    low, high = np.nanpercentile(boot, [50 * (1 - level), 50 * (1 + level)])
    return Interval(estimate_or_none, float(low), float(high), n, "bootstrap", level)
