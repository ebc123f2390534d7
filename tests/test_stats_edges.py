"""Statistics at the edges, with hand-worked expectations: a small p-value whose CI still reaches 1, equal samples,
one outlier, which side is the numerator, and the geometric mean."""

from __future__ import annotations

import math

import pytest

from overlap_bench.stats import bootstrap_ratio_ci, compare_samples, geomean, mann_whitney_p

approx = pytest.approx
A = [1.0] * 8

# Seven of eight B samples above every A sample, one below every one: U = 56 of 64. With the tie correction
# (8 equal A values, 7 equal B values) sigma^2 = 64/12 * (17 - (8^3-8 + 7^3-7)/(16*15)) = 72, and with the
# continuity correction z = (56 - 32 - 0.5) / sqrt(72) = 2.77: two-sided p = 0.0056.
# The bootstrap mean of B falls to 1 or below when a resample holds the low value 3+ times (probability
# 1 - P(0) - P(1) - P(2) of Binomial(8, 1/8) = 0.067 > 0.025), so the 95% CI's low end is below 1.
UP = [1.10] * 7 + [0.75]     # mean 1.05625: a 5.6% "speedup" that one low sample makes uncertain
DOWN = [0.90] * 7 + [1.25]   # mean 0.94375: the mirror image


def test_small_p_with_ci_reaching_1_is_no_significant_difference():
    c = compare_samples(A, UP, n_boot=4000)
    assert c.p_value == approx(0.0056, abs=0.0005)
    assert c.speedup == approx(1.05625)
    assert c.ci_low <= 0.96875 + 1e-9 and c.ci_high == approx(1.10)  # low end: 3 low samples of 8
    assert c.verdict == "no significant difference"
    c = compare_samples(A, DOWN, n_boot=4000)
    assert c.p_value == approx(0.0056, abs=0.0005)
    assert c.speedup == approx(0.94375)
    assert c.ci_low == approx(0.90) and c.ci_high >= 1.03125 - 1e-9
    assert c.verdict == "no significant difference"


def test_clear_shift_is_faster_or_slower_by_the_right_end():
    # U = 64 of 64; ties 8 and 8: sigma^2 = 64/12 * (17 - 1008/240) = 68.27, z = 31.5 / 8.26 = 3.81, p = 0.00014
    c = compare_samples(A, [1.10] * 8, n_boot=2000)
    assert c.p_value == approx(0.00014, abs=0.00003)
    assert (c.speedup, c.ci_low, c.ci_high) == (approx(1.10), approx(1.10), approx(1.10))
    assert c.verdict == "faster"
    c = compare_samples(A, [0.90] * 8, n_boot=2000)
    assert (c.speedup, c.ci_low, c.ci_high, c.verdict) == (approx(0.90), approx(0.90), approx(0.90), "slower")
    # b is the numerator: throughput b twice a's is a speedup of 2, not 0.5
    c = compare_samples([2.0, 2.0, 2.0], [4.0, 4.0, 4.0], n_boot=500)
    assert (c.mean_a, c.mean_b, c.speedup) == (2.0, 4.0, 2.0)


@pytest.mark.parametrize("sample", [[2.0] * 5, [1.0, 2.0, 3.0, 4.0, 5.0]])
def test_equal_samples(sample):
    c = compare_samples(sample, list(sample), n_boot=2000)
    assert c.speedup == 1.0 and c.p_value == 1.0 and c.verdict == "no significant difference"
    assert c.ci_low <= 1.0 <= c.ci_high
    assert mann_whitney_p(sample, sample) == 1.0


def test_one_outlier():
    b = [1.0] * 9 + [10.0]
    c = compare_samples([1.0] * 10, b, n_boot=2000)
    assert c.mean_b == approx(1.9) and c.median_b == 1.0  # the median is not the mean
    assert c.std_b == approx(math.sqrt(8.1))              # (9 * 0.81 + 65.61) / 9 = 8.1 (ddof 1)
    assert c.speedup == approx(1.9)
    # one value of ten differs: U = 55 of 100, nowhere near significant; the CI's low end is 1 (no outlier drawn)
    assert c.p_value > 0.3 and c.ci_low == approx(1.0)
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
    from overlap_bench.records import Record, RecordWriter

    def rec(tps, bias=False):
        return Record(shape="m/o_proj", K=1024, N=2048, M=4096, dtype="float32", world=2, backend="gloo",
                      device="cpu", strategy="pr", settings={}, label="pr", env={}, bias=bias, tokens_per_s=tps)

    wa, wb = RecordWriter(tmp_path / "a"), RecordWriter(tmp_path / "b")
    wa.append(rec(1000.0))
    wb.append(rec(1210.0))
    wb.append(rec(5000.0, bias=True))  # other work: never a sample of the bias-free case
    df, unmatched = compare_run_dirs(tmp_path / "a", tmp_path / "b", n_boot=200)
    assert len(df) == 1 and df.iloc[0]["samples_b"] == [1210.0] and df.iloc[0]["speedup"] == approx(1.21)
    assert unmatched == ["only in B: m/o_proj M=4096 pr (float32) +bias"]
    # speedups 1.21 and 1.0: geometric mean 1.1 (the arithmetic mean would be 1.105)
    rows = [dict(shape="s", K=1, N=1, M=m, dtype="float32", a_label="a", b_label="b", samples_a=[100.0, 100.0],
                 samples_b=[tb, tb]) for m, tb in ((1, 121.0), (2, 100.0))]
    s = summary(build_table(rows, n_boot=200))
    assert s["rows"] == 2 and s["geomean_speedup"] == approx(1.1)
    assert s["verdicts"] == {"faster": 0, "slower": 0, "no significant difference": 2}  # 2 samples: p = 1/3
