"""The confirmation stage's decision logic (the null test) with injected, seeded timings;
nothing here is timed.

A bucket is simulated as a sweep measures it: a first pass (the baseline reference bracketed every 4th
candidate, each candidate once), then every leader re-measured against the baseline interleaved
(``confirm.REPEATS`` repeats per side). Every region's median carries lognormal noise and a slow linear
drift of the machine (the clock slowing by ``DRIFT`` over the bucket's measurements).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from overlap_bench import confirm, metrics

CANDIDATES = [f"chunked:chunks={c},comm={m}" for c in (2, 3, 4, 8, 16) for m in ("stream", "async")] + ["pr"]
DRIFT = 0.03
N_BOOT = 2000  # the bootstrap's resolution only (production uses 10000); the statistic is the same


def simulate(rng: np.random.Generator, gains: dict[str, float], sigma: float) -> tuple[float, confirm.Outcome]:
    """One bucket: ``(first-pass best speedup, decision)``; ``gains`` maps a label to its true speedup."""
    steps = len(CANDIDATES) * 2 + 2 * confirm.TOP * confirm.REPEATS * 2
    clock = iter(1 + DRIFT * np.arange(steps) / steps)

    def region(true_t: float) -> float:  # one timed region's median: true time, drift, noise
        return true_t * next(clock) * float(np.exp(rng.normal(0, sigma)))

    refs, times = [], {}
    refs.append(region(1.0))
    for i, lab in enumerate(CANDIDATES):
        times[lab] = region(1.0 / gains.get(lab, 1.0))
        if (i + 1) % 4 == 0 or i == len(CANDIDATES) - 1:
            refs.append(region(1.0))
    t_ref, _ = metrics.reference((t, 0.0) for t in refs)
    first = {lab: metrics.speedup(t_ref, t) for lab, t in times.items()}
    lead = confirm.leaders(first, peers=["pr"])
    samples = {}
    for lab in lead:
        base, cand = [], []
        for _ in range(confirm.REPEATS):  # A B A B ..., tokens/s = M / t
            base.append(1.0 / region(1.0))
            cand.append(1.0 / region(1.0 / gains.get(lab, 1.0)))
        samples[lab] = (base, cand)
    return max(first.values()), confirm.decide(samples, lead, n_boot=N_BOOT)


@pytest.mark.parametrize("sigma", [0.02, 0.05])
def test_null_keeps_the_baseline(sigma: float) -> None:
    """Every candidate equals the baseline: the export keeps the baseline in at least 99% of the buckets,
    though the first pass's best looks like a gain (the selection bias the confirmation removes)."""
    rng = np.random.default_rng(13)
    runs = [simulate(rng, {}, sigma) for _ in range(150)]
    shipped = sum(d.label != "baseline" for _, d in runs)
    assert shipped <= 0.01 * len(runs), f"{shipped} of {len(runs)} null buckets shipped a setting"
    first_pass = float(np.median([fp for fp, _ in runs]))
    confirmed = float(np.median([d.leader_speedup for _, d in runs]))
    assert first_pass > 1 + sigma / 2, "the first pass's pick should look like a gain (winner's curse)"
    assert abs(confirmed - 1) < sigma / 4, "re-measured, the leader is what it is: no gain"


def test_a_real_gain_is_found() -> None:
    """One setting is truly 3% faster (region noise 1%): it is confirmed and shipped in at least 95% of
    the buckets, and nothing else is shipped in its place."""
    rng = np.random.default_rng(7)
    gain = "chunked:chunks=4,comm=stream"
    runs = [simulate(rng, {gain: 1.03}, 0.01) for _ in range(100)]
    found = sum(d.label == gain for _, d in runs)
    assert found >= 0.95 * len(runs), f"the 3% gain was shipped in {found} of {len(runs)} buckets"
    assert all(d.label in (gain, "baseline") for _, d in runs)
    shipped = [d for _, d in runs if d.label == gain]
    assert all(d.ci_low > 1 + confirm.MIN_EFFECT and d.repeats == confirm.REPEATS for d in shipped)


def test_leaders_take_the_best_three_and_the_peers() -> None:
    first = {"baseline": 1.2, "a": 1.05, "b": 1.10, "c": 0.9, "d": 1.01, "pr": 0.8, "e": math.nan}
    assert confirm.leaders(first, peers=["pr"]) == ["b", "a", "d", "pr"]
    assert confirm.leaders(first, peers=["pr"], top=1) == ["b", "pr"]


