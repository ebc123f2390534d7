"""stats.py and compare.py: checked against independently computed values; CPU only."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from overlap_bench.compare import (build_table, compare_run_dirs, rich_table, summary, to_json,
                                   to_markdown)
from overlap_bench.records import Record
from overlap_bench.runfolder import RunFolder
from overlap_bench.stats import bootstrap_ratio_ci, judge, geomean


# ---- Mann-Whitney ------------------------------------------------------------------------------------------

# ---- bootstrap -----------------------------------------------------------------------------------------------

def _low_noise(seed: int = 7, n: int = 10):
    rng = np.random.default_rng(seed)
    a = 1000.0 * (1 + 1e-3 * rng.standard_normal(n))
    b = 1100.0 * (1 + 1e-3 * rng.standard_normal(n))
    return a, b


def _hand_bootstrap(a, b, n_boot: int, alpha: float, seed: int):
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(n_boot):
        ra = [a[rng.integers(len(a))] for _ in range(len(a))]
        rb = [b[rng.integers(len(b))] for _ in range(len(b))]
        ratios.append(sum(rb) / len(rb) / (sum(ra) / len(ra)))
    ratios.sort()
    return ratios[int(alpha / 2 * n_boot)], ratios[int((1 - alpha / 2) * n_boot) - 1]


def test_bootstrap_ci_contains_ratio_and_is_narrow():
    a, b = _low_noise()
    lo, hi = bootstrap_ratio_ci(a, b)
    ratio = b.mean() / a.mean()
    assert lo < ratio < hi
    assert lo < 1.1 * 1.002 and hi > 1.1 * 0.998   # near the true ratio
    assert hi - lo < 0.004                            # ~0.1% noise gives a CI well under 1% wide


def test_bootstrap_agrees_with_hand_rolled_loop():
    rng = np.random.default_rng(3)
    a = 1000 * (1 + 0.05 * rng.standard_normal(8))
    b = 1050 * (1 + 0.05 * rng.standard_normal(8))
    lo, hi = bootstrap_ratio_ci(a, b, n_boot=20000)
    hlo, hhi = _hand_bootstrap(list(a), list(b), n_boot=4000, alpha=0.05, seed=99)
    width = hi - lo
    assert abs(lo - hlo) < 0.1 * width and abs(hi - hhi) < 0.1 * width


def test_bootstrap_deterministic_and_degenerate():
    a, b = _low_noise()
    assert bootstrap_ratio_ci(a, b, seed=5) == bootstrap_ratio_ci(a, b, seed=5)
    assert bootstrap_ratio_ci([200.0], [300.0]) == (pytest.approx(1.5), pytest.approx(1.5))


def test_bootstrap_rejects_bad_samples():
    with pytest.raises(ValueError):
        bootstrap_ratio_ci([], [1.0])
    with pytest.raises(ValueError):
        bootstrap_ratio_ci([1.0, math.nan], [1.0])


# ---- verdicts --------------------------------------------------------------------------------------------------

def test_identical_samples_no_difference():
    for a in ([100.0] * 5, [1.0, 2.0, 3.0, 4.0, 5.0]):
        c = judge(a, list(a))
        assert c.verdict == "no significant difference"
        assert c.p_value == 1.0
        assert c.speedup == 1.0
    assert judge([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]).verdict == "too few samples"  # below the floor


def _shifted(factor: float, noise: float, seed: int = 11):
    rng = np.random.default_rng(seed)
    a = 1000 * (1 + noise * rng.standard_normal(10))
    b = 1000 * factor * (1 + noise * rng.standard_normal(10))
    return a, b


def test_ten_percent_shift_detected_both_ways():
    a, b = _shifted(1.10, 0.01)
    c = judge(a, b)
    assert c.verdict == "faster"
    assert c.speedup == pytest.approx(1.10, rel=0.01)
    assert c.ci_low > 1 and c.p_value < 0.001
    r = judge(b, a)
    assert r.verdict == "slower"
    assert r.ci_high < 1


def test_min_effect_suppresses_tiny_shift():
    a, b = _shifted(1.005, 1e-4)
    tiny = judge(a, b, min_effect=0.01)
    assert tiny.p_value < 0.05 and tiny.ci_low > 1        # real...
    assert tiny.verdict == "below min_effect"             # ...but below the threshold (never "no
    assert judge(a, b, min_effect=0.001).verdict == "faster"  # significant difference" beside such a CI)
    assert judge(b, a, min_effect=0.01).verdict == "below min_effect"


def test_single_samples_are_honest():
    c = judge([1000.0], [1200.0])
    assert (c.n_a, c.n_b, c.std_a, c.std_b) == (1, 1, 0.0, 0.0)
    assert math.isnan(c.ci_low) and math.isnan(c.ci_high)  # one measurement has no spread, hence no CI
    assert c.speedup == pytest.approx(1.2)
    assert math.isnan(c.p_value) and c.verdict == "too few samples"


def test_summary_fields():
    c = judge([1.0, 2.0, 3.0], [2.0, 4.0, 9.0])
    assert (c.mean_a, c.median_b) == (2.0, 4.0)
    assert c.std_a == pytest.approx(1.0) and c.std_b == pytest.approx(np.std([2, 4, 9], ddof=1))
    assert c.speedup == pytest.approx(4.0 / 2.0)  # the ratio of medians


def test_geomean():
    assert geomean([1.0, 4.0]) == pytest.approx(2.0)
    assert geomean([2.0, 8.0, 4.0]) == pytest.approx(4.0)
    assert math.isnan(geomean([]))
    with pytest.raises(ValueError):
        geomean([1.0, -1.0])


# ---- compare ------------------------------------------------------------------------------------------------------

def _rec(shape="m/o_proj", M=4096, label="chunked:chunks=4", tps=1000.0, status="ok", env=None, dtype="float32"):
    return Record(shape=shape, K=1024, N=2048, M=M, dtype=dtype, world=2, backend="gloo", device="cpu",
                  strategy=label.partition(":")[0], settings={}, label=label, env=env or {}, status=status,
                  reason=None if status == "ok" else "rel_err too large", tokens_per_s=tps)


def test_compare_run_dirs(tmp_path):
    da, db = tmp_path / "a", tmp_path / "b"
    wa, wb = RunFolder(da), RunFolder(db)
    for t in (1000.0, 1010.0, 990.0):
        wa.append(_rec(tps=t))
    for t in (1200.0, 1210.0, 1190.0):
        wb.append(_rec(tps=t))
    wa.append(_rec(M=8192, tps=500.0))                       # failed in B -> only in A
    wb.append(_rec(M=8192, status="failed"))
    wa.append(_rec(M=16, tps=1.0, status="failed"))           # failed only: ignored entirely
    wb.append(_rec(label="pr", tps=2000.0))                   # only in B
    wb.append(_rec(env={"NCCL_ALGO": "Ring"}, tps=900.0))     # other env: another case
    with open(da / "records.jsonl", "a") as fh:
        fh.write('{"shape": "torn')

    df, unmatched = compare_run_dirs(da, db, min_effect=0.01)
    assert len(df) == 1
    row = df.iloc[0]
    assert row["samples_a"] == [1000.0, 1010.0, 990.0]
    assert row["samples_b"] == [1200.0, 1210.0, 1190.0]
    assert row["speedup"] == pytest.approx(1.2)
    assert (row["a_label"], row["b_label"], row["M"]) == ("chunked:chunks=4", "chunked:chunks=4", 4096)
    assert df.attrs["torn_lines"] == {"A": [6], "B": []}

    assert len(unmatched) == 3
    assert "only in A: m/o_proj M=8192 chunked:chunks=4 (float32) [B: failed: rel_err too large]" in unmatched
    assert "only in B: m/o_proj M=4096 pr (float32)" in unmatched
    assert any(u.startswith("only in B:") and "NCCL_ALGO=Ring" in u for u in unmatched)
    assert not any("M=16" in u for u in unmatched)


def test_compare_single_records_per_case(tmp_path):
    RunFolder(tmp_path / "a").append(_rec(tps=1000.0))
    RunFolder(tmp_path / "b").append(_rec(tps=1500.0))
    df, unmatched = compare_run_dirs(tmp_path / "a", tmp_path / "b", min_effect=0.01)
    assert unmatched == []
    row = df.iloc[0]
    assert math.isnan(row["ci_low"]) and math.isnan(row["ci_high"]) and row["speedup"] == pytest.approx(1.5)
    assert math.isnan(row["p_value"]) and row["verdict"] == "too few samples"


def _table():
    a, b = _shifted(1.10, 0.01)
    rows = [dict(shape="m/o_proj", K=1024, N=2048, M=4096, dtype="bfloat16", a_label="baseline",
                 b_label="chunked:chunks=4", samples_a=list(a), samples_b=list(b)),
            dict(shape="m/down|proj", K=512, N=2048, M=128, dtype="bfloat16", a_label="baseline",
                 b_label="baseline", samples_a=[100.0] * 5, samples_b=[100.0] * 5)]
    return build_table(rows), a, b


def test_build_table_and_summary():
    df, a, b = _table()
    assert list(df["verdict"]) == ["faster", "no significant difference"]
    assert isinstance(df.iloc[0]["samples_a"], list)
    s = summary(df)
    assert s["rows"] == 2
    assert s["geomean_speedup"] == pytest.approx(math.sqrt(np.median(b) / np.median(a)))
    assert s["verdicts"] == {"faster": 1, "slower": 0, "no significant difference": 1, "below min_effect": 0,
                             "too few samples": 0}
    empty = build_table([])
    assert len(empty) == 0 and "verdict" in empty.columns
    assert summary(empty)["rows"] == 0 and math.isnan(summary(empty)["geomean_speedup"])


def test_markdown_contains_numbers():
    df, a, b = _table()
    md = to_markdown(df, summary(df), "chunked vs baseline")
    r = df.iloc[0]
    assert "### chunked vs baseline" in md
    assert ("| shape | M | setting | A tok/s median (IQR) | B tok/s median (IQR) | speedup [95% CI] | p | verdict |"
            in md)
    iqr = 100 * np.subtract(*np.percentile(a, [75, 25])) / r["median_a"]
    assert f"{r['median_a']:,.0f} (IQR {iqr:.1f}%)" in md and f"{r['median_b']:,.0f} (IQR " in md
    # the faster row's CI leaves 1 out: unmarked; the equal row's CI holds 1: marked as within the noise
    assert f"| {r['speedup']:.3f}× [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" in md
    assert "| ≈ 1.000× [" in md and "≈: the CI holds 1.0" in md
    assert "baseline → chunked:chunks=4" in md
    assert "m/down\\|proj" in md                       # a pipe in a name must not split the row
    assert f"{summary(df)['geomean_speedup']:.3f}×" in md
    assert len([ln for ln in md.splitlines() if ln.startswith("|")]) == 4


def test_json_keeps_lists_and_nulls_nan():
    df, a, b = _table()
    df.loc[1, "p_value"] = math.nan
    doc = json.loads(to_json(df, summary(df)))
    assert doc["rows"][0]["samples_a"] == pytest.approx(list(a))
    assert doc["rows"][0]["speedup"] == pytest.approx(df.iloc[0]["speedup"])
    assert doc["rows"][1]["p_value"] is None
    assert doc["summary"]["verdicts"]["faster"] == 1
    empty = build_table([])
    assert json.loads(to_json(empty, summary(empty)))["summary"]["geomean_speedup"] is None


def test_rich_table_renders():
    from rich.console import Console

    df, _, _ = _table()
    console = Console(record=True, width=250)
    console.print(rich_table(df, summary(df), "cmp"))
    text = console.export_text()
    assert "faster" in text and "Geometric-mean speedup" in text
    assert f"[{df.iloc[0]['ci_low']:.3f}," in text
