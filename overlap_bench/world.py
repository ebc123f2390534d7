"""The job's shape before anything starts (backend, rank count, torchrun or not): validating a spec starts nothing."""

from __future__ import annotations

import os

import torch

from overlap_bench.errors import UserError


OVERSUBSCRIBE_ENV = "OVERLAP_BENCH_OVERSUBSCRIBE"  # set to 1 to start more gloo ranks than the limit (each crawls)
# gloo ranks are refused beyond max(CPU_RANKS_MIN, CPU_RANKS_PER_CORE * cores) without the override.
CPU_RANKS_PER_CORE = 4
CPU_RANKS_MIN = 8


class LaunchError(UserError):
    """Bad launch arguments (world size larger than the GPUs, unknown backend)."""


def gpu_count() -> int:
    """CUDA GPUs visible to this process."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve(backend: str | None, nproc: int | None) -> tuple[str, int]:
    """Pick the backend (``nccl`` when GPUs are visible, else ``gloo``) and the rank count (every GPU, or 2)."""
    gpus = gpu_count()
    backend = (backend or "auto").lower()
    if backend == "auto":
        backend = "nccl" if gpus > 0 else "gloo"
    if backend not in ("nccl", "gloo"):
        raise LaunchError(f"--backend must be auto, nccl or gloo, got '{backend}'")
    if in_torchrun():
        return backend, int(os.environ["WORLD_SIZE"])
    if backend == "nccl" and gpus == 0:
        raise LaunchError("--backend nccl needs CUDA GPUs and none are visible; use --backend gloo (or auto)")
    if nproc is None:
        nproc = gpus if backend == "nccl" else 2
    if nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {nproc}")
    if backend == "nccl" and nproc > gpus:
        raise LaunchError(f"--nproc {nproc} is more than the {gpus} visible GPUs; use --nproc <= {gpus} "
                          "or --backend gloo")
    cores = os.cpu_count() or 1
    limit = max(CPU_RANKS_MIN, CPU_RANKS_PER_CORE * cores)
    if backend == "gloo" and nproc > limit and os.environ.get(OVERSUBSCRIBE_ENV) != "1":
        raise LaunchError(f"--nproc {nproc} is far more than the {cores} CPU cores (at most {limit} gloo ranks "
                          f"here); use --nproc <= {limit}, or set {OVERSUBSCRIBE_ENV}=1 to start them anyway")
    return backend, nproc


def in_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def refuse_world_one(world: int, what: str) -> None:
    """Refuse ``what`` (a sweep, a comparison, a policy) on one rank, where there is nothing to overlap."""
    if world == 1:
        raise LaunchError(f"world_size: 1 rank has nothing to overlap, so {what} would only rank noise; run on 2 "
                          "or more ranks (--nproc), or use `overlap-bench interference` on one GPU")
