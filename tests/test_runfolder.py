"""One writer per run folder, and a run folder that knows what made it."""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest
import yaml
from typer.testing import CliRunner

from overlap_bench import confirm, runfolder
from overlap_bench.cli import app
from overlap_bench.records import CONFIRM, RECORDS, SCREEN, load_records
from overlap_bench.spec import SMOKE

runner = CliRunner()

# 1 shape x 1 M x 2 settings on 2 gloo ranks: one short job.
SPEC = {**SMOKE, "shapes": [{"name": "t/a", "K": 32, "N": 32}], "tokens": [16], "strategies": ["baseline", "pr"],
        "warmup": 1, "reps": 2}


def spec_file(tmp_path, **changes):
    path = tmp_path / f"spec{len(list(tmp_path.glob('spec*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **changes}))
    return str(path)


def sweep(*args):
    return runner.invoke(app, ["sweep", *map(str, args)])


def assert_one_line_exit(res, code, *words):
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exception
    text = " ".join(res.output.split())
    assert "Traceback" not in res.output
    for w in words:
        assert w in text, text


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished sweep folder (made once for the module)."""
    tmp = tmp_path_factory.mktemp("made")
    spec = spec_file(tmp)
    res = sweep(spec, "--out", tmp / "run")
    assert res.exit_code == 0, res.output
    return tmp, spec, tmp / "run"


def copy_run(made, tmp_path):
    import shutil

    shutil.copytree(made[2], tmp_path / "run")
    return tmp_path / "run"


# ------------------------------------------------------------------------------------------- 2. one writer


def test_second_writer_exits_2_naming_the_holder(made, tmp_path):
    out = copy_run(made, tmp_path)
    with runfolder.lock(out, command="overlap-bench sweep first"):
        info = json.loads((out / runfolder.LOCK).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        n = len(load_records(out).records)
        res = sweep(made[1], "--out", out, "--resume")
        assert_one_line_exit(res, 2, f"pid {os.getpid()} on host {socket.gethostname()}", "overlap-bench sweep first")
        res = runner.invoke(app, ["report", str(out)])
        assert_one_line_exit(res, 2, "RUN_DIR", "is being written by")
        assert len(load_records(out).records) == n  # the second writer wrote nothing
    assert not (out / runfolder.LOCK).exists()  # released and removed
    assert sweep(made[1], "--out", out, "--resume").exit_code == 0


def test_two_sweeps_into_one_folder_at_once_one_runs_the_other_exits_2(tmp_path):
    import subprocess
    import sys

    spec, out = spec_file(tmp_path), tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "overlap_bench", "sweep", spec, "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    # It met the lock (being written by pid ...), or, if it started after the winner ended, its records.
    assert "is being written by pid" in loser or "already holds" in loser, loser
    assert "Traceback" not in loser and len(loser.strip().splitlines()) == 1
    keys = [r.key() for r in load_records(out).records]
    assert len(keys) == len(set(keys)) == 2  # every record once


def test_stale_lock_is_reported_and_taken_over(made, tmp_path, caplog):
    out = copy_run(made, tmp_path)
    (out / runfolder.LOCK).write_text(json.dumps({"pid": 999999999, "host": socket.gethostname(),
                                                  "started": "then", "command": "killed run"}))
    with caplog.at_level(logging.WARNING, logger="overlap_bench.runfolder"):
        res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert "stale lock of pid 999999999" in caplog.text and "killed run" in caplog.text
    assert not (out / runfolder.LOCK).exists()


def test_lock_from_another_host_is_refused_with_the_path_to_delete(made, tmp_path):
    out = copy_run(made, tmp_path)
    (out / runfolder.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "t", "command": "c"}))
    res = runner.invoke(app, ["report", str(out)])
    assert_one_line_exit(res, 2, "host elsewhere", "another machine", f"delete {out / runfolder.LOCK}")
    assert (out / runfolder.LOCK).exists()  # not ours to remove


def test_lock_survives_a_remove_race(tmp_path):
    """The holder removes run.lock on release: a writer that opened the old file must not end up holding
    a lock on a file nobody else sees (it re-opens until the file it locked is the one at the path)."""
    with runfolder.lock(tmp_path):
        pass
    with runfolder.lock(tmp_path):
        with pytest.raises(runfolder.FolderBusy):
            with runfolder.lock(tmp_path):
                pass


# ------------------------------------------------------------------------------------------- 3. identity


def test_resume_with_another_spec_or_options_is_refused_unless_forced(made, tmp_path):
    out = copy_run(made, tmp_path)
    before = (out / "records.jsonl").read_text()
    spec_text, env_text = (out / "spec.yaml").read_text(), json.loads((out / "env.json").read_text())
    for changes, words in [({"tokens": [16, 32]}, "another spec"), ({"reps": 3}, "reps 2 -> 3"),
                           ({"warmup": 0}, "warmup 1 -> 0")]:
        res = sweep(spec_file(tmp_path, **changes), "--out", out, "--resume")
        assert_one_line_exit(res, 2, "--resume:", words, "--force")
        assert (out / "records.jsonl").read_text() == before
    res = sweep(made[1], "--out", out, "--resume", "--seed", "3")
    assert_one_line_exit(res, 2, "seed 0 -> 3")
    # The same spec resumes; a forced one mixes knowingly. Neither replaces the first spec.yaml or env.json.
    assert sweep(made[1], "--out", out, "--resume").exit_code == 0
    assert (out / "records.jsonl").read_text() == before
    res = sweep(spec_file(tmp_path, reps=3, tokens=[16, 32]), "--out", out, "--resume", "--force")
    assert res.exit_code == 0, res.output
    recs = load_records(out).records
    # Forced: the cases already recorded are kept and skipped, the new M is measured with the new reps.
    assert sorted((r.M, r.reps) for r in recs) == [(16, 2), (16, 2), (32, 3), (32, 3)]
    assert (out / "spec.yaml").read_text() == spec_text
    env = json.loads((out / "env.json").read_text())
    assert env["time"] == env_text["time"] and len(env["resumes"]) == 2
    ident = json.loads((out / runfolder.IDENTITY).read_text())
    assert [r["forced"] for r in ident["resumes"]] == [False, True]
    assert ident["resumes"][1]["spec"]["reps"] == 3 and ident["options"]["reps"] == 2
    assert (out / "records.jsonl").read_text().startswith(before)


def test_a_folder_without_run_json_is_checked_against_its_records(made, tmp_path):
    out = copy_run(made, tmp_path)
    (out / runfolder.IDENTITY).unlink()
    _unstamp(out)  # as a folder from before run.json: its records carry no run stamp either
    res = sweep(spec_file(tmp_path, reps=7), "--out", out, "--resume")
    assert_one_line_exit(res, 2, "measured with other options", "reps 2 -> 7")
    assert sweep(made[1], "--out", out, "--resume").exit_code == 0
    assert "adopted" in json.loads((out / runfolder.IDENTITY).read_text())


def test_identity_records_hash_options_and_version(made):
    ident = json.loads((made[2] / runfolder.IDENTITY).read_text())
    assert len(ident["spec_sha256"]) == 64 and ident["overlap_bench"]
    assert ident["options"] == {"warmup": 1, "reps": 2, "seed": 0, "world_size": 2, "backend": "gloo"}


def _unstamp(out):
    """Remove the run stamp from every screen and confirmation record of ``out``."""
    for name in (SCREEN, CONFIRM):
        if (out / name).exists():
            docs = [json.loads(line) for line in (out / name).read_text().splitlines()]
            (out / name).write_text("".join(json.dumps({**d, "extra": {k: v for k, v in d["extra"].items()
                                                                        if k != "run"}}) + "\n" for d in docs))


def _stages(out):
    return [json.loads(line) for name in (SCREEN, CONFIRM) if (out / name).exists()
            for line in (out / name).read_text().splitlines()]


def test_second_stages_carry_the_run_and_another_runs_are_refused_before_anything_is_written(made, tmp_path):
    """Every screen and confirmation record names the run that measured it; copied into another run of the
    same spec (here: that run's run.json), or left in a folder started afresh, they are refused in one line."""
    own = json.loads((made[2] / runfolder.IDENTITY).read_text())["run_id"]
    lines = _stages(made[2])
    assert lines and {r["extra"]["run"] for r in lines} == {own}
    out = copy_run(made, tmp_path)
    ident = json.loads((out / runfolder.IDENTITY).read_text())
    runfolder.write_atomic(out / runfolder.IDENTITY, json.dumps({**ident, "run_id": "c" * 32}))
    kept = {p.name: p.read_bytes() for p in out.iterdir()}
    res = sweep(made[1], "--out", out, "--resume")
    assert_one_line_exit(res, 2, f"{out / CONFIRM}: it was measured by run {own}", "belongs to another run")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == kept  # run.json, env.json, records: untouched
    (out / RECORDS).unlink()  # started afresh: the old run's second stages are still there
    res = sweep(made[1], "--out", out)
    assert_one_line_exit(res, 2, f"{out / CONFIRM}: it was measured by run {own}", "belongs to another run")
    assert not (out / RECORDS).exists()


def test_a_folder_from_before_stamps_is_stamped_from_its_next_resume(made, tmp_path, caplog):
    """run.json without run_id and unstamped records (a folder older than stamps): a resume keeps them and gives
    the run an id from then on (``stamped_since``); a torn line is reported once."""
    out = copy_run(made, tmp_path)
    ident = json.loads((out / runfolder.IDENTITY).read_text())
    del ident["run_id"]
    runfolder.write_atomic(out / runfolder.IDENTITY, json.dumps(ident))
    _unstamp(out)
    with open(out / RECORDS, "a") as fh:
        fh.write("garbage\n")
    with caplog.at_level(logging.WARNING):
        res = sweep(made[1], "--out", out, "--resume")
    assert res.exit_code == 0, res.output
    assert (caplog.text + res.output).count("line(s)") == 1, (caplog.text, res.output)
    after = json.loads((out / runfolder.IDENTITY).read_text())
    assert len(after["run_id"]) == 32 and after["stamped_since"] and after["resumes"]
    assert confirm.load(out) and not any("run" in r["extra"] for r in _stages(out))
