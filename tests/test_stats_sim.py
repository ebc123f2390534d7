"""The decision rule (:func:`overlap_bench.stats.judge`) checked by simulation with known truth, and at its
exact boundaries. Seeded; bootstrap resolution ``N_BOOT`` (production uses 10000; the statistic is the same).
Each simulated rate is a binomial share: its bound leaves at least two standard errors to the measured value."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sim_stats as sim

from overlap_bench import confirm, stats
from overlap_bench.compare import _summary_line, build_table, summary, table_from_records
from overlap_bench.records import Record
from overlap_bench.spec import CONFIRM_REPEATS, MIN_CONFIRM_REPEATS
from overlap_bench.stats import MIN_EFFECT, MIN_SAMPLES, SHIP_ALPHA, fewest, format_ci, judge, resolvable

N_BOOT = 2000


# ---- by simulation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [5, 20])
def test_ci_coverage_on_iid_noise(n: int) -> None:
    """Two samples of one throughput (iid, CV 1%), resampled as compare's A/B pairs: the 95% CI holds the
    true ratio 1 in 93-98% of 1000 trials (SE of the share ~0.6%; 4000 trials measure ~97% at 5 and 20)."""
    rng = np.random.default_rng(100 + n)
    held = 0
    for _ in range(1000):
        a, b = np.exp(rng.normal(0, 0.01, (2, n)))
        c = judge(a, b, paired=True, n_boot=N_BOOT, seed=int(rng.integers(1 << 30)))
        held += c.ci_low <= 1 <= c.ci_high
    assert 930 <= held <= 980, f"the 95% CI held the truth in {held / 10:.1f}% of trials"


@pytest.mark.parametrize("repeats, trials", [(MIN_CONFIRM_REPEATS, 600), (CONFIRM_REPEATS, 500)])
def test_null_buckets_ship_nothing(repeats: int, trials: int) -> None:
    """41 settings all tying the baseline at 10% noise (the worst simulated: the 1% margin barely helps there),
    first pass, screen and confirmation: at most 1% of the buckets ship a setting, at the fewest repeats a spec
    takes and at the default (0.35% and 0.22% measured over 4000, so about 2 expected where 6 and 5 pass)."""
    _, false = sim.rates(7, trials, 0.10, 1.0, repeats=repeats, n_boot=N_BOOT)
    assert false <= 0.01, f"{false:.1%} of null buckets shipped a setting at {repeats} repeats"


def test_a_3pct_win_among_41_settings_ships() -> None:
    """One of 41 settings truly 3% faster (CV 1%): with the screen it ships in at least 95% of 400 buckets
    (96.5% measured over 2000, SE 0.9% at 400), nothing else ships, and the speedup to expect (the CI's low
    end) is not inflated by the pick: it stays at or below the truth."""
    rng = np.random.default_rng(3)
    runs = [sim.bucket(rng, 0.01, {sim.WINNER: 1.03}, n_boot=N_BOOT)[1] for _ in range(400)]
    won = [d for d in runs if d.label == sim.WINNER]
    assert len(won) >= 0.95 * len(runs), f"the 3% win shipped in {len(won)} of {len(runs)} buckets"
    assert all(d.label in (sim.WINNER, "baseline") for d in runs)
    assert sum(d.expected <= 1.03 for d in won) >= 0.99 * len(won)


def test_pairs_cancel_shared_drift() -> None:
    """B is A times 1.05 pair by pair under a large drift: resampled by pair the ratio is 1.05 in every
    resample; resampled side by side the drift widens the CI past 1."""
    drift = np.linspace(1.0, 1.3, 20)
    a, b = drift * 1000, drift * 1050
    c = judge(a, b, paired=True, n_boot=N_BOOT)
    assert c.paired and (c.ci_low, c.ci_high) == (pytest.approx(1.05), pytest.approx(1.05))
    assert c.verdict == "faster"
    apart = judge(a, b, n_boot=N_BOOT)
    assert not apart.paired and apart.ci_low < 1 < apart.ci_high


# ---- one rule: compare and the confirmation --------------------------------------------------------------

def test_compare_and_confirmation_give_the_same_answer_on_the_same_samples() -> None:
    """One candidate, one-sided at level alpha, asks what compare's two-sided CI at 2 * alpha asks: the
    same bounds from the same resamples, so ``faster`` in compare exactly when the confirmation ships it."""
    rng = np.random.default_rng(5)
    seen = set()
    for _ in range(60):
        a = 1000 * np.exp(rng.normal(0, 0.02, 10))
        b = 1000 * rng.uniform(0.98, 1.06) * np.exp(rng.normal(0, 0.02, 10))
        row = dict(shape="s", K=1, N=1, M=1, dtype="float32", a_label="baseline", b_label="x",
                   samples_a=list(a), samples_b=list(b), paired=True)
        verdict, lo = build_table([row], n_boot=N_BOOT).iloc[0][["verdict", "ci_low"]]
        d = confirm.decide({"x": (list(a), list(b))}, alpha=0.025, n_boot=N_BOOT)
        assert (d.label == "x") == (verdict == "faster")
        assert d.leader_ci[0] == lo
        seen.add(verdict)
    assert {"faster", "no significant difference", "below min_effect"} <= seen


def test_one_sided_bonferroni_level() -> None:
    """The ship rule spends alpha / family in one tail: its low end is the two-sided CI's at 2 * alpha /
    family, and its p-value counts that one tail."""
    rng = np.random.default_rng(9)
    a = 1000 * np.exp(rng.normal(0, 0.02, 20))
    b = 1010 * np.exp(rng.normal(0, 0.02, 20))
    one = judge(a, b, one_sided=True, alpha=0.04, family=4, paired=True, n_boot=N_BOOT)
    two = judge(a, b, alpha=0.02, paired=True, n_boot=N_BOOT)
    assert one.ci_low == two.ci_low and one.confidence == pytest.approx(0.99)
    assert one.ci_low > judge(a, b, alpha=0.01, paired=True, n_boot=N_BOOT).ci_low
    assert one.p_value == pytest.approx(two.p_value / 2) and 0 < two.p_value < 1
    assert one.expected == one.ci_low and stats.Comparison.expected_from == "ci_low"
    assert judge(b, a, one_sided=True, paired=True, n_boot=N_BOOT).verdict != "slower"


# ---- boundaries ------------------------------------------------------------------------------------------

def test_bounds_exactly_at_1_and_at_1_plus_min_effect() -> None:
    """B is A times exactly ``1 + min_effect`` pair by pair: every paired resample's ratio is that number, so
    the CI is that point; it leaves 1 out but does not clear the threshold (the rule is strict): below
    min_effect, two-sided and one-sided. Equal samples: the CI is the point 1, which it holds."""
    a = [100.0 * i for i in range(1, 10)]
    edge = [101.0 * i for i in range(1, 10)]
    assert 101.0 / 100.0 == 1 + MIN_EFFECT
    for kw in ({}, {"one_sided": True}):
        c = judge(a, edge, paired=True, n_boot=N_BOOT, **kw)
        assert c.paired and c.ci_low == c.ci_high == 1 + MIN_EFFECT
        assert (c.verdict, c.p_value) == ("below min_effect", 0.0)
    c = judge(a, a, paired=True, n_boot=N_BOOT)
    assert (c.ci_low, c.ci_high, c.p_value, c.verdict) == (1.0, 1.0, 1.0, "no significant difference")
    c = judge([102.0 * i for i in range(1, 10)], a, paired=True, n_boot=N_BOOT)
    assert c.verdict == "slower" and c.ci_high < 1 - MIN_EFFECT


def test_p_and_ci_agree_exactly() -> None:
    """``p < alpha`` exactly when the CI leaves 1 out, for odd and even bootstrap sizes (no quantile slack)."""
    rng = np.random.default_rng(11)
    for i in range(150):
        n = int(rng.integers(MIN_SAMPLES, 12))
        a = np.exp(rng.normal(0, 0.03, n))
        b = np.exp(rng.normal(rng.uniform(-0.03, 0.03), 0.03, n + int(rng.integers(0, 2))))
        for one_sided in (False, True):
            c = judge(a, b, one_sided=one_sided, paired=True, n_boot=999 + i % 2, seed=i)
            out = c.ci_low > 1 or (not one_sided and c.ci_high < 1)
            assert (c.p_value < 0.05) == out, (c, one_sided)


def test_floor_and_unequal_sizes() -> None:
    """Below ``MIN_SAMPLES`` a side: no CI, no p, no verdict; at it, a verdict. Unequal lengths cannot be
    pairs: resampled side by side. Pairs too few to resolve the tail ((n + 1) 2**-n above it) likewise."""
    four, five = [100.0, 101.0, 99.0, 100.0], [100.0, 101.0, 99.0, 100.0, 100.5]
    assert MIN_SAMPLES == 5
    for a, b in ((four, five), (five, four), (four, four)):
        c = judge(a, [1.2 * x for x in b], paired=True)
        assert c.verdict == "too few samples" and math.isnan(c.ci_low) and math.isnan(c.p_value)
        assert c.speedup == pytest.approx(1.2)
    c = judge(five, [1.2 * x for x in five + [100.0]], paired=True, n_boot=N_BOOT)
    assert c.verdict == "faster" and not c.paired
    nine = five + [100.2, 99.5, 100.7, 99.8]
    assert judge(nine, nine, paired=True, n_boot=N_BOOT).paired             # 10 * 2**-9 < 0.025
    assert not judge(nine[:8], nine[:8], paired=True, n_boot=N_BOOT).paired  # 9 * 2**-8 > 0.025
    assert not judge(nine, nine, paired=True, one_sided=True, family=4, n_boot=N_BOOT).paired


def test_no_tail_below_what_the_samples_can_show() -> None:
    """Every B above every A: at the ship rule's tail for 3 leaders and ``pr`` (0.01 / 4) five a side cannot
    show it (2 of C(10, 5) = 252 rankings are 0.8%): no verdict; six can (2 / 924 = 0.2%). Compare's floor is
    the same rule at its two-sided 95%; the spec's floor keeps one repeat beyond the ship rule's."""
    for n, verdict in ((5, "too few samples"), (6, "faster")):
        a = [100.0 + i for i in range(n)]
        c = judge(a, [1.2 * x for x in a], one_sided=True, alpha=SHIP_ALPHA, family=4, paired=True, n_boot=N_BOOT)
        assert c.verdict == verdict and not c.paired
        assert judge(a, [1.2 * x for x in a], paired=True, n_boot=N_BOOT).verdict == "faster"
        d = confirm.decide({f"x{i}": (a, [1.2 * x for x in a]) for i in range(4)}, n_boot=N_BOOT)
        assert (d.label != "baseline") == (verdict == "faster")
    assert fewest(SHIP_ALPHA / (confirm.TOP + 1)) == MIN_CONFIRM_REPEATS - 1 == 6
    assert fewest(0.025) == MIN_SAMPLES and not resolvable(4, 4, 0.025) and resolvable(5, 5, 0.025)
    assert [n for n in range(1, 20) if resolvable(n, n, 0.0025, paired=True)][0] == 13


def test_ci_prints_the_digits_its_verdict_needs() -> None:
    marks = (1 - MIN_EFFECT, 1.0, 1 + MIN_EFFECT)
    assert format_ci(1.0004, 1.2, marks) == "1.0004, 1.2000"      # above 1: never 1.000
    assert format_ci(1.00999, 1.02, marks) == "1.00999, 1.02000"  # below 1.01: never 1.010
    assert format_ci(0.95, 0.9999996, marks) == "0.9500000, 0.9999996"
    assert format_ci(1.0, 1.0, marks) == "1.000, 1.000"
    assert format_ci(1.234, 1.5, marks) == "1.234, 1.500"
    assert format_ci(math.nan, math.nan, marks) == "n/a"


def test_identical_runs_give_no_headline() -> None:
    """Two runs of the same setting, one sample a side (a CPU smoke run), 2x apart by noise: no verdict, no
    geometric-mean headline; with five samples a side the headline comes from the judged cases only."""
    def rec(M: int, tps: float) -> Record:
        return Record(shape="s", K=64, N=64, M=M, dtype="float32", world=2, backend="gloo", device="cpu",
                      strategy="pr", settings={}, label="pr", env={}, tokens_per_s=tps)

    df, _ = table_from_records([rec(32, 1000.0), rec(64, 1000.0)], [rec(32, 1970.0), rec(64, 1970.0)],
                               n_boot=N_BOOT)
    s = summary(df)
    assert list(df["verdict"]) == ["too few samples"] * 2 and s["judged"] == 0
    assert math.isnan(s["geomean_speedup"]) and ": n/a (" in _summary_line(s)
    a = [rec(32, 1000.0 + i) for i in range(5)] + [rec(64, 1000.0)]
    b = [rec(32, 1000.0 + i) for i in range(5)] + [rec(64, 1970.0)]
    s = summary(table_from_records(a, b, n_boot=N_BOOT)[0])
    assert s["judged"] == 1 and s["geomean_speedup"] == pytest.approx(1.0)
