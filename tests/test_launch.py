"""The launcher: backend choice, failures end the job promptly with the rank named, no orphans."""

import multiprocessing
import os
import time

import pytest
import torch.distributed as dist

from overlap_bench import world as launch_mod  # resolve() and gpu_count() live in world.py
from overlap_bench.launch import JobConfig, LaunchError, RankFailed, launch, resolve


def test_picks_gloo_and_two_ranks_without_gpus(monkeypatch):
    monkeypatch.setattr(launch_mod, "gpu_count", lambda: 0)
    monkeypatch.delenv("RANK", raising=False)
    assert resolve(None, None) == ("gloo", 2)
    assert resolve("auto", 3) == ("gloo", 3)
    with pytest.raises(LaunchError, match="needs CUDA GPUs"):
        resolve("nccl", 2)


def test_picks_nccl_and_every_gpu_with_gpus(monkeypatch):
    monkeypatch.setattr(launch_mod, "gpu_count", lambda: 4)
    monkeypatch.delenv("RANK", raising=False)
    assert resolve(None, None) == ("nccl", 4)
    assert resolve("gloo", None) == ("gloo", 2)
    with pytest.raises(LaunchError, match="more than the 4 visible GPUs"):
        resolve(None, 8)
    with pytest.raises(LaunchError, match="backend"):
        resolve("mpi", None)


def test_under_torchrun_world_size_comes_from_env(monkeypatch):
    monkeypatch.setattr(launch_mod, "gpu_count", lambda: 0)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve(None, 5) == ("gloo", 1)


def _rank_one_raises(ctx):
    if ctx.rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # the others wait in a collective that rank 1 never joins
    time.sleep(60)


def _env_probe(ctx, path):
    with open(f"{path}.{ctx.rank}", "w") as fh:  # every rank's environment, not only rank 0's
        fh.write(",".join(os.environ.get(k, "") for k in ("NCCL_NVLS_ENABLE", "OB_TEST_KNOB")))


def test_raising_rank_ends_job_promptly_with_rank_and_cause():
    with pytest.raises(RankFailed) as info:  # a launcher that waited for the collective timeout would hang 120 s
        launch(_rank_one_raises, (), JobConfig(nproc=3, backend="gloo", timeout_s=120), grace_s=2)
    assert info.value.rank == 1
    assert "rank 1 failed" in str(info.value) and "ValueError: boom on purpose" in str(info.value)
    assert "\n" not in str(info.value)
    assert multiprocessing.active_children() == []  # no orphans


def test_env_variant_and_safety_vars_reach_children(tmp_path, monkeypatch):
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    out = tmp_path / "env.txt"
    launch(_env_probe, (str(out),), JobConfig(nproc=2, backend="gloo", env={"OB_TEST_KNOB": "7"}))
    assert [open(f"{out}.{r}").read() for r in range(2)] == ["0,7", "0,7"]
    assert "OB_TEST_KNOB" not in os.environ  # restored in the launcher


# -------------------------------------------------------------------------- no rank outlives the launcher

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from overlap_bench import launch as launcher  # noqa: E402
from test_reliability import SPEC, assert_none_left, cli_env  # noqa: E402


