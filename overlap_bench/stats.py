"""Statistics for comparing two samples of throughput (tokens/s: higher is better)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy as np

VERDICTS = ("faster", "slower", "no significant difference")


def _sample(x: Iterable[float], name: str) -> np.ndarray:
    arr = np.asarray(list(x), dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"sample {name} must be a non-empty 1-D sequence")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"sample {name} contains NaN or inf")
    return arr


def bootstrap_ratio_ci(a: Iterable[float], b: Iterable[float], *, n_boot: int = 10000, alpha: float = 0.05,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap ``1 - alpha`` CI of ``mean(b) / mean(a)``, each side resampled independently."""
    a, b = _sample(a, "a"), _sample(b, "b")
    rng = np.random.default_rng(seed)
    ma = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1)
    mb = b[rng.integers(0, b.size, size=(n_boot, b.size))].mean(axis=1)
    ratios = mb / ma
    lo, hi = np.quantile(ratios, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def mann_whitney_p(a: Iterable[float], b: Iterable[float]) -> float:
    """Two-sided Mann-Whitney U p-value (scipy: exact for small tie-free samples); 1.0 if all values are equal."""
    from scipy.stats import mannwhitneyu

    a, b = _sample(a, "a"), _sample(b, "b")
    both = np.concatenate([a, b])
    if np.all(both == both[0]):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(mannwhitneyu(a, b, alternative="two-sided").pvalue)
    return 1.0 if math.isnan(p) else min(p, 1.0)


@dataclass(frozen=True)
class Comparison:
    """B against A: ``speedup = mean_b / mean_a`` with its bootstrap CI and a Mann-Whitney p-value."""

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


def compare_samples(a: Iterable[float], b: Iterable[float], *, min_effect: float = 0.01, alpha: float = 0.05,
                    n_boot: int = 10000, seed: int = 0) -> Comparison:
    """Compare throughput sample ``b`` against ``a``.

    ``faster``/``slower`` need all three: ``p < alpha``, the CI excluding 1 on that side, and a speedup
    beyond ``min_effect`` (a relative change, 0.01 = 1%); anything else is ``no significant difference``.
    """
    a, b = _sample(a, "a"), _sample(b, "b")
    speedup = float(b.mean() / a.mean())
    lo, hi = bootstrap_ratio_ci(a, b, n_boot=n_boot, alpha=alpha, seed=seed)
    p = mann_whitney_p(a, b)
    if p < alpha and lo > 1 and speedup - 1 > min_effect:
        verdict = "faster"
    elif p < alpha and hi < 1 and 1 - speedup > min_effect:
        verdict = "slower"
    else:
        verdict = "no significant difference"
    return Comparison(
        n_a=int(a.size), n_b=int(b.size),
        mean_a=float(a.mean()), mean_b=float(b.mean()),
        median_a=float(np.median(a)), median_b=float(np.median(b)),
        std_a=_std(a), std_b=_std(b),
        speedup=speedup, ci_low=lo, ci_high=hi, p_value=p, verdict=verdict,
    )


def geomean(values: Iterable[float]) -> float:
    """Geometric mean of positive values (NaN for an empty input)."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return math.nan
    if np.any(arr <= 0) or not np.all(np.isfinite(arr)):
        raise ValueError("geomean needs finite positive values")
    return float(np.exp(np.log(arr).mean()))
