"""Comparing two throughput samples (higher is better): the ratio of medians, its bootstrap, and the one decision
rule (:func:`judge`) of ``compare`` and the confirmation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Iterable, Mapping, Sequence

import numpy as np

MIN_EFFECT = 0.01  # smallest relative change called faster or slower (compare --min-effect; the ship margin)
SHIP_ALPHA = 0.01  # the ship rule's one-sided family-wise error (Bonferroni over the candidates confirmed)
MIN_SAMPLES = 5  # fewer on a side: no CI, no verdict, no headline (fewest at compare's two-sided 95%)
SCREEN_TOP = 10  # the screen re-measures the best this many first-pass settings (and the peers) of a bucket
SCREEN_REPEATS = 3  # interleaved pairs per screened setting; their ratios of medians pick the leaders
VERDICTS = ("faster", "slower", "no significant difference", "below min_effect", "too few samples")


def _sample(x: Iterable[float], name: str) -> np.ndarray:
    arr = np.asarray(list(x), dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"sample {name} must be a non-empty 1-D sequence")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"sample {name} contains NaN or inf")
    return arr


def _median(x: np.ndarray) -> np.ndarray:
    """``np.median`` along the last axis, by a sort (several times faster on a batch of short resamples)."""
    s = np.sort(x, axis=-1)
    return (s[..., (x.shape[-1] - 1) // 2] + s[..., x.shape[-1] // 2]) / 2


def resolvable(n_a: int, n_b: int, tail: float, *, paired: bool = False) -> bool:
    """Whether the samples can show a one-sided ``tail``: the most extreme orders (``n + 1`` of ``2 ** n`` pair
    signs, 2 of ``C(n_a + n_b, n_a)`` rankings), which a median's bootstrap cannot tell apart, must be rarer."""
    return (n_a + 1) * 0.5 ** n_a <= tail if paired else 2 / math.comb(n_a + n_b, n_a) <= tail


def fewest(tail: float) -> int:
    """The fewest samples a side that :func:`resolvable` accepts (unpaired) at ``tail``."""
    return next(n for n in range(1, 1000) if resolvable(n, n, tail))


def _distribution(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int, paired: bool,
                  tail: float) -> tuple[np.ndarray, bool]:
    """The sorted bootstrap of ``median(b) / median(a)``, and whether it was paired (by pair index, so a pair's
    shared drift cancels): only for equal lengths whose pairs resolve ``tail``."""
    rng = np.random.default_rng(seed)
    paired = paired and a.size == b.size and resolvable(a.size, b.size, tail, paired=True)
    ia = rng.integers(0, a.size, size=(n_boot, a.size))
    ib = ia if paired else rng.integers(0, b.size, size=(n_boot, b.size))
    return np.sort(_median(b[ib]) / _median(a[ia])), paired


def _bounds(dist: np.ndarray, tail: float) -> tuple[float, float]:
    """The ``ceil(tail * n)``-th smallest and largest of ``n`` sorted ratios (the lower above 1 exactly when the
    p-value's count is below ``tail * n``)."""
    k = max(1, math.ceil(round(tail * dist.size, 9)))
    return float(dist[k - 1]), float(dist[-k])


def bootstrap_ratio_ci(a: Iterable[float], b: Iterable[float], *, n_boot: int = 10000, alpha: float = 0.05,
                       seed: int = 0, paired: bool = False) -> tuple[float, float]:
    """Percentile bootstrap ``1 - alpha`` CI of ``median(b) / median(a)`` (no floor on the sample sizes)."""
    return _bounds(_distribution(_sample(a, "a"), _sample(b, "b"), n_boot, seed, paired, alpha / 2)[0], alpha / 2)


@dataclass(frozen=True)
class Comparison:
    """B against A by :func:`judge`: ``speedup = median_b / median_a``, its bootstrap CI, p-value and verdict."""

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
    confidence: float  # 1 - alpha / family: the level of the interval (or of its lower bound, one-sided)
    paired: bool  # resampled by pair index (asked for, equal lengths, enough pairs), else each side alone

    expected_from: ClassVar[str] = "ci_low"

    @property
    def expected(self) -> float:
        """The speedup to expect, unbiased by picking the best of many: the CI's lower bound."""
        return self.ci_low


def judge(a: Iterable[float], b: Iterable[float], *, min_effect: float = MIN_EFFECT, alpha: float = 0.05,
          one_sided: bool = False, family: int = 1, paired: bool = False, n_boot: int = 10000,
          seed: int = 0) -> Comparison:
    """THE decision rule: throughput ``b`` against ``a`` by the ratio of medians. The tail ``alpha / family``
    (halved two-sided) sets the CI ``[lo, hi]`` and p-value; ``faster`` iff ``lo > 1 + min_effect``, two-sided
    ``slower`` iff ``hi < 1 - min_effect``, ``below min_effect`` where the CI leaves 1 out but not the threshold."""
    a, b = _sample(a, "a"), _sample(b, "b")
    speedup = float(_median(b) / _median(a))
    tail = alpha / family / (1 if one_sided else 2)
    lo = hi = p = math.nan
    used_pairs = False
    if min(a.size, b.size) < MIN_SAMPLES or not resolvable(a.size, b.size, tail):
        verdict = "too few samples"
    else:
        dist, used_pairs = _distribution(a, b, n_boot, seed, paired, tail)
        lo, hi = _bounds(dist, tail)
        at_or_below = int(np.searchsorted(dist, 1.0, side="right"))
        at_or_above = n_boot - int(np.searchsorted(dist, 1.0, side="left"))
        p = at_or_below / n_boot if one_sided else min(1.0, 2 * min(at_or_below, at_or_above) / n_boot)
        if lo > 1 + min_effect:
            verdict = "faster"
        elif not one_sided and hi < 1 - min_effect:
            verdict = "slower"
        elif lo > 1 or (not one_sided and hi < 1):
            verdict = "below min_effect"
        else:
            verdict = "no significant difference"
    std_a, std_b = (float(x.std(ddof=1)) if x.size > 1 else 0.0 for x in (a, b))
    return Comparison(n_a=int(a.size), n_b=int(b.size), mean_a=float(a.mean()), mean_b=float(b.mean()),
                      median_a=float(np.median(a)), median_b=float(np.median(b)), std_a=std_a, std_b=std_b,
                      speedup=speedup, ci_low=lo, ci_high=hi, p_value=p, verdict=verdict,
                      confidence=1 - alpha / family, paired=bool(used_pairs))


def screen_speedups(samples: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> dict[str, float]:
    """``label -> median(candidate) / median(baseline)`` of the screen's ``label -> (baseline, candidate)``."""
    return {lab: float(np.median(_sample(b, "b")) / np.median(_sample(a, "a"))) for lab, (a, b) in samples.items()}


def format_ci(lo: float, hi: float, thresholds: Iterable[float] = (1.0,), digits: int = 3) -> str:
    """``"lo, hi"`` with ``digits`` decimals, more where fewer would round a bound onto or across a threshold
    (a bound above 1 never prints as 1.000); ``n/a`` without a CI."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    marks = list(thresholds)
    d = next((d for d in range(digits, 17)
              if all(np.sign(float(f"{x:.{d}f}") - t) == np.sign(x - t) for x in (lo, hi) for t in marks)), 17)
    return f"{lo:.{d}f}, {hi:.{d}f}"


def geomean(values: Iterable[float]) -> float:
    """Geometric mean of positive values (NaN for an empty input)."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return math.nan
    if np.any(arr <= 0) or not np.all(np.isfinite(arr)):
        raise ValueError("geomean needs finite positive values")
    return float(np.exp(np.log(arr).mean()))
