"""A run folder belongs to the kind of run that made it; its record files are read bounded and reported; export
says per bucket what ships and why, and waits for a run still being written. Folders are made by hand: fast."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest
from typer.testing import CliRunner

from overlap_bench import confirm, records, runfolder, select, strategies
from overlap_bench.cli import app
from overlap_bench.errors import UserError
from overlap_bench.records import CONFIRM, SCREEN, Record
from overlap_bench.runfolder import RunFolder

runner = CliRunner()
CAND = "chunked:chunks=2,comm=stream"  # canonical, as labels are written


def rec(M, label, t=1.0, **kw):
    name, settings = strategies.parse(label)
    return Record(shape="t/a", K=32, N=32, M=M, dtype="float32", world=2, backend="gloo", device="cpu",
                  strategy=name, settings=strategies.settings_dict(settings), label=strategies.label(name, settings),
                  env={}, t_ms=t, t_iqr_ms=0.0, t_base_ms=1.0, t_base_iqr_ms=0.0, t_gemm_ms=0.3, t_comm_ms=0.3, **kw)


def confirmation(M, ratio, n=8, run=None):
    """``n`` interleaved repeats of baseline (a) and the candidate (b), the candidate ``ratio`` times as fast,
    stamped with the ``run`` that measured them (None: unstamped, as before stamps)."""
    out = []
    for i in range(n):
        for side, tps in (("a", 1000.0 + i % 3), ("b", 1000.0 * ratio + (i + 1) % 3)):
            extra = {"side": side, "pair": ["baseline", CAND], "repeats": n, "repeat": i, "first": "a",
                     "first_pass_speedup": 1.25, "candidates": 2, **({"run": run} if run else {})}
            out.append(rec(M, "baseline" if side == "a" else CAND, 1000.0 / tps, kind="confirm",
                           tokens_per_s=tps, extra=extra))
    return out


def sweep_folder(path, confirmed=((16, 1.2), (48, 1.0)), ms=(16, 32, 48)):
    """A sweep's folder: run.json, env.json, a first pass where the candidate leads at every M, and the
    confirmation of the ``confirmed`` Ms (M, confirmed ratio)."""
    f = RunFolder(path)
    ident = runfolder.identity({"g": 1}, {"reps": 2}, "test")
    f.write_json(runfolder.IDENTITY, ident)
    f.write_json(runfolder.ENV, {"gpu_name": "cpu", "mark": "the sweep's"})
    for m in ms:
        f.append(rec(m, "baseline", 1.0))
        f.append(rec(m, CAND, 0.8))
    for m, ratio in confirmed:
        for r in confirmation(m, ratio, run=ident["run_id"]):
            f.append(r, CONFIRM)
    return path


def one_line_exit_2(res, *words):
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    text = " ".join(res.output.split())
    for w in words:
        assert w in text, text


@pytest.fixture
def guarded_open(monkeypatch):
    """Fail at once where a record file is opened for reading before it is known to be a regular file (so a
    missing guard fails the test instead of blocking on a FIFO or reading /dev/zero without end)."""
    real = open

    def checked(file, *args, **kwargs):
        st = os.fstat(file) if isinstance(file, int) else os.stat(file)
        assert stat.S_ISREG(st.st_mode), f"{file} opened for reading though it is not a regular file"
        return real(file, *args, **kwargs)

    monkeypatch.setattr(records, "open", checked, raising=False)


# ------------------------------------------------------------------------------------------- ownership


def test_compare_out_into_a_sweep_folder_is_refused_and_leaves_it_alone(tmp_path):
    run = sweep_folder(tmp_path / "run")
    env = (run / runfolder.ENV).read_text()
    res = runner.invoke(app, ["compare", str(run), str(run), "--out", str(run)])
    one_line_exit_2(res, f"--out {run} holds a sweep run (run.json); choose another --out")
    assert (run / runfolder.ENV).read_text() == env and not (run / runfolder.COMPARE_JSON).exists()
    (run / runfolder.IDENTITY).unlink()  # a folder from before run.json: read as its records' kind
    res = runner.invoke(app, ["compare", str(run), str(run), "--out", str(run)])
    one_line_exit_2(res, "holds a sweep run (records.jsonl)")
    assert (run / runfolder.ENV).read_text() == env and not (run / runfolder.IDENTITY).exists()


def test_model_out_into_a_sweep_folder_and_compare_out_into_a_model_folder_are_refused(tmp_path):
    run = sweep_folder(tmp_path / "run")
    env = (run / runfolder.ENV).read_text()
    res = runner.invoke(app, ["model", "--out", str(run), "--tokens", "8", "--layers", "1"])
    one_line_exit_2(res, f"--out {run} holds a sweep run (run.json)")
    assert (run / runfolder.ENV).read_text() == env and not (run / runfolder.MODEL).exists()
    model = tmp_path / "model"
    RunFolder(model).append(rec(8, "baseline", kind="model"), runfolder.MODEL)
    (model / runfolder.ENV).write_text("{}\n")
    res = runner.invoke(app, ["compare", str(run), str(run), "--out", str(model)])
    one_line_exit_2(res, "holds a model run (model.jsonl)")
    assert (model / runfolder.ENV).read_text() == "{}\n"


def test_a_new_folder_is_claimed_for_its_kind_and_resumed_by_the_same_kind_only(tmp_path):
    folder = RunFolder(tmp_path / "new")
    with folder.claim("model", command="overlap-bench model"):
        pass
    doc = json.loads((folder / runfolder.IDENTITY).read_text())
    assert doc["kind"] == "model" and doc["command"] == "overlap-bench model"
    with folder.claim("model"):  # the same kind continues (its own --resume rules apply)
        pass
    for other in ("sweep", "compare", "interference"):
        with pytest.raises(UserError, match="holds a model run"):
            with folder.claim(other):
                pass
    assert not (folder / runfolder.LOCK).exists()
    run = sweep_folder(tmp_path / "run")
    with RunFolder(run).claim("sweep", "RUN_DIR"):  # report re-renders a sweep's folder
        pass
    assert json.loads((run / runfolder.IDENTITY).read_text())["spec_sha256"]  # its identity untouched


# ------------------------------------------------------------------------------------------- bounded reads


@pytest.mark.parametrize("what", ["fifo", "dev-zero"])
def test_a_confirm_log_that_is_not_a_regular_file_is_refused_in_one_line(tmp_path, guarded_open, what):
    run = sweep_folder(tmp_path / "run", confirmed=())
    path = run / CONFIRM
    if what == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    res = runner.invoke(app, ["export", str(run), "-o", str(tmp_path / "p.yaml")])
    one_line_exit_2(res, f"{path} is not a regular file")
    assert not (tmp_path / "p.yaml").exists()


def test_a_record_file_over_the_size_bound_is_refused(tmp_path, monkeypatch):
    run = sweep_folder(tmp_path / "run", confirmed=())
    monkeypatch.setattr(records, "MAX_FILE_BYTES", 100)
    with pytest.raises(records.RecordsError, match="over the 100"):
        records.load_records(run)


def test_garbage_lines_in_the_confirm_log_are_counted_and_reported(tmp_path, caplog):
    run = sweep_folder(tmp_path / "run")
    lines = (run / CONFIRM).read_text().splitlines(keepends=True)
    (run / CONFIRM).write_text("garbage\n" + "".join(lines) + "\x00\x00{torn")
    with caplog.at_level(logging.WARNING, logger="overlap_bench.records"):
        kept = confirm.load(run)
    assert len(kept) == len(lines)
    assert f"{run / CONFIRM}: 2 line(s) skipped" in caplog.text and "line 1, 34" in caplog.text


@pytest.mark.parametrize("log", [CONFIRM, SCREEN])
def test_confirmations_of_another_run_are_refused_with_the_path(tmp_path, log):
    run = sweep_folder(tmp_path / "run", confirmed=())
    own = json.loads((run / runfolder.IDENTITY).read_text())["run_id"]
    for r in confirmation(64, 1.2, run=own):  # M=64: a case this run never measured
        RunFolder(run).append(r, log)
    with pytest.raises(records.RecordsError, match=f"{log}: it re-measures .* M=64 .* belongs to another run"):
        confirm.load(run, log)
    if log == SCREEN:
        return
    res = runner.invoke(app, ["export", str(run), "-o", str(tmp_path / "p.yaml")])
    one_line_exit_2(res, f"{run / CONFIRM}", "M=64", "belongs to another run")


@pytest.mark.parametrize("log", [CONFIRM, SCREEN])
def test_second_stages_of_another_run_of_the_same_spec_are_refused_with_the_path(tmp_path, log):
    """Records of this run's own cases, stamped by another run (copied from its folder, or left by one before
    the folder was started afresh), or unstamped in a run that stamps all of its own: refused, naming the log."""
    run = sweep_folder(tmp_path / "run", confirmed=())
    own = json.loads((run / runfolder.IDENTITY).read_text())["run_id"]
    for stamp, words in ((None, "its records carry no run stamp"), ("f" * 32, f"it was measured by run {'f' * 32}")):
        (run / log).unlink(missing_ok=True)
        for r in confirmation(16, 1.2, run=stamp):
            RunFolder(run).append(r, log)
        with pytest.raises(records.RecordsError, match=f"^{run / log}: {words}, and this folder's run.json is run "
                                                       f"{own}: it belongs to another run; move it away$"):
            confirm.load(run, log)
        if log == CONFIRM:  # export reads no screen
            res = runner.invoke(app, ["export", str(run), "-o", str(tmp_path / "p.yaml")])
            one_line_exit_2(res, f"{run / log}", words, "belongs to another run")
    (run / log).unlink()
    for r in confirmation(16, 1.2, run=own):
        RunFolder(run).append(r, log)
    assert len(confirm.load(run, log)) == 16


def test_second_stages_from_before_stamps_still_load(tmp_path):
    """A folder made before runs were stamped (run.json without ``run_id``, or one given on a later resume:
    ``stamped_since``) keeps its unstamped records; stamped ones must still be its own."""
    run = sweep_folder(tmp_path / "run", confirmed=())
    for r in confirmation(16, 1.2):
        RunFolder(run).append(r, CONFIRM)
    ident = json.loads((run / runfolder.IDENTITY).read_text())
    del ident["run_id"]
    RunFolder(run).write_json(runfolder.IDENTITY, ident)
    assert len(confirm.load(run)) == 16
    out = runner.invoke(app, ["export", str(run), "-o", str(tmp_path / "p.yaml")])
    assert out.exit_code == 0 and CAND in _rows(out.output)[16], out.output
    RunFolder(run).write_json(runfolder.IDENTITY, {**ident, "run_id": "a" * 32, "stamped_since": "then"})
    assert len(confirm.load(run)) == 16
    for r in confirmation(48, 1.2, run="b" * 32):
        RunFolder(run).append(r, CONFIRM)
    with pytest.raises(records.RecordsError, match=f"measured by run {'b' * 32}, and this folder's run.json is run "
                                                   f"{'a' * 32}"):
        confirm.load(run)


def test_lines_skipped_are_reported_once_and_export_decides_once(tmp_path, caplog, monkeypatch):
    run = sweep_folder(tmp_path / "run")
    for name in (records.RECORDS, CONFIRM):
        with open(run / name, "a") as fh:
            fh.write("garbage\n")
    calls = []
    real = select.decide
    monkeypatch.setattr(select, "decide", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(2):  # each command reports them once
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            res = runner.invoke(app, ["export", str(run), "-o", str(tmp_path / "p.yaml")])
        assert res.exit_code == 0, res.output
        said = [m for m in caplog.messages if "skipped" in m]
        assert len(said) == 2 and {m.split(":")[0] for m in said} == {str(run / records.RECORDS), str(run / CONFIRM)}
    assert len(calls) == 2  # once per export


# ------------------------------------------------------------------------------------------- export


def _rows(output):
    """``{M: table row text}`` of export's table."""
    return {int(ln.split("│")[2]): " ".join(ln.split()) for ln in output.splitlines()
            if ln.count("│") > 5 and ln.split("│")[2].strip().isdigit()}


