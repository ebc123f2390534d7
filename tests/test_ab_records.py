"""Every A/B measurement (``compare A B`` and the sweep's confirmation stage) is written as Records through the
run folder and judged from them; CPU, 2 gloo ranks.

The checks read the records' JSON lines themselves and recompute what the tables should say, so a side's
samples mixed up, a repeat dropped or a failed side timed shows as a mismatch.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from overlap_bench import confirm, runfolder, select, strategies
from overlap_bench.bench import BenchOptions, run_ab
from overlap_bench.cli import app
from overlap_bench.compare import compare_run_dirs
from overlap_bench.launch import JobConfig, launch
from overlap_bench.records import SCREEN, Record, load_records
from overlap_bench.stats import SCREEN_REPEATS
from overlap_bench.sweep import plan_stage
from overlap_bench.spec import Case
from test_metrics_numerics import _wrong, _WrongSettings

RUN = ["--repeats", "2", "--tokens", "32", "--reps", "2", "--warmup", "1", "--nproc", "2", "--backend", "gloo"]


def _ok(args: list[str]) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def two_compares(tmp_path_factory) -> tuple[Path, Path]:
    """Two live ``compare baseline pr --out`` folders (the same comparison measured twice)."""
    root = tmp_path_factory.mktemp("ab")
    for name in ("a", "b"):
        _ok(["compare", "baseline", "pr", *RUN, "--out", root / name])
    return root / "a", root / "b"


def test_compare_writes_one_record_per_region_and_side_and_is_judged_from_them(two_compares):
    out = two_compares[0]
    recs = _lines(out / runfolder.RECORDS)
    cases = {(r["shape"], r["M"]) for r in recs}
    assert len(cases) == 2  # the smoke shapes (2) at M 32
    assert len(recs) == 2 * 2 * len(cases) and all(r["kind"] == "compare" and r["ok"] for r in recs)
    for shape, M in cases:
        mine = [r for r in recs if (r["shape"], r["M"]) == (shape, M)]
        assert sorted((r["extra"]["side"], r["extra"]["repeat"]) for r in mine) == [("a", 0), ("a", 1), ("b", 0),
                                                                                    ("b", 1)]
        # the order alternates per pair (A B, then B A), and each record says which side ran first
        assert [(r["extra"]["side"], r["extra"]["first"]) for r in mine] == [("a", "a"), ("b", "a"), ("b", "b"),
                                                                             ("a", "b")]
        assert {(r["extra"]["side"], r["label"], r["strategy"]) for r in mine} == {("a", "baseline", "baseline"),
                                                                                 ("b", "pr", "pr")}
        assert all(r["extra"]["pair"] == ["baseline", "pr"] and r["rel_err"] <= r["tol"] and r["t_ms"] > 0
                   and r["world"] == 2 and r["backend"] == "gloo" for r in mine)
    for name in ("compare.json", "compare.md", "env.json"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / runfolder.LOCK).exists()
    rows = json.loads((out / runfolder.COMPARE_JSON).read_text())["rows"]
    assert len(rows) == len(cases)
    for row in rows:
        for side in "ab":
            mine = sorted((r for r in recs if (r["shape"], r["M"], r["extra"]["side"]) ==
                           (row["shape"], row["M"], side)), key=lambda r: r["extra"]["repeat"])
            tps = [r["tokens_per_s"] for r in mine]
            assert row[f"samples_{side}"] == pytest.approx(tps)
            assert row[f"median_{side}"] == pytest.approx(statistics.median(tps))
        assert row["speedup"] == pytest.approx(row["median_b"] / row["median_a"])
        assert (row["a_label"], row["b_label"]) == ("baseline", "pr")


def test_compare_into_a_folder_holding_a_comparison_is_refused(two_compares):
    before = (two_compares[0] / runfolder.RECORDS).read_text()
    res = CliRunner().invoke(app, ["compare", "baseline", "pr", *RUN, "--out", str(two_compares[0])])
    assert res.exit_code == 2 and "choose a new --out" in res.output
    assert (two_compares[0] / runfolder.RECORDS).read_text() == before


def test_compare_two_compare_folders(two_compares, tmp_path):
    """Compare folders are record folders: ``compare DIR_A DIR_B`` pairs each side's label across them."""
    a, b = two_compares
    doc = json.loads(_ok(["compare", a, b, "--json", "--out", tmp_path / "c"]))
    rows = doc["rows"]
    assert len(rows) == 4 and {r["a_label"] for r in rows} == {"baseline", "pr"}
    assert all(r["a_label"] == r["b_label"] for r in rows)
    ra, rb = _lines(a / runfolder.RECORDS), _lines(b / runfolder.RECORDS)
    for row in rows:
        for recs, side in ((ra, "a"), (rb, "b")):
            want = [r["tokens_per_s"] for r in recs if (r["shape"], r["M"], r["label"]) ==
                    (row["shape"], row["M"], row["a_label"])]
            assert row[f"samples_{side}"] == pytest.approx(want)
    assert (tmp_path / "c" / "compare.md").exists() and not (tmp_path / "c" / runfolder.RECORDS).exists()


