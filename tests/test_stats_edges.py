"""Statistics at the edges, with hand-worked expectations: a small p-value whose CI still reaches 1, equal samples,
one outlier, which side is the numerator, and the geometric mean."""

from __future__ import annotations

import math

import numpy as np
import pytest

from overlap_bench.stats import bootstrap_ratio_ci, judge, geomean

approx = pytest.approx
A = [1.0] * 8

# One robust statistic, the ratio of medians, with its own bootstrap CI, p and verdict.
# Seven of eight B samples at 1.10 and one at 0.75: the median of a resample of 8 (mean of its 4th and 5th values)
# stays 1.10 unless it draws the low value 4+ times, P = 1 - P(0..3) of Binomial(8, 1/8) = 1 - 0.9887 = 0.0113
# < 0.025: the 95% CI is [1.10, 1.10] and the bootstrap p = 2 * 0.0113 = 0.023. One low sample moves nothing.
UP = [1.10] * 7 + [0.75]
DOWN = [0.90] * 7 + [1.25]   # the mirror image


def test_one_low_sample_does_not_move_the_ratio_of_medians():
    c = judge(A, UP, n_boot=4000)
    assert c.p_value == approx(0.0226, abs=0.006)
    assert (c.speedup, c.ci_low, c.ci_high) == (approx(1.10), approx(1.10), approx(1.10))
    assert c.verdict == "faster"
    c = judge(A, DOWN, n_boot=4000)
    assert c.p_value == approx(0.0226, abs=0.006)
    assert (c.speedup, c.ci_low, c.ci_high) == (approx(0.90), approx(0.90), approx(0.90))
    assert c.verdict == "slower"


def test_clear_shift_is_faster_or_slower_by_the_right_end():
    # Every resample's ratio is 1.10 exactly: the CI is that point and no bootstrap ratio reaches 1 (p = 0).
    c = judge(A, [1.10] * 8, n_boot=2000)
    assert c.p_value == 0.0
    assert (c.speedup, c.ci_low, c.ci_high) == (approx(1.10), approx(1.10), approx(1.10))
    assert c.verdict == "faster"
    c = judge(A, [0.90] * 8, n_boot=2000)
    assert (c.speedup, c.ci_low, c.ci_high, c.verdict) == (approx(0.90), approx(0.90), approx(0.90), "slower")
    # b is the numerator: throughput b twice a's is a speedup of 2, not 0.5
    c = judge([2.0, 2.0, 2.0], [4.0, 4.0, 4.0], n_boot=500)
    assert (c.mean_a, c.mean_b, c.speedup) == (2.0, 4.0, 2.0)


def test_verdict_never_contradicts_the_ci_or_the_medians():
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(1, 9))
        a = 1000 * (1 + 0.05 * rng.standard_normal(n))
        b = 1000 * rng.uniform(0.9, 1.1) * (1 + 0.05 * rng.standard_normal(n))
        c = judge(a, b, n_boot=500, seed=int(rng.integers(1 << 30)))
        assert (c.speedup > 1) == (c.median_b > c.median_a) or c.speedup == 1
        if n < 5:  # below the floor: no CI, no p, no verdict
            assert c.verdict == "too few samples" and math.isnan(c.ci_low) and math.isnan(c.p_value)
            continue
        excludes = c.ci_low > 1 or c.ci_high < 1
        assert (c.verdict == "no significant difference") == (not excludes)
        assert (c.p_value < 0.05) == excludes  # p and CI count the same resamples: no slack


@pytest.mark.parametrize("sample", [[2.0] * 5, [1.0, 2.0, 3.0, 4.0, 5.0]])
def test_equal_samples(sample):
    c = judge(sample, list(sample), n_boot=2000)
    assert c.speedup == 1.0 and c.p_value == 1.0 and c.verdict == "no significant difference"
    assert c.ci_low <= 1.0 <= c.ci_high


def test_one_outlier():
    b = [1.0] * 9 + [10.0]
    c = judge([1.0] * 10, b, n_boot=2000)
    assert c.mean_b == approx(1.9) and c.median_b == 1.0  # the median is not the mean
    assert c.std_b == approx(math.sqrt(8.1))              # (9 * 0.81 + 65.61) / 9 = 8.1 (ddof 1)
    # The ratio of medians ignores the outlier (a mean would say 1.9x): a resample's median moves only when it
    # draws the 10.0 six times or more, far below 2.5%, so the CI is [1, 1] and nothing is significant.
    assert c.speedup == 1.0 and c.ci_low == approx(1.0) and c.ci_high == approx(1.0)
    assert c.p_value == 1.0
    assert c.verdict == "no significant difference"
    assert c.std_a == 0.0 and c.n_a == c.n_b == 10


def test_bootstrap_of_constant_samples_is_the_exact_ratio():
    assert bootstrap_ratio_ci([2.0] * 3, [3.0] * 4, n_boot=200) == (approx(1.5), approx(1.5))


def test_geomean_by_hand():
    assert geomean([1.0, 4.0]) == approx(2.0)
    assert geomean([2.0, 8.0, 4.0]) == approx(4.0)
    assert geomean([5.0]) == approx(5.0)
    assert math.isnan(geomean([]))
    with pytest.raises(ValueError):
        geomean([1.0, 0.0])


def test_compare_run_dirs_keeps_bias_apart_and_summarises_by_geomean(tmp_path):
    from overlap_bench.compare import build_table, compare_run_dirs, summary
    from overlap_bench.records import Record
    from overlap_bench.runfolder import RunFolder

    def rec(tps, bias=False):
        return Record(shape="m/o_proj", K=1024, N=2048, M=4096, dtype="float32", world=2, backend="gloo",
                      device="cpu", strategy="pr", settings={}, label="pr", env={}, bias=bias, tokens_per_s=tps)

    wa, wb = RunFolder(tmp_path / "a"), RunFolder(tmp_path / "b")
    wa.append(rec(1000.0))
    wb.append(rec(1210.0))
    wb.append(rec(5000.0, bias=True))  # other work: never a sample of the bias-free case
    df, unmatched = compare_run_dirs(tmp_path / "a", tmp_path / "b", n_boot=200)
    assert len(df) == 1 and df.iloc[0]["samples_b"] == [1210.0] and df.iloc[0]["speedup"] == approx(1.21)
    assert unmatched == ["only in B: m/o_proj M=4096 pr (float32) +bias"]
    # speedups 1.21 and 1.0: geometric mean 1.1 (the arithmetic mean would be 1.105)
    rows = [dict(shape="s", K=1, N=1, M=m, dtype="float32", a_label="a", b_label="b", samples_a=[100.0] * 5,
                 samples_b=[tb] * 5) for m, tb in ((1, 121.0), (2, 100.0))]
    s = summary(build_table(rows, n_boot=200))
    assert s["rows"] == 2 and s["geomean_speedup"] == approx(1.1)
    # the verdict follows the bootstrap CI of the ratio of medians; equal samples on each side
    # leave no spread, so the CI of the first row is [1.21, 1.21]: faster; the second's is [1, 1]
    assert s["verdicts"] == {"faster": 1, "slower": 0, "no significant difference": 1, "below min_effect": 0,
                             "too few samples": 0}
