"""The README's promises that a user acts on, each tested from its own words with hand-made inputs (records,
policy files, samples, specs) in this process: what ``export`` ships and why, how the policy and the drop-in
layer choose, what a verdict means, what ``--resume`` accepts, what a nano-batch range and a split cover, and
what the interference command's rates and pacing mean in units of the clock. Nothing here is timed."""

from __future__ import annotations

import logging
import math
import random

import pytest
import torch
import torch.distributed as dist
import yaml
from typer.testing import CliRunner

from overlap_bench import confirm, export, policy, runfolder, strategies, sweep
from overlap_bench.cli import app
from overlap_bench.errors import UserError
from overlap_bench.keys import case_key
from overlap_bench.layer import RowParallelLinear
from overlap_bench.presets import PRESETS
from overlap_bench.records import CONFIRM, Record
from overlap_bench.research import comm_like, decoder, model, nanobatch
from overlap_bench.research import interference as itf
from overlap_bench.spec import parse_spec
from overlap_bench.stats import judge

approx = pytest.approx


@pytest.fixture(scope="module")
def gloo1():
    """A one-rank gloo process group in this process (the layer and the schedule need one)."""
    mine = not dist.is_initialized()
    if mine:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if mine:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ export: what ships and why


def first(M: int, label: str, t: float) -> Record:
    """A first-pass record of shape s (K = N = 64) at M, ``t`` ms against a 1.0 ms reference."""
    name, settings = strategies.parse(label)
    return Record(shape="s", K=64, N=64, M=M, dtype="float32", world=2, backend="gloo", device="cpu",
                  strategy=name, settings=strategies.settings_dict(settings), label=strategies.label(name, settings),
                  env={}, t_ms=t, t_iqr_ms=0.0, t_base_ms=1.0, t_base_iqr_ms=0.0, t_gemm_ms=0.2, t_comm_ms=0.3)


def pairs(cand: Record, a: list[float], b: list[float], repeats: int | None = None) -> list[Record]:
    """Confirmation records of ``cand`` against the baseline as the sweep writes them: pair i is (a[i], b[i])
    tokens/s; ``repeats`` (default: the pairs given) is what the run meant to measure."""
    n = len(a) if repeats is None else repeats
    out = []
    for i, (ta, tb) in enumerate(zip(a, b)):
        for side, r, tps in (("a", first(cand.M, "baseline", 1.0), ta), ("b", cand, tb)):
            out.append(Record(**{**r.__dict__, "kind": "confirm", "tokens_per_s": tps, "extra": {
                "side": side, "repeat": i, "repeats": n, "pair": ["baseline", cand.label],
                "first_pass_speedup": 2.0, "candidates": 3}}))
    return out


FAST = "chunked:chunks=2,comm=stream"
BASE = [100.0, 101.0, 102.0] * 3  # the baseline's tokens/s over 9 pairs


def make_run(path) -> dict[int, str]:
    """A run whose first pass picks FAST (2x) at every M; what its confirmation says, per M."""
    folder = runfolder.RunFolder(path)
    ms = {64: "confirmed 10% faster", 128: "confirmed a tie", 256: "never confirmed",
          512: "cut short by a crash", 1024: "confirmed exactly 1 + min_effect faster",
          2048: "a plain reference, never confirmed"}
    for m in ms:
        folder.append(first(m, "baseline", 1.0))
        folder.append(first(m, FAST if m != 2048 else "baseline:comm=oneshot", 0.5))
        folder.append(first(m, "pr", 0.9))
    conf = {64: pairs(first(64, FAST, 0.5), BASE, [1.10 * x for x in BASE]),
            128: pairs(first(128, FAST, 0.5), BASE, BASE),
            512: pairs(first(512, FAST, 0.5), BASE[:3], [2.0 * x for x in BASE[:3]], repeats=9),
            1024: pairs(first(1024, FAST, 0.5), [100.0] * 9, [101.0] * 9)}
    for recs in conf.values():
        for r in recs:
            folder.append(r, CONFIRM)
    return ms


