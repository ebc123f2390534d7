"""Trust the pick (world-1 refusal, one estimator and verdict)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from overlap_bench import export
from overlap_bench.records import Record
from overlap_bench.runfolder import RunFolder
from overlap_bench.world import LaunchError


@pytest.mark.parametrize("args", [["sweep", "--nproc", "1", "--dry-run"], ["compare", "baseline", "pr", "--nproc", "1"]])
def test_world_one_sweep_and_compare_are_refused_in_one_line(args):
    res = subprocess.run([sys.executable, "-m", "overlap_bench", *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "nothing to overlap" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr


def test_a_refused_compare_leaves_no_out_folder(tmp_path):
    # Every input is checked before --out is made: a refusal leaves nothing to clean up.
    from typer.testing import CliRunner

    from overlap_bench.cli import app

    res = CliRunner().invoke(app, ["compare", "baseline", "pr", "--nproc", "1", "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 2 and "nothing to overlap" in res.output
    assert not (tmp_path / "cmp").exists()


def test_no_policy_from_a_world_one_run(tmp_path):
    w = RunFolder(tmp_path)
    for strategy, t in (("baseline", 1.0), ("chunked", 0.9)):
        w.append(Record(shape="s", K=8, N=8, M=64, dtype="float32", world=1, backend="nccl", device="H200",
                        strategy=strategy, settings={}, label=strategy, env={}, t_ms=t, t_base_ms=1.0))
    with pytest.raises(LaunchError, match="nothing to overlap"):
        export.export_policy(tmp_path, tmp_path / "p.yaml")
    assert not (tmp_path / "p.yaml").exists()


def test_references_are_bracketed_and_kept_in_the_records(tmp_path):
    from overlap_bench import bench
    from overlap_bench.records import load_records
    from overlap_bench.spec import parse_spec
    from overlap_bench.sweep import run_sweep

    raw = {"name": "b", "backend": "gloo", "world_size": 2, "dtypes": ["float32"],
           "shapes": [{"name": "t", "K": 16, "N": 32}], "tokens": [8],
           "strategies": [{"name": "baseline"}, {"name": "pr"}, {"name": "chunked", "chunks": [2, 3, 4, 8]}],
           "warmup": 0, "reps": 2, "timeout_s": 60}
    run_sweep(parse_spec(raw), raw, tmp_path, progress=False, confirm=False)  # the first pass is what is tested
    recs = load_records(tmp_path).records
    assert len(recs) == 6
    refs = [len(r.extra["t_base_refs"]) for r in recs]
    # start, after the 4th timed candidate, after the last: 1, 1, 1, 2, 2, 3
    every = bench.BRACKET_EVERY
    assert refs == [1 + (i + 1) // every + (i == 5 and 6 % every != 0) for i in range(6)]
    assert all(t > 0 for r in recs for t, _ in r.extra["t_base_refs"])
    assert recs[-1].extra["t_base_refs"][0] == [recs[0].t_base_ms, recs[0].t_base_iqr_ms]


def test_drift_between_bracketed_references_is_flagged_and_lowers_the_reference():
    from overlap_bench import select

    def rec(label, t, refs):
        name = label.split(":")[0]
        return Record(shape="s", K=8, N=8, M=64, dtype="float32", world=2, backend="gloo", device="cpu",
                      strategy=name, settings={"chunks": 2} if name == "chunked" else {}, label=label, env={},
                      t_ms=t, t_iqr_ms=0.01, t_base_ms=1.2, t_base_iqr_ms=0.01, t_gemm_ms=0.5, t_comm_ms=0.4,
                      extra={"t_base_refs": refs})

    recs = [rec("pr", 1.1, [[1.2, 0.01]]), rec("chunked:chunks=2", 0.9, [[1.2, 0.01], [1.0, 0.01]])]
    [b] = select.best(recs)
    assert b.t_base_ms == 1.0 and b.speedup == approx_(1.0 / 0.9)  # the later, faster bracket is the reference
    assert any("reference drift" in f for f in b.flags)


def test_an_eta_above_1_is_never_shown_unflagged():
    from overlap_bench import select

    recs = [Record(shape="s", K=8, N=8, M=64, dtype="float32", world=2, backend="gloo", device="cpu",
                   strategy=s, settings={}, label=s, env={}, t_ms=t, t_iqr_ms=0.001, t_base_ms=1.0,
                   t_base_iqr_ms=0.001, t_gemm_ms=0.5, t_comm_ms=0.4) for s, t in (("baseline", 1.0), ("pr", 0.45))]
    [b] = select.best(recs)
    assert b.eta > 1 and any(f.startswith("eta above 1") and "pr" in f for f in b.flags)


def approx_(x):
    return pytest.approx(x)
