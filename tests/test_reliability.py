"""Reliability: faults, hangs and bad input cost nothing already measured (CPU / gloo, 2 ranks).

Mid-sweep faults are made deterministic with the test-only hook in ``tests/faults`` (``OVERLAP_BENCH_FAULT``):
``kill:rank=R:after=N`` (rank R SIGKILLs itself after its N-th recorded case) and ``hang:rank=R:after=N`` (rank R
sleeps forever there while its peer waits in the next collective). Jobs that take signals run the CLI as a
subprocess (``python -m overlap_bench``); each carries a unique marker in its environment, so that rank
processes left behind are found by a /proc scan (no psutil).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from overlap_bench import export, policy, report, runfolder, sweep as sweep_mod
from overlap_bench.cli import app
from overlap_bench.launch import RankFailed
from overlap_bench.policy import PolicyError, load_policy
from overlap_bench.records import RECORDS, load_records
from overlap_bench.runfolder import write_atomic
from overlap_bench.spec import SpecError, load_spec, parse_spec
from faults.sitecustomize import FAULT_ENV, HERE as FAULTS_DIR

MARKER = "OVERLAP_BENCH_TEST_MARKER"

# 2 shapes x 2 token counts x 4 settings = 16 cases, each a few ms on CPU.
SPEC = {
    "name": "rel",
    "backend": "gloo",
    "world_size": 2,
    "dtypes": ["float32"],
    "shapes": [{"name": "t/a", "K": 64, "N": 128}, {"name": "t/b", "K": 128, "N": 128}],
    "tokens": [32, 64],
    "strategies": [{"name": "baseline"}, {"name": "pr"}, {"name": "chunked", "chunks": [2, 4]}],
    "warmup": 1,
    "reps": 3,
    "timeout_s": 60,
    "confirm_repeats": 7,  # the confirmation stage runs in these sweeps too: the fewest repeats a spec takes
}


def write_spec(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**SPEC, **changes}, sort_keys=False))
    return path


def expected_keys(spec_path: Path) -> list[tuple]:
    spec, _ = load_spec(spec_path)
    return sorted(sweep_mod._key(c, spec) for c in spec.cases())


def recorded_keys(out: Path) -> list[tuple]:
    """Sorted keys of the records (a duplicate shows as a repeated key)."""
    return sorted(r.key() for r in load_records(out).records)


def in_run_order(spec_path: Path) -> list:
    """The cases in the order one job measures them (grouped by shape, M, dtype; bench._group_key)."""
    spec, _ = load_spec(spec_path)
    return sorted(spec.cases(), key=lambda c: (c.shape, c.K, c.N, c.M, c.dtype, c.bias))


def json_lines(out: Path) -> list[dict]:
    """Every line of records.jsonl, each of which must be a whole JSON record."""
    lines = (out / RECORDS).read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) and {"shape", "M", "label", "status"} <= set(r) for r in recs)
    return recs


def cli_env(marker: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update(extra)
    if FAULT_ENV in extra:  # the hook lives with the tests: put it on every process's path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [FAULTS_DIR, env.get("PYTHONPATH")]))
    if marker:
        env[MARKER] = marker
    return env


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; ``timeout`` only keeps a hung job from hanging the suite."""
    return subprocess.run([sys.executable, "-m", "overlap_bench", *args], env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def cli_here(*args: str):
    """The CLI in this process (where the process boundary is not what a test is about): exit code, stdout."""
    res = CliRunner().invoke(app, list(args), terminal_width=200)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res


def marked_processes(marker: str) -> list[int]:
    """Live processes whose environment holds ``MARKER=marker`` (zombies have an empty environ)."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except OSError:
            continue
    return found


def assert_none_left(marker: str, safety_s: float = 120.0) -> None:
    """Wait until no marked process is left (they end on their own); ``safety_s`` only bounds a failure."""
    deadline = time.monotonic() + safety_s
    while marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = marked_processes(marker)
    for pid in left:  # do not leak them into the rest of the suite, but fail
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert left == [], f"processes left behind: {left}"


def one_line(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------------- 1. a rank killed


@pytest.mark.parametrize("rank", [1, 0])  # 0 is the rank that writes the records
def test_killed_rank_ends_job_records_intact_and_resume_completes(tmp_path, rank):
    # Either rank killed ends the job with the records intact; a resume reads them alike, so rank 0's case
    # resumes (test_launch's launcher-killed sweep resumes too).
    spec, out, marker = write_spec(tmp_path / "spec.yaml"), tmp_path / "run", uuid.uuid4().hex
    res = cli("sweep", str(spec), "--out", str(out), env=cli_env(marker, **{FAULT_ENV: f"kill:rank={rank}:after=3"}))
    assert res.returncode == 1, res.stderr
    err = one_line(res.stderr)
    assert f"error: rank {rank} failed: process killed by SIGKILL" in err, res.stderr
    assert "Traceback" not in res.stderr
    assert_none_left(marker)
    before = json_lines(out)  # every finished record is a whole JSON line
    assert 3 <= len(before) < len(expected_keys(spec)), "the kill was not mid-sweep"
    assert load_records(out).torn_lines == []
    kept = (out / RECORDS).read_text()
    if rank == 1:
        return

    res = cli_here("sweep", str(spec), "--out", str(out), "--resume")
    assert res.exit_code == 0, res.output
    assert f"{len(before)} already recorded (skipped)" in one_line(res.stdout)
    assert (out / RECORDS).read_text().startswith(kept)  # what was measured is untouched
    json_lines(out)
    assert recorded_keys(out) == expected_keys(spec)  # nothing lost, nothing twice
    assert all(r.ok for r in load_records(out).records)


# ----------------------------------------------------------------------------------- 2. a rank hangs


def test_hung_rank_ends_job_through_collective_timeout_naming_the_case(tmp_path):
    spec, out, marker = write_spec(tmp_path / "spec.yaml", timeout_s=5), tmp_path / "run", uuid.uuid4().hex
    res = cli("sweep", str(spec), "--out", str(out), env=cli_env(marker, **{FAULT_ENV: "hang:rank=1:after=3"}))
    assert res.returncode == 1, res.stderr
    # Rank 1 stopped after its 3rd case; rank 0 timed out in the 4th, which the message names.
    c = in_run_order(spec)[3]
    err = one_line(res.stderr)
    assert f"error: rank 0 failed: CaseFailed: {c.shape} M={c.M} {c.dtype} {c.label}:" in err, res.stderr
    # gloo says "Timed out waiting 5000ms for recv" or, for async work, "Application timeout caused pair closure".
    assert re.search(r"(?i)timed out|timeout", err.split(c.label, 1)[1]) and "rank 1 was still running" in err
    assert "Traceback" not in res.stderr
    assert_none_left(marker)
    assert len(json_lines(out)) == 3


def test_timeout_override_replaces_the_spec_field():
    assert parse_spec(SPEC).timeout_s == 60
    assert parse_spec(SPEC, timeout_s=2.5).timeout_s == 2.5
    assert parse_spec({k: v for k, v in SPEC.items() if k != "timeout_s"}).timeout_s == 300
    for bad in (0, -1, math.nan, math.inf, 1e300, "5", True):
        with pytest.raises(SpecError, match="timeout"):
            parse_spec(SPEC, timeout_s=bad)
        with pytest.raises(SpecError, match="timeout_s"):
            parse_spec({**SPEC, "timeout_s": bad})


# ----------------------------------------------------------------------------------- 3. Ctrl-C


@pytest.mark.parametrize("target", ["launcher", "process-group", "sigterm"])
def test_ctrl_c_stops_every_rank_and_keeps_records(tmp_path, target):
    # "sigterm": what a scheduler or `timeout` sends the launcher; handled like Ctrl-C, exit 143.
    # Rank 1 hangs after 2 cases (rank 0 waits in a collective, timeout 60 s): the job is surely mid-sweep.
    spec, out, marker = write_spec(tmp_path / "spec.yaml"), tmp_path / "run", uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "overlap_bench", "sweep", str(spec), "--out", str(out)],
                            env=cli_env(marker, **{FAULT_ENV: "hang:rank=1:after=2"}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # Waits for events (2 records written), not for a time: the deadline is a hang guard only.
        deadline = time.monotonic() + 600
        # The second line whole: rank 0 has nothing more to write and waits in a collective of its third case.
        while not ((out / RECORDS).exists() and (out / RECORDS).read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        if target == "launcher":
            proc.send_signal(signal.SIGINT)
        elif target == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:  # what a terminal's Ctrl-C does: every process of the foreground group gets it
            os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=600)  # hang guard only
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == (143 if target == "sigterm" else 130), stderr
    assert ("terminated." if target == "sigterm" else "interrupted.") in stderr and "Traceback" not in stderr
    assert_none_left(marker)
    assert len(json_lines(out)) == 2
    assert (out / "tables.md").exists()  # tables of what was measured are still written


# ----------------------------------------------------------------------------------- 4. failing cases


def test_failing_cases_are_recorded_and_the_sweep_goes_on(tmp_path):
    # chunked:priority=true is unavailable on gloo; chunks=4 over M=2 rows is a ValueError in the strategy.
    spec = write_spec(tmp_path / "spec.yaml", shapes=[{"name": "t/a", "K": 64, "N": 64}], tokens=[2, 64],
                      strategies=["baseline", {"name": "chunked", "chunks": 4},
                                  {"name": "chunked", "chunks": 2, "priority": True}])
    out = tmp_path / "run"
    res = cli_here("sweep", str(spec), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert recorded_keys(out) == expected_keys(spec)
    by = {(r.M, r.label): r for r in load_records(out).records}
    prio = "chunked:chunks=2,comm=stream,priority=true"
    for m in (2, 64):
        assert by[(m, "baseline")].ok
        assert by[(m, prio)].status == "unavailable" and "NCCL" in by[(m, prio)].reason
    assert by[(2, "chunked:chunks=4,comm=stream")].status == "failed"
    assert "ValueError" in by[(2, "chunked:chunks=4,comm=stream")].reason
    assert "chunks=4" in by[(2, "chunked:chunks=4,comm=stream")].reason
    assert by[(64, "chunked:chunks=4,comm=stream")].ok  # the sweep went on after the failure
    assert not math.isnan(by[(64, "chunked:chunks=4,comm=stream")].t_ms)


# ----------------------------------------------------------------------------------- 5. any spec, dry run

_words = st.sampled_from(["", "baseline", "pr", "chunked", "nope", "bfloat16", "float32", "float16", "int8",
                          "gloo", "nccl", "auto", "mpi", "qwen2.5-72b", "llama-3.1-405b", "tiny", "stream",
                          "async", "true", "-1", "1e3", "K", "N", "[/x]", "[bold]oops", "a\nb", "KEY=V"])
_ints = st.one_of(st.integers(-3, 300), st.integers(-10**12, 10**12))
_scalars = st.one_of(st.none(), st.booleans(), _ints, st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=6), _words)
_junk = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=5), _words, st.integers()), inner,
                                                 max_size=3)), max_leaves=6)


def _maybe(s):
    return st.one_of(s, s, s, _junk)


_name = st.text(alphabet="abcxyz/_-.[]", min_size=1, max_size=6)
_valid_shape = st.one_of(
    st.fixed_dictionaries({"name": _name, "K": st.integers(1, 4096), "N": st.integers(1, 4096)}),
    st.fixed_dictionaries({"preset": st.sampled_from(["qwen2.5-72b", "llama-3.1-70b", "tiny"])},
                          optional={"tp": st.sampled_from([1, 2, 3, 4, 7, 8])}))  # 3 and 7 do not divide K
_valid_strategy = st.one_of(
    st.sampled_from(["baseline", "pr", "chunked"]),
    st.fixed_dictionaries({"name": st.just("chunked")}, optional={
        "chunks": st.one_of(st.integers(1, 16), st.lists(st.integers(1, 16), min_size=1, max_size=3)),
        "comm": st.sampled_from(["stream", "async"]), "priority": st.booleans(), "align": st.integers(1, 64),
        "threshold": st.integers(0, 10**5), "split": st.sampled_from(["even", "edges"])}))
_valid_spec = st.fixed_dictionaries(
    {"shapes": st.lists(_valid_shape, min_size=1, max_size=3),
     "tokens": st.one_of(st.lists(st.integers(1, 65536), min_size=1, max_size=4),
                         st.fixed_dictionaries({"start": st.integers(1, 64), "stop": st.integers(64, 10**5),
                                                "mul": st.integers(2, 4)})),
     "strategies": st.lists(_valid_strategy, min_size=1, max_size=3)},
    optional={"name": _name, "backend": st.sampled_from(["gloo", "auto"]), "world_size": st.integers(1, 8),
              "dtypes": st.lists(st.sampled_from(["bfloat16", "float16", "float32"]), min_size=1, max_size=3),
              "bias": st.booleans(), "warmup": st.integers(0, 10), "reps": st.integers(1, 50),
              "timeout_s": st.one_of(st.integers(1, 600), st.floats(0.5, 1e4)),
              "env": st.lists(st.dictionaries(st.sampled_from(["CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_ALGO"]),
                                              st.one_of(st.integers(0, 8), _name), max_size=2), min_size=1,
                              max_size=2)})


@st.composite
def _specs(draw):
    """A valid spec broken in up to 3 places (a value made junk, negative or empty, a key dropped or added)."""
    raw = draw(_valid_spec)
    for _ in range(max(0, draw(st.integers(0, 4)) - 1)):
        node = raw
        while isinstance(node, (dict, list)) and node:
            key = draw(st.sampled_from(list(node)) if isinstance(node, dict) else st.integers(0, len(node) - 1))
            child = node[key]
            if isinstance(child, (dict, list)) and child and draw(st.booleans()):
                node = child
                continue
            how = draw(st.sampled_from(["junk", "negative", "empty", "drop", "add"]))
            if how == "drop":
                del node[key]
            elif how == "add" and isinstance(node, dict):
                node[draw(st.one_of(_words, st.integers()))] = draw(_junk)
            elif how == "negative":
                node[key] = draw(st.integers(-10**6, 0))
            elif how == "empty":
                node[key] = draw(st.sampled_from([[], {}, "", None]))
            else:
                node[key] = draw(_junk)
            break
    return draw(_junk) if draw(st.integers(1, 20)) == 7 else raw  # now and then not a spec at all


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "spec.yaml"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_specs())
def test_any_spec_dry_run_succeeds_or_fails_in_one_line(spec_file, raw):
    spec_file.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["sweep", str(spec_file), "--dry-run"])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # a traceback: never acceptable
    assert res.exit_code in (0, 2), (res.exit_code, res.output)
    if res.exit_code == 2:
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    else:
        assert "cases on" in res.stdout


@pytest.mark.parametrize("text, field", [
    (b"\xff\xfe\x00bad", "SPEC"),  # not UTF-8
    (b"shapes: [unclosed\n", "SPEC"),
    (b"- just\n- a list\n", "spec"),
    (b"{1: 2, name: x}", "1"),  # a non-string key among string ones
])
def test_unreadable_specs_fail_in_one_line(tmp_path, text, field):
    p = tmp_path / "spec.yaml"
    p.write_bytes(text)
    res = CliRunner().invoke(app, ["sweep", str(p), "--dry-run"])
    assert res.exit_code == 2, (res.output, res.exception)
    assert res.stderr.startswith(f"error: {field}") and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_brackets_in_user_text_are_printed_not_read_as_markup(tmp_path):
    # rich reads "[/x]" as a closing tag (MarkupError) and "[bold]" as style; a spec's text is neither.
    p = write_spec(tmp_path / "spec.yaml", dtypes=["[/x]"])
    res = CliRunner().invoke(app, ["sweep", str(p), "--dry-run"])
    assert res.exit_code == 2 and res.stderr.strip() == (
        "error: dtypes[0]: unknown dtype '[/x]'; use one of bfloat16, float16, float32"), (res.stderr, res.exception)
    p = write_spec(tmp_path / "spec.yaml", name="[/x] [bold]b")
    res = CliRunner().invoke(app, ["sweep", str(p), "--dry-run"])
    assert res.exit_code == 0 and res.stdout.startswith("[/x] [bold]b: 16 cases"), (res.output, res.exception)


def test_huge_grids_are_refused_before_they_are_built():
    t0 = time.monotonic()
    with pytest.raises(SpecError, match="tokens"):
        parse_spec({**SPEC, "tokens": {"start": 1, "stop": 10**12, "step": 1}})
    with pytest.raises(SpecError, match="cases"):
        parse_spec({**SPEC, "tokens": {"start": 1, "stop": 4000, "step": 1},
                    "strategies": [{"name": "chunked", "chunks": list(range(1, 40)), "align": list(range(1, 40))}]})
    assert time.monotonic() - t0 < 60  # hang guard: a built grid of 10^12 cases would never return


def test_env_names_that_cannot_be_set_are_spec_errors():
    for env in ({"": "1"}, {"A=B": "1"}, {"A": "x\0y"}):
        with pytest.raises(SpecError, match=r"env\[0\]"):
            parse_spec({**SPEC, "env": [env]})


# ----------------------------------------------------------------------------------- 6. atomic files, torn lines


def test_write_atomic_replaces_the_whole_file_and_leaves_no_temp_file(tmp_path):
    p = tmp_path / "tables.md"
    write_atomic(p, "old\n")
    write_atomic(p, "new\n" * 1000)
    assert p.read_text() == "new\n" * 1000
    assert os.listdir(tmp_path) == ["tables.md"]
    mask = os.umask(0)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def _boom(*a, **k):
    raise OSError("disk full (simulated)")


def _interrupt(*a, **k):
    raise KeyboardInterrupt


@pytest.mark.parametrize("how", ["unencodable text", "fsync fails", "rename fails", "ctrl-c mid-write"])
def test_write_atomic_failure_keeps_the_old_file(tmp_path, monkeypatch, how):
    p = tmp_path / "env.json"
    write_atomic(p, '{"old": true}\n')
    text, exc = "x" * 100_000, OSError
    if how == "unencodable text":
        text, exc = "half written \ud800", UnicodeEncodeError
    elif how == "fsync fails":
        monkeypatch.setattr(os, "fsync", _boom)
    elif how == "rename fails":
        monkeypatch.setattr(os, "replace", _boom)
    else:
        monkeypatch.setattr(os, "fsync", _interrupt)
        exc = KeyboardInterrupt
    with pytest.raises(exc):
        write_atomic(p, text)
    monkeypatch.undo()
    assert p.read_text() == '{"old": true}\n'
    assert os.listdir(tmp_path) == ["env.json"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A whole sweep of SPEC, run in-process, with every ``os.replace`` target noted (atomic writes)."""
    base = tmp_path_factory.mktemp("finished")
    spec_path = write_spec(base / "spec.yaml")
    spec, raw = load_spec(spec_path)
    replaced: list[Path] = []
    real = os.replace

    def spy(src, dst, *a, **k):
        replaced.append(Path(dst).resolve())
        return real(src, dst, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", spy)
        sweep_mod.run_sweep(spec, raw, base / "run", progress=False)
        export.export_policy(base / "run", base / "run" / "policy")
    return spec_path, base / "run", replaced


def test_tables_env_and_policy_files_are_written_atomically(finished_run):
    spec_path, out, replaced = finished_run
    files = {p.resolve() for p in out.rglob("*") if p.is_file()}
    assert {out / n for n in ("env.json", "spec.yaml", "tables.md", "tables.csv", "summary.md")} <= files
    assert any(p.parent.name == "policy" for p in files)
    appended = {(out / RECORDS).resolve(), (out / runfolder.CONFIRM).resolve()}  # fsync'd JSON-lines logs
    assert files - appended <= set(replaced)  # each through a temp file and a rename
    assert not [p for p in files if p.name.startswith(".")]  # no temp file left


def test_torn_last_line_is_reported_and_resume_does_not_glue_onto_it(finished_run, tmp_path, caplog):
    spec_path, done, _ = finished_run
    out = tmp_path / "run"
    shutil.copytree(done, out)
    lines = (out / RECORDS).read_text().splitlines(keepends=True)
    torn = lines[12][: len(lines[12]) // 2]  # a write cut short: half a line, no newline
    (out / RECORDS).write_text("".join(lines[:12]) + torn)
    for log in (runfolder.SCREEN, runfolder.CONFIRM):  # a run cut short in its first pass re-measured nothing yet
        (out / log).unlink(missing_ok=True)
    res = cli_here("sweep", str(spec_path), "--out", str(out), "--resume")
    assert res.exit_code == 0, res.output
    skipped = [r.getMessage() for r in caplog.records if "line(s) skipped" in r.getMessage()]
    assert skipped == [f"{out / RECORDS}: 1 line(s) skipped, not JSON (a write cut short or garbage): line 13"]
    assert "12 already recorded (skipped)" in one_line(res.stdout)
    after = (out / RECORDS).read_text().splitlines()
    assert after[12] == torn  # left as it was, and the next record starts on a line of its own
    assert [json.loads(x) for x in after[:12] + after[13:]]
    loaded = load_records(out)
    assert loaded.torn_lines == [13]
    assert recorded_keys(out) == expected_keys(spec_path)


def test_a_tables_error_does_not_hide_why_the_sweep_stopped(finished_run, tmp_path, monkeypatch, caplog):
    spec_path, done, _ = finished_run
    out = tmp_path / "run"
    shutil.copytree(done, out)
    (out / RECORDS).write_text("".join((out / RECORDS).read_text().splitlines(keepends=True)[:5]))
    for log in (runfolder.SCREEN, runfolder.CONFIRM):  # a run cut short in its first pass re-measured nothing yet
        (out / log).unlink(missing_ok=True)

    def rank_dies(*a, **k):
        raise RankFailed(1, "process killed by SIGKILL")

    def tables_bug(*a, **k):
        raise RuntimeError("tables bug")

    monkeypatch.setattr(sweep_mod, "launch", rank_dies)
    monkeypatch.setattr(report, "write_tables", tables_bug)
    spec, raw = load_spec(spec_path)
    with caplog.at_level(logging.WARNING, logger="overlap_bench.sweep"), pytest.raises(RankFailed, match="rank 1"):
        sweep_mod.run_sweep(spec, raw, out, resume=True, progress=False)
    assert "tables bug" in caplog.text
    assert len(json_lines(out)) == 5


# ----------------------------------------------------------------------------------- 7. policy loading

GOOD_POLICY = {
    "meta": {"device": "cpu", "world_size": 2, "dtype": "float32", "backend": "gloo"},
    "shapes": {"64,128": {"name": "t/a", "threshold": 32,
                          "buckets": {32: {"strategy": "chunked", "settings": {"chunks": 2}, "speedup": 1.1}}}},
}


@pytest.mark.parametrize("text, field", [
    (b"meta: [unclosed\n", "malformed YAML"),
    (b"\xff\xfe\x00\x01", "cannot read"),
    (b"- a\n- list\n", "top level"),
    (yaml.safe_dump({"shapes": {}}).encode(), "meta: is missing"),
    (yaml.safe_dump({**GOOD_POLICY, "shapes": {"64": {"buckets": {}}}}).encode(), "'K,N'"),
    (yaml.safe_dump({**GOOD_POLICY, "shapes": {"64,128": {"buckets": {32: {"strategy": "warp"}}}}}).encode(),
     "strategy"),
])
def test_malformed_policy_is_rejected_with_file_and_field(tmp_path, text, field):
    p = tmp_path / "p.yaml"
    p.write_bytes(text)
    with pytest.raises(PolicyError) as info:
        load_policy(p)
    assert str(p) in str(info.value) and field in str(info.value)
    assert "\n" not in str(info.value).strip()


def test_policy_for_another_world_or_device_is_rejected_unless_fallback(tmp_path, caplog):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(GOOD_POLICY))
    assert load_policy(p, expect_world=2, expect_device="cpu").choose(K=64, N=128, M=64).label == \
        "chunked:chunks=2,comm=stream"
    with pytest.raises(PolicyError, match="meta.world_size is 2, expected 4"):
        load_policy(p, expect_world=4)
    with pytest.raises(PolicyError, match="meta.device is 'cpu', expected 'NVIDIA H100'"):
        load_policy(p, expect_device="NVIDIA H100")
    bad = tmp_path / "bad.yaml"
    bad.write_text("meta: [unclosed\n")
    for path, kw, why in [(p, {"expect_world": 4}, "world_size"), (p, {"expect_device": "NVIDIA H100"}, "device"),
                          (bad, {}, "malformed")]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="overlap_bench.policy"):
            pol = load_policy(path, fallback=True, **kw)
        assert pol.shapes == {} and pol.choose(K=64, N=128, M=64).strategy == "baseline"
        assert why in caplog.text and "baseline" in caplog.text


_bucket = st.fixed_dictionaries({"strategy": _maybe(_words)}, optional={"settings": _junk, "speedup": _junk})
_shape_policy = st.fixed_dictionaries({"buckets": _maybe(st.dictionaries(st.one_of(_ints, _scalars), _maybe(_bucket),
                                                                         max_size=2))},
                                      optional={"threshold": _junk, "name": _junk})
_shape_keys = st.one_of(st.sampled_from(["64,128", "1,2", "a,b", "-1,2", "3", "1,2,3"]), _scalars)
_meta = st.fixed_dictionaries({"device": _maybe(_words), "world_size": _maybe(st.integers(0, 4)),
                               "dtype": _maybe(_words)})
_policy_docs = st.one_of(
    st.fixed_dictionaries({"meta": _maybe(_meta),
                           "shapes": _maybe(st.dictionaries(_shape_keys, _maybe(_shape_policy), max_size=2))}),
    _junk)


@settings(max_examples=100, deadline=None)
@given(doc=_policy_docs, fallback=st.booleans())
def test_any_policy_file_loads_or_fails_with_policy_error(spec_file, doc, fallback):
    path = spec_file.with_name("policy.yaml")
    path.write_text(yaml.safe_dump(doc))
    try:
        pol = load_policy(path, expect_world=2, fallback=fallback)
    except PolicyError as e:
        assert not fallback and str(path) in str(e)
        return
    pol.choose(K=64, N=128, M=100)  # a loaded policy answers
