"""The environment a run was measured in: GPUs, driver, versions, relevant variables, host, commit, command."""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

import overlap_bench

ENV_PREFIXES = ("NCCL_", "CUDA_", "TORCH_", "NVSHMEM_", "OMP_", "OVERLAP_BENCH_")


def utc_now() -> str:
    """The time stamp of records, ``env.json``, ``run.json`` and the lock: UTC, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """``OVERLAP_BENCH_GIT_COMMIT`` (a commit shipped to a GPU host), else HEAD of the package's checkout
    (``-dirty`` with uncommitted changes)."""
    if os.environ.get("OVERLAP_BENCH_GIT_COMMIT"):
        return os.environ["OVERLAP_BENCH_GIT_COMMIT"]
    here = str(Path(overlap_bench.__file__).resolve().parent)
    head = _run(["git", "rev-parse", "HEAD"], cwd=here)  # None: not a checkout
    if head and _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here):
        head += "-dirty"
    return head


def command_line() -> str:
    """This process's command line as the user would type it (``overlap-bench ...``)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("__main__.py", "overlap-bench")):
        argv[0] = "overlap-bench"
    return " ".join(argv)


def collect(command: str | None = None) -> dict[str, Any]:
    """Everything a committed number needs beside it (GPUs from nvidia-smi: torch would start CUDA here)."""
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]) or ""
    rows = [[c.strip() for c in line.split(",")] for line in smi.splitlines() if line.strip()]
    names = [r[0] for r in rows]
    try:
        nccl = ".".join(str(v) for v in torch.cuda.nccl.version()) if torch.cuda.is_available() else None
    except (AttributeError, RuntimeError):
        nccl = None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {
        "gpu_name": names[0] if names else "cpu",
        "gpu_names": names,
        "gpu_count": len(names) if visible is None else len([v for v in visible.split(",") if v.strip()]),
        "driver": rows[0][1] if rows and len(rows[0]) > 1 else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "nccl": nccl,
        "python": sys.version.split()[0],
        "overlap_bench": overlap_bench.__version__,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "git_commit": git_commit(),
        "command": command or command_line(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        "time": utc_now(),
    }


@contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set inside the block, each variable restored (or removed) after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