def _ranks_of(pid: int) -> list[int]:
    """Rank processes (spawned by torch.multiprocessing) whose parent is ``pid``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == pid and b"spawn_main" in (d / "cmdline").read_bytes():
                found.append(int(d.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _start_sweep(tmp_path: Path, marker: str, nproc: int = 2) -> tuple[subprocess.Popen, Path]:
    spec = tmp_path / "spec.yaml"
    # 1 shape x 2 M x 2 settings: 4 cases.
    spec.write_text(yaml.safe_dump({**SPEC, "world_size": nproc, "shapes": SPEC["shapes"][:1],
                                    "strategies": ["baseline", "pr"]}))
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "overlap_bench", "sweep", str(spec), "--out", str(tmp_path / "run")],
                            env=cli_env(marker, TMPDIR=str(tmp_path / "tmp")), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, spec


def _wait_for(cond, proc: subprocess.Popen, safety_s: float = 600.0) -> None:
    """Poll until ``cond()``, failing if ``proc`` ends first; ``safety_s`` only keeps a hang from hanging the suite."""
    deadline = time.monotonic() + safety_s
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_a_rank_whose_launcher_is_gone_runs_nothing():
    # The launcher-pid check at a rank's start: a rank whose launcher is not its parent (it died while the
    # rank was starting) exits 70 at once, quietly, before it connects to the store or runs its function.
    code = "from overlap_bench.launch import _rank; _rank(0, 1, 1, None, (), None)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert res.returncode == 70 and res.stderr == b"", res.stderr


def test_sigkill_of_the_launcher_while_ranks_start_leaves_no_rank_and_no_rendezvous(tmp_path):
    marker = uuid.uuid4().hex
    proc, _ = _start_sweep(tmp_path, marker)
    try:
        _wait_for(lambda: len(_ranks_of(proc.pid)) == 2, proc)  # both ranks started, importing torch
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_none_left(marker)  # each rank ends at its start at the latest (the launcher-pid check)
    assert os.listdir(tmp_path / "tmp") == []
    assert not (tmp_path / "run" / "records.jsonl").exists()


def test_sigkill_mid_sweep_then_resume_completes_without_duplicates(tmp_path, caplog):
    import logging

    from test_reliability import cli_here, expected_keys, json_lines, recorded_keys

    marker = uuid.uuid4().hex
    proc, spec = _start_sweep(tmp_path, marker)
    out = tmp_path / "run"
    try:
        _wait_for(lambda: (out / "records.jsonl").exists() and
                  len((out / "records.jsonl").read_text().splitlines()) >= 1, proc)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_none_left(marker)  # nothing is writing any more
    assert os.listdir(tmp_path / "tmp") == []
    json_lines(out)  # whole lines only
    with caplog.at_level(logging.WARNING, logger="overlap_bench.runfolder"):
        res = cli_here("sweep", str(spec), "--out", str(out), "--resume")
    assert res.exit_code == 0, res.output
    assert "stale lock of pid" in caplog.text
    assert recorded_keys(out) == expected_keys(spec)  # every case once


def test_sigterm_ends_every_rank_of_a_larger_job(tmp_path):
    # The 10 s bound itself is pinned without a wall clock by test_stop_all_escalates_within_a_fixed_budget;
    # the timeouts here only keep a hung launcher from hanging the suite.
    marker = uuid.uuid4().hex
    proc, _ = _start_sweep(tmp_path, marker, nproc=6)
    try:
        _wait_for(lambda: len(_ranks_of(proc.pid)) == 6, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and "terminated." in stderr and "Traceback" not in stderr, stderr
    assert_none_left(marker)
    assert os.listdir(tmp_path / "tmp") == []


@pytest.mark.parametrize("rank", ["0", "1"])
def test_torchrun_of_another_world_size_is_said_once_and_every_rank_exits_2(tmp_path, monkeypatch, rank):
    # What each torchrun worker sees (RANK, LOCAL_RANK, WORLD_SIZE set): only local rank 0 prints the one line.
    from typer.testing import CliRunner

    from overlap_bench.cli import app

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "world_size": 3}))
    for k, v in {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    res = CliRunner().invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (res.output, res.exception)
    lines = res.output.strip().splitlines()
    if rank == "0":
        assert len(lines) == 1 and lines[0].startswith("error: world_size") and "WORLD_SIZE=2" in lines[0], lines
    else:
        assert lines == []
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------- no more ranks than the machine


def test_far_more_cpu_ranks_than_cores_are_refused_unless_overridden(monkeypatch):
    monkeypatch.setattr(launch_mod, "gpu_count", lambda: 0)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv(launch_mod.OVERSUBSCRIBE_ENV, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert resolve("gloo", 8) == ("gloo", 8)
    with pytest.raises(LaunchError, match=f"far more than the 2 CPU cores.*{launch_mod.OVERSUBSCRIBE_ENV}=1"):
        resolve("gloo", 1000)
    monkeypatch.setenv(launch_mod.OVERSUBSCRIBE_ENV, "1")
    assert resolve("gloo", 1000) == ("gloo", 1000)


@pytest.mark.parametrize("args", [["sweep", "--nproc", "100000", "--dry-run"],
                                  ["run", "--nproc", "100000", "--backend", "gloo"],
                                  ["compare", "baseline", "pr", "--nproc", "100000"]])
def test_nproc_beyond_the_machine_is_one_line_exit_2(args, monkeypatch):
    from typer.testing import CliRunner

    from overlap_bench.cli import app

    monkeypatch.delenv(launch_mod.OVERSUBSCRIBE_ENV, raising=False)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (res.output, res.exception)
    assert len(res.output.strip().splitlines()) == 1 and "CPU cores" in res.output


def test_stop_all_escalates_within_a_fixed_budget(monkeypatch):
    """However many ranks, stopping waits grace_s (default 5 s) after SIGTERM, then SIGKILLs whoever is left
    and waits at most 2 s more: the waits are counted, not timed, so the 10 s bound holds by construction."""
    import inspect

    class Stubborn:  # ignores SIGTERM, dies on SIGKILL
        def __init__(self):
            self.signals: list[int] = []

        def is_alive(self):
            return signal.SIGKILL not in self.signals

        def terminate(self):
            self.signals.append(signal.SIGTERM)

        def kill(self):
            self.signals.append(signal.SIGKILL)

    waits: list[float] = []
    monkeypatch.setattr(launcher, "_join_all", lambda procs, timeout_s: waits.append(timeout_s))
    ranks = [Stubborn() for _ in range(41)]
    grace = inspect.signature(launcher.launch).parameters["grace_s"].default
    launcher._stop_all(ranks, grace)
    assert all(r.signals == [signal.SIGTERM, signal.SIGKILL] for r in ranks)
    assert len(waits) == 2 and sum(waits) <= 10, waits
