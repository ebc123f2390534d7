"""Operating-system errors and malformed records are one line and a non-zero exit (2 for
the user's input, 1 for the machine) in every command, never a traceback; file names made from user text
are safe and short before anything is measured."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from overlap_bench import records, runfolder
from overlap_bench.cli import app
from overlap_bench.records import RECORDS, load_records
from overlap_bench.report import SLUG_MAX, slugify
from overlap_bench.spec import SMOKE

runner = CliRunner()
SPEC = {**SMOKE, "shapes": [{"name": "t/a", "K": 32, "N": 32}], "tokens": [16, 32],
        "strategies": ["baseline", "pr", {"name": "chunked", "chunks": 2}], "warmup": 1, "reps": 2}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_exit(res, code, *words):
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit), res.exception  # not a traceback
    text = res.output.strip()
    assert len(text.splitlines()) == 1, text
    for w in words:
        assert w in " ".join(text.split()), text


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("done")
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    res = invoke("sweep", spec, "--out", tmp / "run")
    assert res.exit_code == 0, res.output
    return spec, tmp / "run"


def copy(done, tmp_path) -> Path:
    shutil.copytree(done[1], tmp_path / "run", ignore=shutil.ignore_patterns("*.png"))
    return tmp_path / "run"


# ------------------------------------------------------------------------------------------- OS errors


def test_out_naming_a_file_a_too_long_name_or_below_a_file_is_one_line_exit_2(done, tmp_path):
    spec = done[0]
    (tmp_path / "afile").write_text("x")
    for out, words in [(tmp_path / "afile", "exists and is not a folder"), (tmp_path / ("a" * 300), "File name too long"),
                       (tmp_path / "afile" / "sub", "Not a directory")]:
        one_line_exit(invoke("sweep", spec, "--out", out), 2, "--out:", words)
        one_line_exit(invoke("run", "--shape", "8,8", "--tokens", "4", "--backend", "gloo", "--out", out), 2, words)
        one_line_exit(invoke("model", "--preset", "tiny", "--backend", "gloo", "--nproc", "2", "--tokens", "8",
                             "--dtype", "float32", "--out", out), 2, words)
        one_line_exit(invoke("compare", "baseline", "pr", "--out", out), 2, words)
    assert (tmp_path / "afile").read_text() == "x"


def test_read_only_folder_is_one_line_exit_2(done, tmp_path, monkeypatch):
    # Tests may run as root, which ignores file modes: the refusal is what a read-only folder gives.
    real = Path.mkdir

    def read_only(self, *a, **k):
        if "ro" in self.parts:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    one_line_exit(invoke("sweep", done[0], "--out", tmp_path / "ro" / "run"), 2, "Permission denied")


def test_export_into_a_folder_named_like_a_file_and_a_full_disk(done, tmp_path, monkeypatch):
    (tmp_path / "p.yaml").mkdir()
    one_line_exit(invoke("export", done[1], "-o", tmp_path / "p.yaml"), 2, "Is a directory")
    one_line_exit(invoke("compare", done[1], done[1], "--markdown", tmp_path / "p.yaml"), 2, "Is a directory")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "q.yaml"))

    monkeypatch.setattr(runfolder.tempfile, "mkstemp", full)  # the environment's fault: exit 1
    one_line_exit(invoke("export", done[1], "-o", tmp_path / "q.yaml"), 1, "No space left on device",
                  "check the machine")


def test_export_of_an_empty_run_or_a_missing_variant_is_one_line_exit_2(done, tmp_path):
    out = copy(done, tmp_path)
    one_line_exit(invoke("export", out, "-o", tmp_path / "p", "--env", "NOPE=1"), 2, "env variant", "NOPE=1")
    one_line_exit(invoke("export", out, "-o", tmp_path / "p", "--dtype", "float16"), 2, "no records")
    (out / RECORDS).write_text("")
    one_line_exit(invoke("export", out, "-o", tmp_path / "p"), 2, "no records to export")


# ------------------------------------------------------------------------------------------- malformed records


BAD = [({"M": "64"}, "'M' must be an integer"), ({"t_ms": "fast"}, "'t_ms' must be a number"),
       ({"settings": [1]}, "'settings' must be a mapping"), ({"env": {"A": 1}}, "'env.A' must be text"),
       ({"bias": "yes"}, "'bias' must be true or false"), ({"reason": 3}, "'reason' must be text"),
       ({"M": 10 ** 30}, "'M' must be < 9007199254740992"), ({"shape": None}, "'shape' must be text")]


@pytest.mark.parametrize("change, words", BAD)
def test_a_record_of_wrong_types_is_named_by_every_command(done, tmp_path, change, words):
    out = copy(done, tmp_path)
    lines = (out / RECORDS).read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), **change})
    (out / RECORDS).write_text("\n".join(lines) + "\n")
    before = (out / RECORDS).read_text()
    for args in (["report", out], ["export", out, "-o", tmp_path / "p"], ["compare", out, done[1]],
                 ["compare", done[1], out], ["sweep", done[0], "--out", out, "--resume"]):
        one_line_exit(invoke(*args), 2, f"{out / RECORDS} line 3:", words, "fix or delete that line")
    assert (out / RECORDS).read_text() == before  # the resume measured and wrote nothing


def test_a_line_that_is_not_a_record_object_is_named(done, tmp_path):
    out = copy(done, tmp_path)
    with open(out / RECORDS, "a") as fh:
        fh.write('[1, 2]\n{"shape": "x"}\n')
    with pytest.raises(records.RecordsError, match="line 7: is not a JSON object"):
        load_records(out)
    lines = (out / RECORDS).read_text().splitlines()
    (out / RECORDS).write_text("\n".join(lines[:6] + lines[7:]) + "\n")
    with pytest.raises(records.RecordsError, match="line 7: field 'K' is missing"):
        load_records(out)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
                     lambda c: st.lists(c, max_size=2) | st.dictionaries(st.text(max_size=3), c, max_size=2),
                     max_leaves=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 5), st.sampled_from(sorted(records.Record.__dataclass_fields__)),
                                _json), min_size=1, max_size=4))
def test_any_edit_of_records_gives_a_result_or_one_line(done, tmp_path_factory, edits):
    tmp = tmp_path_factory.mktemp("e")
    out = copy(done, tmp)
    lines = [json.loads(x) for x in (out / RECORDS).read_text().splitlines()]
    for i, key, value in edits:
        lines[i][key] = value
    (out / RECORDS).write_text("".join(json.dumps(x) + "\n" for x in lines))
    for args in (["export", out, "-o", tmp / "p"], ["compare", done[1], out]):
        res = invoke(*args)
        assert res.exit_code in (0, 2) and isinstance(res.exception, (SystemExit, type(None))), \
            (args, res.output, res.exception)
        if res.exit_code:
            assert len(res.output.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- file names


def test_long_and_odd_names_make_short_safe_file_names(tmp_path):
    for text in ["a" * 1000, "é/../" * 100, "x" * 95 + "/y", "../../etc/passwd", ""]:
        s = slugify(text)
        assert len(s) <= SLUG_MAX and "/" not in s and not s.startswith(".")
    assert slugify("a" * 200) != slugify("a" * 199 + "b")  # the hash keeps long names apart


def test_a_shape_name_too_long_for_a_file_name_is_measured_and_reported(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "shapes": [{"name": "n" * 300, "K": 32, "N": 32}], "tokens": [16],
                                    "strategies": ["baseline", "pr"]}))
    res = invoke("sweep", spec, "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    pngs = list((tmp_path / "run").glob("*.png"))
    assert pngs and all(len(p.name.encode()) < 255 for p in pngs)
    assert len(load_records(tmp_path / "run").records) == 2
