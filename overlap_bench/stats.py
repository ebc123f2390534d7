"""Statistics for comparing two samples of throughput (tokens/s: higher is better): one robust statistic, the
ratio of medians, its bootstrap CI and p-value from the same bootstrap, and a verdict that follows the CI."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

MIN_EFFECT = 0.01
"""Smallest relative change called faster or slower (a noise floor): ``compare --min-effect``, and the
confirmation stage's margin (a setting ships where its CI lower bound exceeds ``1 + MIN_EFFECT``)."""

VERDICTS = ("faster", "slower", "no significant difference", "below min_effect")


def _sample(x: Iterable[float], name: str) -> np.ndarray:
    arr = np.asarray(list(x), dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"sample {name} must be a non-empty 1-D sequence")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"sample {name} contains NaN or inf")
    return arr


def _median_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``median(b) / median(a)`` along the last axis (one sample, or a batch of resamples)."""
    return np.median(b, axis=-1) / np.median(a, axis=-1)


def _bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int, alpha: float, seed: int) -> tuple[np.ndarray, float, float]:
    """The bootstrap distribution of ``median(b) / median(a)`` (each side resampled independently) and its
    percentile CI. Not ``scipy.stats.bootstrap``: it refuses one-observation samples (``--repeats 1``)."""
    rng = np.random.default_rng(seed)
    dist = _median_ratio(a[rng.integers(0, a.size, size=(n_boot, a.size))],
                         b[rng.integers(0, b.size, size=(n_boot, b.size))])
    lo, hi = np.quantile(dist, [alpha / 2, 1 - alpha / 2])
    return dist, float(lo), float(hi)


def bootstrap_ratio_ci(a: Iterable[float], b: Iterable[float], *, n_boot: int = 10000, alpha: float = 0.05,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap ``1 - alpha`` CI of ``median(b) / median(a)``, each side resampled independently."""
    a, b = _sample(a, "a"), _sample(b, "b")
    return _bootstrap(a, b, n_boot, alpha, seed)[1:]


@dataclass(frozen=True)
class Comparison:
    """B against A: ``speedup = median_b / median_a`` with the bootstrap CI of that same ratio, the p-value
    read off the same bootstrap distribution, and a verdict that follows the CI."""

    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    median_a: float
    median_b: float
    std_a: float
    std_b: float
    speedup: float
    ci_low: float
    ci_high: float
    p_value: float
    verdict: str


def _std(x: np.ndarray) -> float:
    return float(x.std(ddof=1)) if x.size > 1 else 0.0


def compare_samples(a: Iterable[float], b: Iterable[float], *, min_effect: float = MIN_EFFECT, alpha: float = 0.05,
                    n_boot: int = 10000, seed: int = 0) -> Comparison:
    """Compare throughput sample ``b`` against ``a`` with one robust statistic, the ratio of medians.

    ``faster``/``slower``: the CI excludes 1 on that side and the speedup is beyond ``min_effect`` (a
    relative change, 0.01 = 1%); ``below min_effect``: the CI excludes 1 but the change is smaller;
    ``no significant difference``: the CI holds 1. The two-sided p-value is the bootstrap's
    ``2 * min(P(ratio <= 1), P(ratio >= 1))``, so ``p < alpha`` exactly when the CI leaves 1 out (up to the
    quantiles' interpolation), never against it.
    """
    a, b = _sample(a, "a"), _sample(b, "b")
    speedup = float(_median_ratio(a, b))
    if min(a.size, b.size) < 2:  # one measurement has no spread: no CI, nothing significant
        lo = hi = math.nan
        p = 1.0
    else:
        dist, lo, hi = _bootstrap(a, b, n_boot, alpha, seed)
        p = min(1.0, 2 * float(min(np.mean(dist <= 1), np.mean(dist >= 1))))
    if lo > 1 and speedup - 1 > min_effect:
        verdict = "faster"
    elif hi < 1 and 1 - speedup > min_effect:
        verdict = "slower"
    elif not lo > 1 and not hi < 1:  # the CI holds 1 (or there is none)
        verdict = "no significant difference"
    else:
        verdict = "below min_effect"
    return Comparison(
        n_a=int(a.size), n_b=int(b.size),
        mean_a=float(a.mean()), mean_b=float(b.mean()),
        median_a=float(np.median(a)), median_b=float(np.median(b)),
        std_a=_std(a), std_b=_std(b),
        speedup=speedup, ci_low=lo, ci_high=hi, p_value=p, verdict=verdict,
    )


def geomean(values: Iterable[float]) -> float:
    """Geometric mean of positive values (``scipy.stats.gmean``; NaN for an empty input)."""
    from scipy.stats import gmean

    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return math.nan
    if np.any(arr <= 0) or not np.all(np.isfinite(arr)):
        raise ValueError("geomean needs finite positive values")
    return float(gmean(arr))