def test_export_ships_a_setting_only_where_the_confirmation_cleared_1_plus_min_effect(tmp_path):
    """README, Policy files: a setting other than the ring baseline (a plain reference too) ships only where the
    confirmation measured its CI lower bound above 1 + 0.01; a bucket without confirmation (never measured,
    or cut short) ships the baseline; the speedup to expect is that lower bound (1.0 where the baseline ships)."""
    ms = make_run(tmp_path / "run")
    [path] = export.export_policy(tmp_path / "run", tmp_path / "p.yaml")
    doc = yaml.safe_load(path.read_text())
    buckets = doc["shapes"]["64,64"]["buckets"]
    assert sorted(buckets) == sorted(ms)
    shipped = {m: (b["strategy"], b["settings"]) for m, b in buckets.items()}
    ring = ("baseline", {"comm": "nccl"})
    assert shipped == {64: ("chunked", shipped[64][1]), 128: ring, 256: ring, 512: ring, 1024: ring, 2048: ring}, ms
    assert shipped[64][1]["chunks"] == 2
    c = buckets[64]["confirmation"]
    assert c["ci"][0] > 1.01 and c["expected"] == c["ci"][0] and c["expected_is"] == "ci_low"
    assert c["speedup"] == approx(1.10, abs=1e-3)
    assert buckets[128]["confirmation"]["expected"] == 1.0 and buckets[1024]["confirmation"]["expected"] == 1.0
    assert all("confirmation" not in buckets[m] for m in (256, 512, 2048))
    assert doc["meta"]["unconfirmed"] is False
    res = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "-o", str(tmp_path / "cli.yaml")])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((tmp_path / "cli.yaml").read_text())["shapes"] == doc["shapes"]  # the command ships alike


def test_export_unconfirmed_ships_first_pass_picks_only_where_nothing_was_confirmed(tmp_path):
    """README: with ``--unconfirmed`` a bucket without confirmation ships the first pass's pick and
    ``meta.unconfirmed: true`` says so; a bucket the confirmation measured keeps what it decided."""
    make_run(tmp_path / "run")
    [path] = export.export_policy(tmp_path / "run", tmp_path / "p.yaml", unconfirmed=True)
    doc = yaml.safe_load(path.read_text())
    got = {m: strategies.label(b["strategy"], strategies.make_settings(b["strategy"], b["settings"]))
           for m, b in doc["shapes"]["64,64"]["buckets"].items()}
    assert got == {64: FAST, 128: "baseline", 256: FAST, 512: FAST, 1024: "baseline",
                   2048: "baseline:comm=oneshot"}
    assert doc["meta"]["unconfirmed"] is True


def test_of_several_confirmed_candidates_the_highest_lower_bound_ships():
    """README, Confirmation stage: of several candidates that pass, the one with the highest bound ships (not
    the highest point estimate, which is still the best of k)."""
    noisy = ([100.0] * 10, [130.0] * 6 + [102.0] * 4)  # median ratio 1.30, but a resample's median often 1.02
    steady = ([100.0] * 10, [110.0] * 10)                 # 1.10 in every resample
    d = confirm.decide({"noisy": noisy, "steady": steady}, {"noisy": 1.5, "steady": 1.2})
    assert d.label == "steady" and d.speedup == approx(1.10) and d.expected == approx(1.10)
    assert d.leader == "noisy" and d.leader_speedup == approx(1.30) and d.leader_ci[0] < 1.10


# ------------------------------------------------------------------------------ the confirmation's records


