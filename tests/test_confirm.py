"""The second stages' selection and decision rules with injected, seeded numbers; nothing here is timed.

Buckets are simulated as a sweep measures them (``sim_stats``: first pass, screen, confirmation, lognormal
region noise and a slow drift of the machine); the sweep's own planning (``sweep.plan_stage``) is fed
injected first-pass and screen records.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sim_stats as sim
import yaml
from typer.testing import CliRunner

from overlap_bench import confirm, select, stats, strategies
from overlap_bench.cli import app
from overlap_bench.records import Record, load_records
from overlap_bench.spec import CONFIRM_REPEATS
from overlap_bench.sweep import plan_stage

N_BOOT = 2000  # the bootstrap's resolution only (production uses 10000); the statistic is the same


@pytest.mark.parametrize("sigma", [0.02, 0.05])
def test_null_keeps_the_baseline(sigma: float) -> None:
    """Every setting equals the baseline: the export keeps the baseline in at least 99% of the buckets,
    though the first pass's best looks like a gain (the selection bias the confirmation removes)."""
    rng = np.random.default_rng(13)
    runs = [sim.bucket(rng, sigma, n_boot=N_BOOT) for _ in range(150)]
    shipped = sum(d.label != "baseline" for _, d in runs)
    assert shipped <= 0.01 * len(runs), f"{shipped} of {len(runs)} null buckets shipped a setting"
    first_pass = float(np.median([max(first.values()) for first, _ in runs]))
    confirmed = float(np.median([d.leader_speedup for _, d in runs]))
    assert first_pass > 1 + sigma / 4, "the first pass's pick should look like a gain (winner's curse)"
    assert abs(confirmed - 1) < sigma / 4, "re-measured, the leader is what it is: no gain"


def test_a_real_gain_is_found_without_the_screen() -> None:
    """One setting truly 3% faster (region noise 1%), confirmed straight from the first pass: shipped in at
    least 80% of the buckets (91.4% measured over 2000), nothing else shipped in its place, expected = CI low."""
    rng = np.random.default_rng(7)
    runs = [sim.bucket(rng, 0.01, {sim.WINNER: 1.03}, screen=False, n_boot=N_BOOT)[1] for _ in range(100)]
    found = [d for d in runs if d.label == sim.WINNER]
    assert len(found) >= 0.80 * len(runs), f"the 3% gain was shipped in {len(found)} of {len(runs)} buckets"
    assert all(d.label in (sim.WINNER, "baseline") for d in runs)
    assert all(d.ci[0] > 1 + confirm.MIN_EFFECT and d.expected == d.ci[0] and d.repeats == CONFIRM_REPEATS
               for d in found)


def test_leaders_take_the_best_three_and_the_peers() -> None:
    first = {"baseline": 1.2, "a": 1.05, "b": 1.10, "c": 0.9, "d": 1.01, "pr": 0.8, "e": math.nan}
    assert confirm.leaders(first, peers=["pr"]) == ["b", "a", "d", "pr"]
    assert confirm.leaders(first, peers=["pr"], top=1) == ["b", "pr"]


def test_the_screen_runs_only_where_the_confirmation_cannot_take_every_candidate() -> None:
    first = {"baseline": 1.0, "pr": 0.9, **{f"c{i}": 1 + i / 100 for i in range(12)}}
    short = confirm.shortlist(first, ["pr"])
    assert short == [f"c{i}" for i in range(11, 11 - stats.SCREEN_TOP, -1)] + ["pr"]
    assert confirm.shortlist({"baseline": 1.0, "pr": 0.9, "a": 1.1, "b": 1.0, "c": 1.2}, ["pr"]) == []
    # the confirmation takes the screen's best by ratio of medians, not the first pass's
    screen = {lab: ([100.0] * 3, [100.0 * (1.05 if lab == "c3" else 1.0)] * 3) for lab in short}
    assert confirm.finalists(first, screen, ["pr"], top=1) == ["c3", "pr"]
    assert confirm.finalists(first, {}, ["pr"], top=1) == ["c11", "pr"]


def test_decide_without_samples_keeps_the_baseline() -> None:
    d = confirm.decide({}, {})
    assert d.label == "baseline" and d.confirmed == 0 and d.leader is None and d.expected == 1.0
    # one repeat has no CI: never shipped, however large the ratio
    d = confirm.decide({"a": ([1.0], [2.0])}, {"a": 1.5})
    assert d.label == "baseline" and d.leader == "a" and d.leader_speedup == 2.0
    assert d.leader_first_pass_speedup == 1.5


def rec(M: int, label: str, t: float, **kw) -> Record:
    """A first-pass record of bucket (s, 64, 64, M) timed ``t`` against a reference of 1.0 ms."""
    name, settings = strategies.parse(label)
    return Record(shape="s", K=64, N=64, M=M, dtype="float32", world=2, backend="gloo", device="cpu",
                  strategy=name, settings=strategies.settings_dict(settings), label=strategies.label(name, settings),
                  env={}, t_ms=t, t_iqr_ms=0.0, t_base_ms=1.0, t_base_iqr_ms=0.0, t_gemm_ms=0.2, t_comm_ms=0.2, **kw)


def ab_records(first: Record, kind: str, fast: float, repeats: int, **tags) -> list[Record]:
    """``first``'s setting measured against the baseline as ``bench.run_ab`` writes it, ``fast`` times faster."""
    out = []
    for i in range(repeats):
        tps = 100.0 + i % 3
        for side, r, x in (("a", rec(first.M, "baseline", 1.0), tps), ("b", first, tps * fast)):
            out.append(Record(**{**r.__dict__, "kind": kind, "tokens_per_s": x, "extra": {
                "side": side, "repeat": i, "repeats": repeats, "pair": ["baseline", first.label], **tags}}))
    return out