def test_unavailable_side_is_one_record_per_case_and_nothing_is_timed(tmp_path):
    res = CliRunner().invoke(app, ["compare", "baseline", "asynctp", *RUN, "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    recs = _lines(tmp_path / "d" / runfolder.RECORDS)
    assert len(recs) == 2 and all(r["status"] == "unavailable" and r["extra"]["side"] == "b" for r in recs)
    assert all(r["t_ms"] is None and "repeat" not in r["extra"] for r in recs)
    assert json.loads((tmp_path / "d" / runfolder.COMPARE_JSON).read_text())["rows"] == []
    assert "not compared" in res.output and "asynctp: unavailable" in res.output


def _ab_with_a_wrong_strategy(ctx, *args):
    if "test_wrong" not in strategies.REGISTRY:  # registered in the ranks only
        strategies.register("test_wrong", _WrongSettings, "planted wrong output (tests only)")(_wrong)
    run_ab(ctx, *args)


def test_side_failing_numerics_is_one_failed_record_per_case(tmp_path):
    """Wrong on rank 1 only: still one failed record per case (side b), and no timed record of either side."""
    base = strategies.make_settings("baseline")
    cases = [Case("t/o", 32, 48, m, "float32", False, "baseline", base, ()) for m in (16, 24)]
    sides = (("baseline", base), ("test_wrong", _WrongSettings(factor=1.01, rank=1)))
    launch(_ab_with_a_wrong_strategy, (cases, sides, 3, BenchOptions(str(tmp_path), 1, 2)),
           JobConfig(2, "gloo", 60))
    recs = _lines(tmp_path / runfolder.RECORDS)
    assert [(r["M"], r["status"], r["extra"]["side"], r["label"]) for r in recs] == [
        (16, "failed", "b", "test_wrong:factor=1.01,rank=1"), (24, "failed", "b", "test_wrong:factor=1.01,rank=1")]
    assert all("tolerance" in r["reason"] and r["t_ms"] is None for r in recs)
    df, unmatched = compare_run_dirs(tmp_path)
    assert len(df) == 0 and len(unmatched) == 2 and all("test_wrong" in u and "failed" in u for u in unmatched)


# ---- the confirmation stage ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def confirmed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conf")
    spec = root / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "t", "backend": "gloo", "world_size": 2, "dtypes": ["float32"], "shapes": [{"name": "t/o", "K": 64,
        "N": 64}], "tokens": [32, 48], "warmup": 1, "reps": 2, "confirm_repeats": 7,
        "strategies": [{"name": "baseline"}, {"name": "pr"}, {"name": "chunked", "chunks": [2, 3]}]}))
    _ok(["sweep", spec, "--out", root / "run", "--confirm-top", "1"])  # 3 settings: the screen runs
    return root / "run"


def _md_rows(text: str, first: str) -> list[dict[str, str]]:
    """The rows of every markdown table in ``text`` whose first header cell is ``first``."""
    out, header = [], None
    for ln in (ln for ln in text.splitlines() if ln.startswith("| ")):
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if cells[0] == first:
            header = cells
        elif header and not set(ln) <= set("|-: "):
            out.append(dict(zip(header, cells)))
    return out