def test_decide_without_samples_keeps_the_baseline() -> None:
    d = confirm.decide({}, [])
    assert d.label == "baseline" and d.confirmed == 0 and d.leader is None
    # one repeat has no CI: never shipped, however large the ratio
    d = confirm.decide({"a": ([1.0], [2.0])}, ["a"])
    assert d.label == "baseline" and d.leader == "a" and d.leader_speedup == 2.0


# ---- the stage in a sweep and the export rule ------------------------------------------------------------

def test_no_confirm_exports_the_baseline_unless_asked(tmp_path) -> None:
    """A sweep with --no-confirm writes no confirm.jsonl; its export ships the baseline in every bucket, and
    --unconfirmed ships the first pass's picks with meta.unconfirmed set."""
    import yaml
    from typer.testing import CliRunner

    from overlap_bench import select
    from overlap_bench.cli import app
    from overlap_bench.records import load_records

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "t", "backend": "gloo", "world_size": 2, "dtypes": ["float32"],
                                    "shapes": [{"name": "t/o", "K": 64, "N": 64}], "tokens": [32],
                                    "strategies": [{"name": "baseline"}, {"name": "pr"}, {"name": "chunked", "chunks": [2]}], "warmup": 1, "reps": 2}))
    run = CliRunner()
    out = tmp_path / "run"
    res = run.invoke(app, ["sweep", str(spec), "--out", str(out), "--no-confirm"])
    assert res.exit_code == 0, res.output
    assert not (out / "confirm.jsonl").exists() and "not confirmed" in res.output
    for flag, meta in (([], False), (["--unconfirmed"], True)):
        res = run.invoke(app, ["export", str(out), "-o", str(tmp_path / "p.yaml")] + flag)
        assert res.exit_code == 0, res.output
        doc = yaml.safe_load((tmp_path / "p.yaml").read_text())
        assert doc["meta"]["unconfirmed"] is meta
        [bucket] = doc["shapes"]["64,64"]["buckets"].values()
        want = select.best(load_records(out).records)[0].strategy if meta else "baseline"
        assert bucket["strategy"] == want and "confirmation" not in bucket


def test_ship_follows_the_confirmed_ci(tmp_path) -> None:
    """Injected rows: a bucket whose candidate is confirmed 10% faster ships it with its confirmed numbers;
    a bucket whose leader confirms as a tie ships the baseline; the first pass's pick does not matter."""
    from overlap_bench import select
    from overlap_bench.records import Record

    def rec(M, label, t):
        from overlap_bench import strategies
        name, settings = strategies.parse(label)
        return Record(shape="s", K=64, N=64, M=M, dtype="float32", world=2, backend="gloo", device="cpu",
                      strategy=name, settings=strategies.settings_dict(settings), label=label, env={}, t_ms=t,
                      t_iqr_ms=0.0, t_base_ms=1.0, t_base_iqr_ms=0.0, t_gemm_ms=0.2, t_comm_ms=0.2)

    recs = [rec(m, "baseline", 1.0) for m in (32, 64)] + [rec(m, "pr", 0.5) for m in (32, 64)]
    assert [b.strategy for b in select.best(recs)] == ["pr", "pr"]  # the first pass says 2x

    def series(M, fast):  # confirm records as run_ab writes them: A B A B ..., 8 repeats
        base = [100.0 + i % 3 for i in range(8)]
        out = []
        for i, tps in enumerate(base):
            for side, label, t, x in (("a", "baseline", 1.0, tps), ("b", "pr", 1.0 / fast, tps * fast)):
                r = rec(M, label, t)
                r.kind, r.tokens_per_s = "confirm", x
                r.extra = {"side": side, "repeat": i, "repeats": 8, "pair": ["baseline", "pr"],
                           "first_pass_speedup": 2.0, "candidates": 2}
                out.append(r)
        return out

    shipped = {d.key.M: d for d in select.decide(recs, series(32, 1.10) + series(64, 1.0))}
    assert shipped[32].strategy == "pr" and shipped[32].speedup == pytest.approx(1.10)
    c = shipped[32].confirmation
    assert c.ci[0] > 1.01 and c.repeats == 8 and c.leader_first_pass_speedup == 2.0
    assert shipped[64].strategy == "baseline" and shipped[64].speedup == 1.0
    assert shipped[64].confirmation.leader_speedup == pytest.approx(1.0)
    assert (shipped[32].why, shipped[64].why) == ("confirmed", "baseline: not confirmed")
    assert [d.why for d in select.decide(recs, series(32, 1.10))] == ["confirmed", "baseline: no confirmation"]
    assert {d.why for d in select.decide(recs, unconfirmed=True)} == {"first pass (unconfirmed)"}