def test_a_candidate_measured_again_is_read_from_its_second_measurement(tmp_path):
    """README: ``--resume`` measures a candidate cut short by a crash again; its confirmation is then read from
    the complete measurement, never mixed with the pairs of the attempt that was cut short."""
    folder = runfolder.RunFolder(tmp_path)
    cand = first(64, FAST, 0.5)
    folder.append(first(64, "baseline", 1.0))
    folder.append(cand)
    cut = pairs(cand, [1.0, 1.0, 1.0], [999.0, 999.0, 999.0], repeats=8)  # 3 of 8 pairs, then the crash
    again = pairs(cand, [100.0, 101.0, 102.0, 103.0, 104.0], [110.0, 111.0, 112.0, 113.0, 114.0])  # resumed, 5
    for r in cut + again:
        folder.append(r, CONFIRM)
    [(bucket, samples)] = confirm.by_bucket(confirm.load(tmp_path)).items()
    assert samples == {FAST: ([100.0, 101.0, 102.0, 103.0, 104.0], [110.0, 111.0, 112.0, 113.0, 114.0])}
    assert bucket.M == 64


# ------------------------------------------------------------------------------ the policy's lookup

SHAPE_BUCKETS = {1: "baseline", 64: "pr", 512: "chunked:chunks=2", 4096: "chunked:chunks=4",
                 16384: "chunked:chunks=8,split=edges"}
OTHER_BUCKETS = {256: "chunked:chunks=3", 32768: "pr"}


def _policy_text(order: list[int], other: list[int]) -> str:
    def entry(label: str) -> str:
        name, settings = strategies.parse(label)
        return yaml.safe_dump({"strategy": name, "settings": strategies.settings_dict(settings)},
                              default_flow_style=True).strip()

    lines = ["meta: {device: cpu, world_size: 2, dtype: float32}", "shapes:", "  '8, 6':", "    buckets:"]
    lines += [f"      {m}: {entry(SHAPE_BUCKETS[m])}" for m in order]
    lines += ["  '16,6':", "    buckets:"] + [f"      {m}: {entry(OTHER_BUCKETS[m])}" for m in other]
    return "\n".join(lines) + "\n"


def _want(buckets: dict[int, str], m: int) -> str | None:
    """From the README: each bucket applies from its M up to the next one; below the smallest, the baseline."""
    below = [b for b in buckets if b <= m]
    return strategies.label(*strategies.parse(buckets[max(below)])) if below else None


ORDERS = [sorted(SHAPE_BUCKETS), sorted(SHAPE_BUCKETS, reverse=True), [4096, 1, 16384, 64, 512],
          [512, 16384, 4096, 64, 1]]


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: ",".join(map(str, o)))
def test_a_hand_written_policy_in_any_order_answers_by_m(tmp_path, order):
    """README, Policy files: buckets per (K, N), each from its M up to the next one, whatever order a
    hand-written file lists them in (here with M of 1 to 5 digits); below the smallest bucket the baseline."""
    path = tmp_path / "p.yaml"
    path.write_text(_policy_text(order, [32768, 256]))
    pol = policy.load_policy(path, expect_world=2)
    edges = sorted({x + d for x in list(SHAPE_BUCKETS) + list(OTHER_BUCKETS) for d in (-1, 0, 1) if x + d >= 1})
    for m in edges + [10**6]:
        for (k, n), buckets in (((8, 6), SHAPE_BUCKETS), ((16, 6), OTHER_BUCKETS)):
            c = pol.choose(K=k, N=n, M=m)
            want = _want(buckets, m)
            assert (c.label, c.bucket) == ((want, max(b for b in buckets if b <= m)) if want else
                                           ("baseline", None)), (k, n, m)


def test_an_unknown_shape_runs_the_baseline_warned_once(tmp_path, caplog):
    """README: unknown shapes fall back to the baseline with a logged warning."""
    path = tmp_path / "p.yaml"
    path.write_text(_policy_text(sorted(SHAPE_BUCKETS), sorted(OTHER_BUCKETS)))
    pol = policy.load_policy(path)
    with caplog.at_level(logging.WARNING, logger="overlap_bench.policy"):
        for m in (1, 4096, 10**6):
            c = pol.choose(K=6, N=8, M=m)  # K and N swapped: another shape
            assert (c.strategy, c.bucket, c.label) == ("baseline", None, "baseline")
    assert caplog.text.count("K=6, N=8") == 1


# ------------------------------------------------------------------------------ the drop-in layer

