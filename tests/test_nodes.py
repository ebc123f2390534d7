"""Several nodes, as the README's torchrun line runs them: two torchrun agents on this machine act as two
nodes (static rendezvous, gloo, one rank each), each in its own working directory, so that node 1 shares no
folder with node 0 (as nodes without a shared filesystem)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

from overlap_bench.records import load_records
from test_reliability import SPEC, expected_keys

ROOT = Path(__file__).resolve().parents[1]
# 1 shape x 1 M x 2 settings: 2 cases; the confirmation re-measures chunked against the baseline.
TINY = {**SPEC, "shapes": SPEC["shapes"][:1], "tokens": [32], "strategies": [{"name": "baseline"},
                                                                          {"name": "chunked", "chunks": 2}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(tmp_path: Path, *args: str) -> list[tuple[int, str]]:
    """``overlap_bench sweep ARGS`` on two torchrun "nodes" (node rank 0 and 1, cwd ``node0``/``node1``);
    returns each node's exit code and output."""
    port, procs = _free_port(), []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for n in (0, 1):
        (tmp_path / f"node{n}").mkdir(exist_ok=True)
        with open(tmp_path / f"log{n}.txt", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                 "--node-rank", str(n), "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "overlap_bench", "sweep",
                 *args], cwd=tmp_path / f"node{n}", env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
    try:
        codes = [p.wait(timeout=300) for p in procs]  # only keeps a hang from hanging the suite
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return [(c, (tmp_path / f"log{n}.txt").read_text()) for n, c in enumerate(codes)]


def test_a_sweep_on_two_nodes_is_written_once_on_node_0_and_resumes_from_there(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(TINY, sort_keys=False))
    run, node1 = tmp_path / "node0" / "run", tmp_path / "node1"

    first = _two_nodes(tmp_path, str(spec), "--out", "run", "--no-confirm")
    assert [c for c, _ in first] == [0, 0], first
    keys = [r.key() for r in load_records(run).records]
    assert sorted(keys) == expected_keys(spec) and max(Counter(keys).values()) == 1  # every case once
    assert "2 cases measured" in first[0][1] and "cases measured" not in first[1][1]  # rank 0 says it
    assert list(node1.iterdir()) == []  # node 1 wrote nothing: no folder, no lock, no tables
    ident = json.loads((run / "run.json").read_text())
    assert ident["options"]["world_size"] == 2 and ident.get("resumes", []) == []
    assert "resumes" not in json.loads((run / "env.json").read_text())

    # Node 1 cannot see the records: the cases to skip and to confirm are rank 0's.
    again = _two_nodes(tmp_path, str(spec), "--out", "run", "--resume")
    assert [c for c, _ in again] == [0, 0], again
    assert "0 cases measured, 2 already recorded" in again[0][1] and "1 candidate(s) confirmed" in again[0][1]
    assert sorted(r.key() for r in load_records(run).records) == expected_keys(spec)  # nothing measured twice
    confirm = [json.loads(line) for line in (run / "confirm.jsonl").read_text().splitlines()]
    sides = Counter((c["label"], c["extra"]["side"], c["extra"]["repeat"]) for c in confirm)
    assert {c["kind"] for c in confirm} == {"confirm"} and max(sides.values()) == 1
    assert len(sides) == 2 * TINY["confirm_repeats"]  # each side once per repeat
    assert len(json.loads((run / "run.json").read_text())["resumes"]) == 1  # the resume added once
    assert len(json.loads((run / "env.json").read_text())["resumes"]) == 1
    assert list(node1.iterdir()) == []


JOBS = """\
import os, sys, time
import torch, torch.distributed as dist
from overlap_bench.launch import JobConfig, launch

def job(ctx):
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == ctx.world

for _ in range(3):
    launch(job, (), JobConfig(2, "gloo", 30))
    if os.environ["RANK"] == "0":
        time.sleep(0.3)  # rank 1 reaches the next group first (it needs milliseconds to get there)
print("every job ran", flush=True)
"""


def test_one_torchrun_process_joins_job_after_job(tmp_path):
    # A sweep is several jobs (first pass, confirmation, env variants); each is a new process group in the same
    # torchrun store, which must not hand a later job the keys (the peers' addresses) of the job before.
    (tmp_path / "jobs.py").write_text(JOBS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "jobs.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("every job ran") == 2