def test_export_prints_what_ships_per_bucket_and_why(tmp_path):
    run = sweep_folder(tmp_path / "run")
    res = runner.invoke(app, ["export", str(run), "-o", str(tmp_path / "p.yaml")])
    assert res.exit_code == 0, res.output
    rows = _rows(res.output)
    assert CAND in rows[16] and "confirmed" in rows[16] and ".." in rows[16]  # its CI
    assert "baseline: no confirmation" in rows[32]
    assert "baseline: not confirmed (best: chunked:chunks=2,comm=stream" in rows[48]
    assert "holds no confirmation" not in res.output
    res = runner.invoke(app, ["export", str(sweep_folder(tmp_path / "bare", confirmed=())), "-o",
                              str(tmp_path / "q.yaml")])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "holds no confirmation (confirm.jsonl): every bucket ships the baseline" in text


def test_export_of_a_run_still_being_written_is_refused_unless_forced(tmp_path):
    run = sweep_folder(tmp_path / "run")
    with runfolder.lock(run, command="overlap-bench sweep s.yaml"):
        res = runner.invoke(app, ["export", str(run), "-o", str(tmp_path / "p.yaml")])
        one_line_exit_2(res, "still being written by pid", "overlap-bench sweep s.yaml", "--force")
        assert not (tmp_path / "p.yaml").exists()
        res = runner.invoke(app, ["export", str(run), "-o", str(tmp_path / "p.yaml"), "--force"])
        assert res.exit_code == 0, res.output
        assert "no confirmation (run still being written)" in _rows(res.output)[32]
    assert runfolder.writer(run) is None