def test_confirmation_is_decided_once_and_rendered_alike(confirmed, tmp_path):
    """The decision is made once: what the confirmation records say (recomputed here from their lines with
    ``confirm.decide``) is what ``select.decide`` ships, and tables.md, summary.md and the exported policy
    render that one decision for every bucket (the first pass's winner in the tables, what ships in the
    summary's confirmation table and in the policy)."""
    lines = _lines(confirmed / runfolder.CONFIRM)
    assert lines and all(r["kind"] == "confirm" and r["ok"] for r in lines)
    # what was measured, straight from the lines: bucket M -> candidate -> (baseline, candidate) tokens/s
    raw: dict[int, dict[str, tuple[list, list]]] = {}
    first: dict[tuple[int, str], float] = {}
    for r in lines:
        a, b = r["extra"]["pair"]
        assert a == "baseline" and r["label"] == (a if r["extra"]["side"] == "a" else b)
        raw.setdefault(r["M"], {}).setdefault(b, ([], []))[r["extra"]["side"] == "b"].append(r["tokens_per_s"])
        first[r["M"], b] = r["extra"]["first_pass_speedup"]
    assert sorted(raw) == [32, 48]
    assert all(len(sa) == len(sb) == 7 for per in raw.values() for sa, sb in per.values())
    # the screen measured all 3 settings (more than the 1 + pr confirmed), and the confirmation took its best
    screen = confirm.by_bucket(confirm.load(confirmed, SCREEN))
    scored = select.score(load_records(confirmed).records)
    for key, per in screen.items():
        assert len(per) == 3 and all(len(sa) == len(sb) == SCREEN_REPEATS for sa, sb in per.values())
        first_pass = {r.label: r.speedup for r in scored if r.bucket == key}
        assert sorted(raw[key.M]) == sorted(confirm.finalists(first_pass, per, strategies.peers(), top=1))
    assert sorted(k.M for k in screen) == [32, 48]
    assert all(r["kind"] == "screen" for r in _lines(confirmed / SCREEN))
    recs = confirm.load(confirmed)
    assert len(recs) == len(lines)
    shipped = {d.key.M: d for d in select.decide(load_records(confirmed).records, recs)}
    _ok(["export", confirmed, "-o", tmp_path / "p.yaml"])
    policy = yaml.safe_load((tmp_path / "p.yaml").read_text())["shapes"]["64,64"]["buckets"]
    summary = (confirmed / runfolder.SUMMARY).read_text()
    section = {part.split("\n")[0].split(" ")[0]: part for part in summary.split("\n## ")}
    confirmation = {int(r["M"]): r for r in _md_rows(section["Confirmation"], "shape")}
    groups = {int(r["M"]): r for r in _md_rows(section["t/o"], "M")}
    ticked = {int(r["M"]): r for r in _md_rows((confirmed / runfolder.TABLES_MD).read_text(), "M") if r["best"]}
    assert sorted(policy) == sorted(confirmation) == sorted(groups) == sorted(ticked) == sorted(shipped)
    for M, per in raw.items():
        order = sorted(per, key=lambda lab: -first[M, lab])
        d, dec = confirm.decide(per, {lab: first[M, lab] for lab in per}), shipped[M]
        assert (dec.label, dec.why) == (d.label, "baseline: not confirmed" if d.label == "baseline" else "confirmed")
        assert dec.speedup == pytest.approx(d.speedup)
        c = dec.confirmation
        assert c.leader == order[0] and c.leader_first_pass_speedup == first[M, order[0]]
        assert c.leader_speedup == pytest.approx(d.leader_speedup) and c.repeats == 7 and c.screened == 3
        if d.label != "baseline":  # strategy and settings come from the candidate's own records
            cand = next(r for r in lines if r["M"] == M and r["label"] == d.label)
            assert (dec.strategy, dec.settings) == (cand["strategy"], cand["settings"])
        # the first pass's winner: tables.md's tick and summary.md's group table
        assert ticked[M]["label"].strip("*") == groups[M]["best setting"].strip("`") == dec.best.label
        if dec.best.strategy != "baseline":  # a baseline tick is its own record, against the reference
            assert float(ticked[M]["speedup"]) == pytest.approx(dec.best.speedup, abs=5e-4)
        assert groups[M]["speedup"] == f"{dec.best.speedup:.3f}"
        # what ships: summary.md's confirmation table and the policy
        row = confirmation[M]
        assert row["ships"] == f"`{dec.label}`" and row["shipped [CI]"].startswith(f"{dec.speedup:.3f}")
        assert row["confirmed [CI]"].startswith(f"{d.leader_speedup:.3f}")
        assert policy[M]["strategy"] == dec.strategy
        assert policy[M]["speedup"] == pytest.approx(dec.speedup, abs=1e-4)
        assert policy[M]["confirmation"]["speedup"] == pytest.approx(d.speedup, abs=1e-4)
        pc = policy[M]["confirmation"]  # the speedup to expect: the CI's lower bound (1 for the baseline)
        assert pc["expected"] == (pc["ci"][0] if d.label != "baseline" else 1.0) and pc["expected_is"] == "ci_low"
        assert row["expect"] == f"{d.expected:.3f}"
        assert policy[M]["settings"] == strategies.settings_dict(strategies.make_settings(dec.strategy, dec.settings))


