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
