"""Reliability at the edges of the command line: empty paths, closed pipes, honest hints, repeated variants,
a variant that breaks a rank's interpreter, and run folders that are missing or hold nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from overlap_bench.cli import app
from overlap_bench.launch import _cause
from overlap_bench.spec import SpecError, parse_spec

runner = CliRunner()
TINY = {"name": "tiny", "backend": "gloo", "world_size": 2, "dtypes": ["float32"],
        "shapes": [{"name": "t", "K": 16, "N": 16}], "tokens": [8], "strategies": ["baseline"],
        "warmup": 0, "reps": 1, "timeout_s": 60}


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "overlap_bench", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


SMALL = ["--tokens", "8", "--dtype", "float32", "--backend", "gloo", "--warmup", "0", "--reps", "1"]


@pytest.mark.parametrize("args", [["sweep", "--dry-run"], ["run", "--shape", "16,16", *SMALL], ["export", "x"],
                                  ["compare", "baseline", "pr", "--repeats", "1", *SMALL],
                                  ["model", "--preset", "tiny", "--layers", "1", *SMALL],
                                  ["interference", "--shape", "16,16", "--tokens", "8", "--dtype", "float32"]])
def test_an_empty_out_is_refused_naming_out(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, [*args, "--out", ""])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: --out:") and len(res.output.strip().splitlines()) == 1, res.output
    assert list(tmp_path.iterdir()) == []  # nothing written into the current directory


def test_a_closed_reader_of_stdout_ends_the_command_quietly(tmp_path):
    # More lines than a pipe holds, so the writer meets the closed pipe mid-listing.
    spec = tmp_path / "big.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "tokens": {"start": 1, "stop": 4000, "step": 1}}))
    proc = subprocess.Popen([sys.executable, "-m", "overlap_bench", "sweep", str(spec), "--dry-run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    assert proc.stdout.readline().startswith("tiny: 4000 cases")
    proc.stdout.close()  # as `| head -1` does
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == ""
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command, resumable", [("run", False), ("sweep", True)])
def test_resume_is_suggested_only_by_commands_that_have_it(command, resumable, tmp_path, monkeypatch):
    def interrupted(spec, raw, out, **kw):
        out.mkdir(parents=True, exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr("overlap_bench.sweep.run_sweep", interrupted)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    args = ["run", "--shape", "16,16", "--tokens", "8", "--dtype", "float32", "--backend", "gloo"] \
        if command == "run" else ["sweep", str(spec)]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 130, res.output
    assert f"Records so far are kept in {tmp_path / 'o'}" in res.output
    assert ("--resume" in res.output) == resumable, res.output


def test_a_repeated_env_variant_is_refused_naming_it():
    with pytest.raises(SpecError, match=r"^env\[2\]: the same variables as env\[0\]"):
        parse_spec({**TINY, "env": [{"A": "1", "B": "x"}, {"A": "2"}, {"B": "x", "A": 1}]})
    assert len(parse_spec({**TINY, "env": [{"A": "1"}, {"A": "2"}]}).env) == 2


def test_a_variant_that_breaks_the_interpreter_is_named_not_a_broken_pipe(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "env": [{"PYTHONHOME": "/nonexistent"}]}))
    res = _cli("sweep", str(spec), "--out", str(tmp_path / "o"), "--no-confirm", cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    line = _one_error_line(res.stderr)
    assert line.startswith("error: rank 0 failed: process exited with code 1 before it started: "), line
    assert "encodings" in line and "PYTHONHOME=/nonexistent" in line and "Broken pipe" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # found before a rank spoke


def test_a_rank_that_died_before_the_rendezvous_is_said_so():
    assert str(_cause({}, 1, {1: 1}, 2, up={0})) == \
        "rank 1 failed: process exited with code 1 before it started (its stderr says why)"
    assert str(_cause({}, 1, {1: -9}, 2, up={0, 1})) == "rank 1 failed: process killed by SIGKILL"


def _run_dir(path, records: bool):
    path.mkdir()
    if records:
        from overlap_bench.records import Record
        from overlap_bench.runfolder import RunFolder

        RunFolder(path).append(Record(shape="s", K=8, N=8, M=64, dtype="float32", world=2, backend="gloo",
                                      device="cpu", strategy="baseline", settings={}, label="baseline", env={},
                                      t_ms=1.0, t_base_ms=1.0))
    return str(path)


@pytest.mark.parametrize("a, b, blamed", [("full", "missing", "B: no run directory"),
                                          ("missing", "full", "A: no run directory"),
                                          ("bare", "full", "A: {bare} has no records.jsonl"),
                                          ("full", "empty", "B: {empty}/records.jsonl is empty")])
def test_compare_of_run_folders_names_the_missing_or_empty_one(a, b, blamed, tmp_path):
    made = {"full": _run_dir(tmp_path / "full", True), "bare": _run_dir(tmp_path / "bare", False),
            "empty": _run_dir(tmp_path / "empty", False), "missing": str(tmp_path / "missing")}
    (tmp_path / "empty" / "records.jsonl").touch()
    res = runner.invoke(app, ["compare", made[a], made[b]])
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"error: {blamed.format(**made)}"), res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