def test_a_candidate_cut_short_is_measured_again_on_resume(confirmed, tmp_path):
    """A run killed inside a candidate's repeats leaves part of its records (here its last one torn): that
    candidate is not confirmed from them, the resumed sweep measures it again, the others stay."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(confirmed, run)
    text = (run / runfolder.CONFIRM).read_text().splitlines(keepends=True)
    cut = json.loads(text[-1])
    (run / runfolder.CONFIRM).write_text("".join(text[:-1]) + text[-1][:40])
    key = confirm.candidate_key(Record.from_json(cut))
    kept = confirm.load(run)
    assert key not in {confirm.candidate_key(r) for r in kept} and len(kept) == len(text) - 14
    screen = confirm.by_bucket(confirm.load(run, SCREEN))
    jobs = plan_stage(runfolder.RunFolder(run).load().records, {confirm.candidate_key(r) for r in kept}, screen, top=1)
    assert [(j.case.M, j.case.label) for j in jobs] == [(cut["M"], cut["extra"]["pair"][1])]
    assert jobs[0].case.settings == strategies.make_settings(cut["strategy"], cut["settings"])
    screened = (run / SCREEN).read_text()
    out = _ok(["sweep", confirmed.parent / "s.yaml", "--out", run, "--resume", "--confirm-top", "1"])
    assert "0 screened, 1 candidate(s) confirmed" in out and (run / SCREEN).read_text() == screened
    again = confirm.load(run)
    assert len(again) == len(text) and sum(confirm.candidate_key(r) == key for r in again) == 14


def test_every_environment_variant_gets_its_own_confirmation(tmp_path, capfd):
    # The stages run in each variant's job (its variables are set before CUDA starts) on that variant's
    # buckets: a variant whose buckets were not matched to its job would go unscreened or unconfirmed.
    variant = {"OVERLAP_BENCH_TEST_VARIANT": "1"}
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "t", "backend": "gloo", "world_size": 2, "dtypes": ["float32"], "shapes": [{"name": "t/o", "K": 64,
        "N": 64}], "tokens": [32], "warmup": 1, "reps": 2, "confirm_repeats": 7, "env": [{}, variant],
        "strategies": [{"name": "baseline"}, {"name": "chunked", "chunks": [2, 3]}]}))
    _ok(["sweep", spec, "--out", tmp_path / "run", "--confirm-top", "1"])  # 2 settings: the screen runs
    for name, n, repeats in ((SCREEN, 2, SCREEN_REPEATS), (runfolder.CONFIRM, 1, 7)):
        recs = confirm.load(tmp_path / "run", name)
        assert {tuple(sorted(r.env.items())) for r in recs} == {(), tuple(variant.items())}
        assert all(len([r for r in recs if r.env == env]) == n * 2 * repeats for env in ({}, variant))  # 2 sides
    # Rank 0 draws a bar per stage of each variant's job, on the sweep's stdout (here a pipe: its last state).
    bars = [ln.split()[:3] for ln in capfd.readouterr().out.splitlines() if ln.split()[1:2] and "━" in ln.split()[1]]
    assert [(b[0], b[2]) for b in bars] == [("sweep", "3/6"), ("screen", "2/2"), ("confirm", "1/1"),
                                            ("sweep", "6/6"), ("screen", "2/2"), ("confirm", "1/1")], bars