LAYER_POLICY = {"meta": {"device": "cpu", "world_size": 1, "dtype": "float32"},
                "shapes": {"8,6": {"buckets": {1: {"strategy": "baseline"},
                                               4: {"strategy": "chunked", "settings": {"chunks": 2}},
                                               8: {"strategy": "chunked", "settings": {"chunks": 3}},
                                               30: {"strategy": "chunked", "settings": {"chunks": 30}}}}}}


def _layer(tmp_path) -> RowParallelLinear:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(LAYER_POLICY))
    torch.manual_seed(0)
    return RowParallelLinear(8, 6, policy=policy.load_policy(path))


@pytest.mark.parametrize("lead", [(10,), (2, 5), (5, 2), (1, 3), (3, 1), (2, 2), (2, 2, 2), (1, 30), (3, 10)])
def test_the_layer_chooses_by_token_rows_of_2d_and_3d_inputs(gloo1, tmp_path, lead):
    """README, Policy files: the policy is keyed by token rows M: every row of ``[..., hidden]`` (``[batch, seq,
    hidden]``: batch x seq); the layer's answer is ``policy.choose(K per rank, N, M)`` and its output that of
    nn.Linear, in the input's shape."""
    layer = _layer(tmp_path)
    m = math.prod(lead)
    x = torch.randn(*lead, 8)
    y = layer(x)
    want = layer.policy.choose(K=8, N=6, M=m)
    assert (layer.last_choice.label, layer.last_choice.bucket) == (want.label, want.bucket)
    assert want.bucket == max(b for b in (1, 4, 8, 30) if b <= m)
    assert y.shape == (*lead, 6)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_a_bucket_with_as_many_chunks_as_rows_runs_and_one_with_more_runs_the_baseline(gloo1, tmp_path, caplog):
    """README, Validation equals execution: a bucket that cannot apply to the M at hand (more chunks than rows)
    runs the baseline for that call, with one warning; with exactly one row per chunk it applies."""
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**LAYER_POLICY, "shapes": {"8,6": {"buckets": {
        1: {"strategy": "chunked", "settings": {"chunks": 4}}}}}}))
    layer = RowParallelLinear(8, 6, policy=policy.load_policy(path))
    with caplog.at_level(logging.WARNING, logger="overlap_bench.layer"):
        for m, ran in ((4, "chunked:chunks=4,comm=stream"), (5, "chunked:chunks=4,comm=stream"), (3, "baseline"),
                       (2, "baseline"), (4, "chunked:chunks=4,comm=stream")):
            x = torch.randn(m, 8)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
            assert layer.last_choice.label == ran, m
    assert caplog.text.count("cannot run") == 1


# ------------------------------------------------------------------------------ what a verdict means

A8 = [1.0] * 8


@pytest.mark.parametrize("b, side", [([1.0] * 3 + [1.1] * 5, "lo"), ([1.0] * 3 + [0.9] * 5, "hi")])
def test_a_ci_bound_touching_1_holds_1(b, side):
    """README, compare: ``no significant difference`` when the CI holds 1 (a bound exactly at 1 holds it);
    ``p < 0.05`` exactly when the CI leaves 1 out. Three of eight samples at 1.0: a resample's median is 1.0
    in 14% of resamples, so that bound is exactly 1."""
    c = judge(A8, b)
    assert (c.ci_low if side == "lo" else c.ci_high) == 1.0
    assert c.ci_low < c.ci_high
    assert c.verdict == "no significant difference" and c.p_value >= 0.05


