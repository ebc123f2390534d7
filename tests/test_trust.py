"""Issue 13: trust the pick (world-1 refusal, one estimator and verdict)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from overlap_bench import export
from overlap_bench.records import Record, RecordWriter
from overlap_bench.world import LaunchError


@pytest.mark.parametrize("args", [["sweep", "--nproc", "1", "--dry-run"], ["compare", "baseline", "pr", "--nproc", "1"]])
def test_world_one_sweep_and_compare_are_refused_in_one_line(args):
    res = subprocess.run([sys.executable, "-m", "overlap_bench", *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "nothing to overlap" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr


def test_no_policy_from_a_world_one_run(tmp_path):
    w = RecordWriter(tmp_path)
    for strategy, t in (("baseline", 1.0), ("chunked", 0.9)):
        w.append(Record(shape="s", K=8, N=8, M=64, dtype="float32", world=1, backend="nccl", device="H200",
                        strategy=strategy, settings={}, label=strategy, env={}, t_ms=t, t_base_ms=1.0))
    with pytest.raises(LaunchError, match="nothing to overlap"):
        export.export_policy(tmp_path, tmp_path / "p.yaml")
    assert not (tmp_path / "p.yaml").exists()
