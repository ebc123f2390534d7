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
    t0 = time.monotonic()
    with pytest.raises(RankFailed) as info:
        launch(_rank_one_raises, (), JobConfig(nproc=3, backend="gloo", timeout_s=120), grace_s=2)
    elapsed = time.monotonic() - t0
    assert info.value.rank == 1
    assert "rank 1 failed" in str(info.value) and "ValueError: boom on purpose" in str(info.value)
    assert "\n" not in str(info.value)
    assert elapsed < 30, f"took {elapsed:.1f}s"
    assert multiprocessing.active_children() == []  # no orphans


def test_env_variant_and_safety_vars_reach_children(tmp_path, monkeypatch):
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    out = tmp_path / "env.txt"
    launch(_env_probe, (str(out),), JobConfig(nproc=2, backend="gloo", env={"OB_TEST_KNOB": "7"}))
    assert [open(f"{out}.{r}").read() for r in range(2)] == ["0,7", "0,7"]
    assert "OB_TEST_KNOB" not in os.environ  # restored in the launcher