@pytest.mark.parametrize("tps, min_effect", [(125.0, 0.25), (75.0, 0.25), (101.0, 0.01), (99.0, 0.01)])
def test_a_ci_exactly_at_1_plus_min_effect_is_below_min_effect_and_does_not_ship(tps, min_effect):
    """README: ``faster``/``slower`` when the CI clears 1 ± min_effect, ``below min_effect`` when it leaves 1
    out but not that threshold; a setting ships when its lower bound *exceeds* 1 + 0.01. Constant samples: the
    CI is the exact ratio, here exactly on the threshold."""
    a, b = [100.0] * 8, [tps] * 8
    up = tps > 100
    assert b[0] / a[0] == (1 + min_effect if up else 1 - min_effect)  # exactly on it, no rounding
    c = judge(a, b, min_effect=min_effect)
    assert c.ci_low == c.ci_high == b[0] / a[0] and c.verdict == "below min_effect" and c.p_value < 0.05
    assert confirm.decide({"x": (a, b)}, min_effect=min_effect).label == "baseline"
    past = judge(a, [tps + (0.1 if up else -0.1)] * 8, min_effect=min_effect)
    assert past.verdict == ("faster" if up else "slower")


def test_unequal_sample_sizes_resample_each_side_at_its_own_size():
    """README: the CI is the percentile bootstrap of the ratio of medians: each side resampled at its own size
    (pairs only where both sides have one per repeat). A resample of a = 1..5 (5 values) has median 1 (or 5)
    in 5.8% of resamples, beyond the 2.5% tail, so the CI reaches 10/1 and 10/5; of 25 values almost never."""
    c = judge([1.0, 2.0, 3.0, 4.0, 5.0], [10.0] * 25)
    assert (c.ci_low, c.ci_high, c.n_a, c.n_b) == (2.0, 10.0, 5, 25)
    c = judge([10.0] * 25, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert (c.ci_low, c.ci_high) == (approx(0.1), approx(0.5))
    # asked for pairs, 10 against 60 samples cannot be paired (10 pairs alone could): every b counts
    c = judge([1.0] * 10, [1.0] * 10 + [2.0] * 50, paired=True)
    assert (c.paired, c.speedup, c.ci_low, c.ci_high) == (False, 2.0, 2.0, 2.0)
    assert judge([1.0] * 4, [1.0] * 50).verdict == "too few samples"  # below 5 on one side


def test_pairs_are_resampled_as_pairs_from_nine_for_a_95_percent_ci():
    """README, compare: an A/B run's repeats are resampled as pairs where (n + 1) 2^-n is at most the tail
    (9 or more pairs at 95%); with fewer the sides are resampled on their own."""
    a = [100.0, 101.0, 99.0, 102.0, 98.0, 100.5, 99.5, 101.5, 100.2]
    b = [x + 10.0 for x in a]
    assert judge(a[:8], b[:8], paired=True).paired is False
    assert judge(a, b, paired=True).paired is True and judge(a, b).paired is False


# ------------------------------------------------------------------------------ what --resume accepts

RAW = {"name": "t", "backend": "gloo", "world_size": 2, "dtypes": ["float32", "bfloat16"],
       "shapes": [{"name": "t/a", "K": 16, "N": 32}, {"name": "t/b", "K": 8, "N": 32}], "tokens": [8, 12],
       "strategies": [{"name": "baseline"}, {"name": "pr"}, {"name": "chunked", "chunks": [2, 3]}],
       "env": [{}, {"A": "1", "B": "2"}], "warmup": 1, "reps": 3}


def _open(out, raw, force=False):
    return sweep.open_run_folder(out, parse_spec(raw), raw, resume=True, force=force, seed=0, command=None)


def _started(tmp_path):
    """A folder a sweep of RAW made and wrote one record into."""
    out = tmp_path / "run"
    sweep.open_run_folder(out, parse_spec(RAW), RAW, resume=False, force=False, seed=0, command=None)
    runfolder.RunFolder(out).append(Record(shape="t/a", K=16, N=32, M=8, dtype="float32", world=2, backend="gloo",
                                           device="cpu", strategy="baseline", settings={}, label="baseline",
                                           env={}, warmup=1, reps=3))
    return out


REORDERED = {
    "keys": dict(reversed(list(RAW.items()))),
    "variables": {**RAW, "env": [{}, {"B": "2", "A": "1"}]},
    "variants": {**RAW, "env": RAW["env"][::-1]},
    "tokens": {**RAW, "tokens": [12, 8]},
    "dtypes": {**RAW, "dtypes": RAW["dtypes"][::-1]},
    "shapes": {**RAW, "shapes": RAW["shapes"][::-1]},
    "strategies": {**RAW, "strategies": [{"name": "chunked", "chunks": [3, 2]}, {"name": "pr"},
                                         {"name": "baseline"}]},
}


@pytest.mark.parametrize("what", list(REORDERED))
def test_resume_accepts_the_same_spec_written_in_another_order(tmp_path, what):
    """README: ``run.json`` holds the hash of the spec's case grid; ``--resume`` refuses another spec. The same
    cases listed in another order (keys, variables, variants, tokens, dtypes, shapes, strategies) are the same
    grid: same hash, resumed without ``--force``, and the resume is not marked forced."""
    out = _started(tmp_path)
    made = runfolder.read_identity(out)
    assert {case_key(c, world=2, backend="gloo") for c in parse_spec(REORDERED[what]).cases()} == \
        {case_key(c, world=2, backend="gloo") for c in parse_spec(RAW).cases()}
    _open(out, REORDERED[what])
    ident = runfolder.read_identity(out)
    assert ident["spec_sha256"] == made["spec_sha256"] == ident["resumes"][-1]["spec_sha256"]
    assert ident["resumes"][-1]["forced"] is False and "spec" not in ident["resumes"][-1]


def test_a_folder_hashed_before_lists_were_sorted_still_resumes_with_its_own_spec(tmp_path, monkeypatch):
    """A folder made by an older version (the grid hashed as listed) resumes with the spec it was made with."""
    sorted_sha = runfolder.grid_sha256
    monkeypatch.setattr(runfolder, "grid_sha256", lambda grid, listed=False: sorted_sha(grid, listed=True))
    out = _started(tmp_path)
    monkeypatch.setattr(runfolder, "grid_sha256", sorted_sha)
    _open(out, RAW)
    assert runfolder.read_identity(out)["resumes"][-1]["forced"] is False
    with pytest.raises(UserError, match="another spec"):
        _open(out, {**RAW, "tokens": [8, 16]})


def test_resume_of_another_spec_needs_force_and_then_says_forced(tmp_path):
    """README: ``--resume`` with another spec or other options exits 2 unless ``--force`` is given (the forced
    spec is then kept in ``run.json``); ``--force`` where nothing differs forces nothing."""
    out = _started(tmp_path)
    other = {**RAW, "tokens": [8, 16]}
    with pytest.raises(UserError, match="another spec"):
        _open(out, other)
    with pytest.raises(UserError, match="reps 3 -> 4"):
        _open(out, {**RAW, "reps": 4})
    _open(out, RAW, force=True)
    _open(out, other, force=True)
    _open(out, RAW)
    resumes = runfolder.read_identity(out)["resumes"]
    assert [r["forced"] for r in resumes] == [False, True, False]
    assert [("spec" in r) for r in resumes] == [False, True, False] and resumes[1]["spec"]["tokens"] == [8, 16]
    assert yaml.safe_load((out / runfolder.SPEC).read_text()) == RAW  # the first spec.yaml stays


# ------------------------------------------------------------------------------ nano-batch ranges, splits


@pytest.mark.parametrize("m", range(1, 14))
def test_nanobatches_are_contiguous_near_equal_ranges_covering_every_token(m):
    """README, Model level: ``nanobatch`` splits the prefill's tokens into ``--nanobatches`` contiguous ranges
    (here 1 to M of them: exactly one row each at M); more ranges than tokens is refused."""
    for n in range(1, m + 1):
        bounds = nanobatch.nano_bounds(m, n)
        sizes = [e - s for s, e in bounds]
        assert len(bounds) == n and bounds[0][0] == 0 and bounds[-1][1] == m
        assert all(e == s2 for (_, e), (s2, _) in zip(bounds, bounds[1:]))
        assert max(sizes) - min(sizes) <= 1  # near-equal
    with pytest.raises(ValueError, match="nanobatches"):
        nanobatch.nano_bounds(m, m + 1)


def test_as_many_nanobatches_as_tokens_runs_and_equals_the_baseline(gloo1):
    """At M = nanobatches every range is one row: the mode runs (not unavailable) and its output equals the
    baseline's; one more nano-batch than tokens is reported unavailable, not run."""
    m = 3
    plans = nanobatch.mode_plans(nanobatch.NanoSettings(m), m, "gloo")
    assert "unavailable" not in plans["nanobatch"] and plans["nanobatch"]["nanobatch"]["rows"] == [1, 1, 1]
    assert "more than the 3 tokens" in nanobatch.mode_plans(nanobatch.NanoSettings(m + 1), m, "gloo")["nanobatch"][
        "unavailable"]
    p = PRESETS["tiny"]
    d = decoder.Dims.of(p, 1)
    kw = dict(dtype=torch.float64, device=torch.device("cpu"), seed=3)
    weights = decoder.build_stack(p, 1, 0, 2, **kw)
    x = decoder.hidden_states(m, p.hidden, **kw)
    base = decoder.stack_forward(weights, x, d, model.strategy_row(
        {layer: ("baseline", strategies.make_settings("baseline")) for layer in decoder.ROW_LAYERS}))
    for attention in nanobatch.ATTENTION:
        y = plans["nanobatch"]["forward"](weights, x, d) if attention == "split" else \
            nanobatch.nanobatch_forward(weights, x, d, nanobatch.NanoSettings(m, attention=attention))
        torch.testing.assert_close(y, base, rtol=1e-12, atol=1e-12)


SPLIT_CASES = [  # (setting, M, ranges worked out by hand from the README's words)
    ("chunked:chunks=3,split=geo,ratio=2.0", 70, [(0, 10), (10, 30), (30, 70)]),       # 1 : 2 : 4
    ("chunked:chunks=3,split=geo,ratio=0.5", 70, [(0, 40), (40, 60), (60, 70)]),       # 4 : 2 : 1
    ("chunked:chunks=4,split=edges", 60, [(0, 10), (10, 30), (30, 50), (50, 60)]),     # half-size first, last
    ("chunked:chunks=3,align=8", 50, [(0, 16), (16, 32), (32, 50)]),                   # edges on multiples of 8
    ("chunked:chunks=4", 4, [(0, 1), (1, 2), (2, 3), (3, 4)]),                          # one row each
    ("chunked:chunks=2,threshold=64", 63, [(0, 63)]),                                   # below: the baseline path
    ("chunked:chunks=2,threshold=64", 64, [(0, 32), (32, 64)]),                         # from the threshold on
    ("pr", 16383, [(0, 16383)]),
    ("pr", 16384, [(0, 5461), (5461, 10922), (10922, 16383), (16383, 16384)]),          # M // 3 and a remainder
]


@pytest.mark.parametrize("label, m, want", SPLIT_CASES)
def test_a_split_covers_the_ranges_its_settings_say(label, m, want):
    """README, Strategies: ``chunked``'s ``chunks``, ``threshold``, ``align``, ``split`` and ``ratio`` and
    ``pr``'s fixed numbers, as the row split a nano-batch runs (``nanobatch+policy`` runs the policy's choice
    inside each range): every setting reaches the ranges."""
    name, settings = strategies.parse(label)
    sp = strategies.get(name).split(m, settings)
    assert [tuple(b) for b in sp.bounds] == want
    assert sp.comm == (None if len(want) == 1 else getattr(settings, "comm", "stream"))


@pytest.mark.parametrize("label", ["chunked:chunks=2,comm=async,priority=true", "chunked:chunks=2,comm=stream"])
def test_a_policy_choice_inside_a_nanobatch_keeps_its_path_and_priority(gloo1, monkeypatch, label):
    """README: ``nanobatch+policy`` runs the policy's choice for the range's row count inside each range, its
    chunks' all-reduces issued the same way: its ``comm`` path over the schedule's own, and ``priority`` on the
    high-priority group (a stand-in group here: gloo has no stream priorities)."""
    name, settings = strategies.parse(label)
    sp = strategies.get(name).split(6, settings)
    assert (sp.comm, sp.priority) == (settings.comm, settings.priority)
    seen = []
    real = nanobatch.start_bounds
    monkeypatch.setattr(nanobatch, "nccl_group", lambda group: "high-priority")

    def start(out, x, weight, bias, group, bounds, comm, comm_group=None, **kw):
        seen.append((tuple(bounds), comm, comm_group))
        return real(out, x, weight, bias, group, bounds, comm, None, **kw)

    monkeypatch.setattr(nanobatch, "start_bounds", start)
    p = PRESETS["tiny"]
    d = decoder.Dims.of(p, 1)
    kw = dict(dtype=torch.float32, device=torch.device("cpu"), seed=1)
    weights = decoder.build_stack(p, 1, 0, 1, **kw)
    split = nanobatch.strategy_split(lambda layer, rows: (name, settings))
    nanobatch.nanobatch_forward(weights, decoder.hidden_states(12, p.hidden, **kw), d,
                                nanobatch.NanoSettings(2, comm="stream"), split)
    group = "high-priority" if settings.priority else None
    assert seen == [(((0, 3), (3, 6)), settings.comm, group)] * 4  # o_proj and down_proj of each range


# ------------------------------------------------------------------------------ interference: rates, pacing


@pytest.mark.parametrize("gbps", [14.0, 1.0, 0.5, 100.0, 333.0])
def test_a_cta_at_rate_r_moves_r_gigabytes_per_second_of_the_gpu_clock(gbps):
    """README, interference: each CTA copies 64 KiB chunks and after each spins on the GPU's nanosecond timer
    until ``chunk / rate`` has passed, so it reads ``--cta-gbps`` GB/s (10^9 bytes a second). The kernel starts
    chunk i no earlier than ``i x period`` ns: over one second of that clock it moves ``rate`` GB, and the
    record's achieved rate reads the same from the CTA's stamps."""
    period = comm_like.period_ns(gbps)
    assert comm_like.CHUNK_BYTES == 64 * 1024
    second = 10**9  # ns of %globaltimer
    chunks = math.ceil(second / period)
    assert chunks * comm_like.CHUNK_BYTES / 1e9 == approx(gbps, rel=2e-3)
    assert comm_like.achieved_gbps(chunks, 7_000, 7_000 + second) == approx(gbps, rel=2e-3)
    assert comm_like.period_ns(0) == 0  # 0: as fast as a CTA copies, no wait


def test_every_repetition_lasts_the_side_works_period(monkeypatch):
    """README: the side work lasts 3.6x the GEMM; ``--pace`` gives every repetition, reference or not, the side
    work's wall time. With a scripted clock, repetitions start that period apart (and back to back unpaced)."""
    gemm_ms = 0.8
    d_ns = itf.side_duration_ns(gemm_ms)
    assert 3.6 * gemm_ms * 1e6 <= d_ns <= (3.6 * gemm_ms + 1.0) * 1e6
    now = [50.0]
    monkeypatch.setattr(itf.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(itf.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    for paced, gap in ((True, d_ns / 1e9), (False, 0.0004)):
        period = itf.rep_period_s(d_ns, paced)
        starts, last = [], None
        for _ in range(4):
            last = itf.pace(last, period)
            starts.append(last)
            now[0] += 0.0004  # the repetition itself: 0.4 ms of host time
        assert [b - a for a, b in zip(starts, starts[1:])] == [approx(gap)] * 3, paced


def test_random_policy_orders_agree(tmp_path):
    """Shuffled bucket orders of one policy (seeded) give one answer per M: the file's order carries nothing."""
    rng = random.Random(5)
    answers = set()
    for i in range(4):
        order = sorted(SHAPE_BUCKETS)
        rng.shuffle(order)
        path = tmp_path / f"p{i}.yaml"
        path.write_text(_policy_text(order, sorted(OTHER_BUCKETS)))
        pol = policy.load_policy(path)
        answers.add(tuple(pol.choose(K=8, N=6, M=m).label for m in range(1, 20000, 97)))
    assert len(answers) == 1