def test_the_screen_lifts_the_true_best_from_fifth_place_into_the_confirmation() -> None:
    """The sweep's planning with injected records: the first pass ranks the true best 5th (noise); the screen
    re-measures the first pass's best and the peers, and the confirmation's candidates are the screen's best
    (by ratio of medians) and the peers, so the true best is confirmed though the first pass would have
    left it out. Candidates already measured (``done``) are not planned again (resume)."""
    labels = [f"chunked:chunks={c},comm=stream" for c in range(2, 14)]
    first = [rec(64, "baseline", 1.0), rec(64, "pr", 0.97)] + [rec(64, lab, 0.90 + i / 200)
                                                               for i, lab in enumerate(labels)]
    true_best = labels[4]
    plain = [j.case.label for j in plan_stage(first, set(), {})]
    assert true_best not in plain and plain == labels[:3] + ["pr"]  # the first pass alone: top 3 and the peer
    short = plan_stage(first, set())
    assert [j.case.label for j in short] == labels[:stats.SCREEN_TOP] + ["pr"]
    assert all(j.tags["candidates"] == 14 and j.tags["first_pass_speedup"] > 1 for j in short[:-1])
    by_label = {r.label: r for r in first}
    screen = [x for j in short for x in ab_records(by_label[j.case.label], "screen",
                                                   1.06 if j.case.label == true_best else 1.0,
                                                   stats.SCREEN_REPEATS)]
    samples = confirm.by_bucket(screen)
    final = plan_stage(first, set(), samples)
    assert [j.case.label for j in final][0] == true_best and len(final) == confirm.TOP + 1
    assert {j.tags["screened"] for j in final} == {stats.SCREEN_TOP + 1}
    done = {key for key in map(confirm.candidate_key, screen) if key[1] != labels[7]}
    assert [j.case.label for j in plan_stage(first, done)] == [labels[7]]


# ---- the stage in a sweep and the export rule ------------------------------------------------------------

def test_no_confirm_exports_the_baseline_unless_asked(tmp_path) -> None:
    """A sweep with --no-confirm writes neither screen.jsonl nor confirm.jsonl (though its bucket has more
    candidates than the confirmation takes); its export ships the baseline in every bucket, and
    --unconfirmed ships the first pass's picks with meta.unconfirmed set."""
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "t", "backend": "gloo", "world_size": 2, "dtypes": ["float32"],
                                    "shapes": [{"name": "t/o", "K": 64, "N": 64}], "tokens": [32],
                                    "strategies": [{"name": "baseline"}, {"name": "pr"},
                                                   {"name": "chunked", "chunks": [2, 3, 4, 8]}],
                                    "warmup": 1, "reps": 2}))
    run = CliRunner()
    out = tmp_path / "run"
    res = run.invoke(app, ["sweep", str(spec), "--out", str(out), "--no-confirm"])
    assert res.exit_code == 0, res.output
    assert not (out / "confirm.jsonl").exists() and "not confirmed" in res.output
    assert not (out / "screen.jsonl").exists()
    for flag, meta in (([], False), (["--unconfirmed"], True)):
        res = run.invoke(app, ["export", str(out), "-o", str(tmp_path / "p.yaml")] + flag)
        assert res.exit_code == 0, res.output
        doc = yaml.safe_load((tmp_path / "p.yaml").read_text())
        assert doc["meta"]["unconfirmed"] is meta
        [bucket] = doc["shapes"]["64,64"]["buckets"].values()
        want = select.best(load_records(out).records)[0].strategy if meta else "baseline"
        assert bucket["strategy"] == want and "confirmation" not in bucket


def test_ship_follows_the_confirmed_ci() -> None:
    """Injected records: a bucket whose candidate is confirmed 10% faster ships it with its confirmed numbers
    (the speedup to expect: the CI's lower bound); a bucket whose leader confirms as a tie ships the baseline;
    the first pass's pick does not matter."""
    recs = [rec(m, "baseline", 1.0) for m in (32, 64)] + [rec(m, "pr", 0.5) for m in (32, 64)]
    assert [b.strategy for b in select.best(recs)] == ["pr", "pr"]  # the first pass says 2x
    tags = {"first_pass_speedup": 2.0, "candidates": 2}
    fast = ab_records(recs[2], "confirm", 1.10, 8, screened=5, **tags)
    tie = ab_records(recs[3], "confirm", 1.0, 8, **tags)
    shipped = {d.key.M: d for d in select.decide(recs, fast + tie)}
    assert shipped[32].strategy == "pr" and shipped[32].speedup == pytest.approx(1.10)
    c = shipped[32].confirmation
    assert c.ci[0] > 1.01 and c.expected == c.ci[0] and c.repeats == 8 and c.screened == 5
    assert c.leader_first_pass_speedup == 2.0 and c.candidates == 2
    assert shipped[64].strategy == "baseline" and shipped[64].speedup == 1.0
    assert shipped[64].confirmation.leader_speedup == pytest.approx(1.0)
    assert shipped[64].confirmation.expected == 1.0 and shipped[64].confirmation.screened == 0
    assert (shipped[32].why, shipped[64].why) == ("confirmed", "baseline: not confirmed")
    assert [d.why for d in select.decide(recs, fast)] == ["confirmed", "baseline: no confirmation"]
    assert {d.why for d in select.decide(recs, unconfirmed=True)} == {"first pass (unconfirmed)"}
