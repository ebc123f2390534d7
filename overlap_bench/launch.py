"""Start a torch.distributed job: one process per rank on this machine, or join a running ``torchrun`` job.

Local jobs rendezvous through a ``FileStore`` in a fresh temp directory (no TCP port to race for). A rank
that raises ends the whole job: the others are terminated, and :class:`RankFailed` names the first rank
that failed and its error in one line.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from overlap_bench.errors import UserError

# NVLink multicast stays off in every process we start: a program using it can take a shared host's GPUs
# out of service. Kept when already set, set when missing.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class LaunchError(UserError):
    """Bad launch arguments (world size larger than the GPUs, unknown backend)."""


class RankFailed(RuntimeError):
    """A rank of the job failed; ``str()`` is a one-line message with the rank and the cause."""

    def __init__(self, rank: int, cause: str, detail: str = ""):
        super().__init__(f"rank {rank} failed: {cause}")
        self.rank, self.cause, self.detail = rank, cause, detail


@dataclass
class JobConfig:
    """How to start the job."""

    nproc: int
    """Ranks to start on this machine (ignored under torchrun, which sets WORLD_SIZE)."""
    backend: str
    """``nccl`` or ``gloo``."""
    timeout_s: float = 300.0
    """Collective timeout: a rank stuck in a collective fails after this long, which ends the job."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra process environment (e.g. CUDA_DEVICE_MAX_CONNECTIONS), set before CUDA starts in each rank."""


@dataclass(frozen=True)
class RankContext:
    """What a rank's function gets."""

    rank: int
    world: int
    local_rank: int
    backend: str
    device: torch.device


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
    if nproc is None:
        nproc = gpus if backend == "nccl" else 2
    if nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {nproc}")
    if backend == "nccl" and nproc > gpus:
        raise LaunchError(f"--nproc {nproc} is more than the {gpus} visible GPUs; use --nproc <= {gpus} or --backend gloo")
    return backend, nproc


def in_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _die_with_parent() -> None:
    # A rank must not outlive the launcher (no orphans holding GPUs if the launcher is SIGKILLed).
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _init(rank: int, world: int, local_rank: int, cfg: JobConfig, store: dist.Store | None) -> RankContext:
    if cfg.backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Ranks share this machine's cores: without this each one starts a thread per core and they thrash.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, cfg.nproc)))
    kwargs: dict[str, Any] = {"timeout": timedelta(seconds=cfg.timeout_s)}
    if device.type == "cuda":
        kwargs["device_id"] = device  # binds the rank to its GPU (barriers and object collectives use it)
    if store is not None:
        kwargs.update(store=store, rank=rank, world_size=world)
    dist.init_process_group(cfg.backend, **kwargs)
    return RankContext(rank, world, local_rank, cfg.backend, device)


def _entry(local_rank: int, fn: Callable[..., Any], args: tuple, cfg: JobConfig, rdv: str) -> None:
    _die_with_parent()
    try:
        store = dist.FileStore(os.path.join(rdv, "store"), cfg.nproc)
        ctx = _init(local_rank, cfg.nproc, local_rank, cfg, store)
    except BaseException as exc:  # noqa: BLE001  (every failure must reach the launcher with its rank)
        _write_failure(rdv, local_rank, exc)
        raise
    try:
        fn(ctx, *args)
    except BaseException as exc:  # noqa: BLE001
        # Written before the process group is torn down: tearing it down makes the peers fail too, and the
        # launcher reports the earliest failure as the cause.
        _write_failure(rdv, local_rank, exc)
        raise
    finally:
        dist.destroy_process_group()


def _write_failure(rdv: str, rank: int, exc: BaseException) -> None:
    cause = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    info = {"rank": rank, "time": time.time(), "cause": cause, "traceback": traceback.format_exc()}
    try:
        Path(rdv, f"failure.{rank}.json").write_text(json.dumps(info))
    except OSError:
        pass


def _first_failure(rdv: str) -> dict | None:
    """The earliest recorded failure: later ones are usually peers losing their connection to it."""
    found = []
    for p in Path(rdv).glob("failure.*.json"):
        try:
            found.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return min(found, key=lambda f: f["time"]) if found else None


def launch(fn: Callable[..., Any], args: tuple, cfg: JobConfig, grace_s: float = 5.0) -> None:
    """Run ``fn(ctx, *args)`` on every rank; returns when all ranks finished, raises :class:`RankFailed`.

    Under torchrun the current process is one rank and runs ``fn`` in-process (``env://`` rendezvous);
    ``cfg.env`` must then already be in the environment, since CUDA may have started.
    """
    for k, v in SAFE_ENV.items():
        os.environ.setdefault(k, v)
    if in_torchrun():
        ctx = _init(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", "0")), cfg, None)
        try:
            fn(ctx, *args)
        finally:
            dist.destroy_process_group()
        return
    rdv = tempfile.mkdtemp(prefix="overlap-bench-rdv-")
    saved = {k: os.environ.get(k) for k in cfg.env}
    os.environ.update(cfg.env)  # spawned children inherit the environment at start
    try:
        pctx = mp.start_processes(_entry, args=(fn, args, cfg, rdv), nprocs=cfg.nproc, join=False,
                                  start_method="spawn")
        try:
            while not pctx.join(timeout=0.5, grace_period=grace_s):
                pass
        except KeyboardInterrupt:
            _stop_all(pctx.processes, grace_s)
            raise
        except mp.ProcessRaisedException as exc:
            _stop_all(pctx.processes, grace_s)
            first = _first_failure(rdv) or {"rank": exc.error_index, "cause": _last_line(exc.msg), "traceback": exc.msg}
            raise RankFailed(first["rank"], first["cause"], first["traceback"]) from None
        except mp.ProcessExitedException as exc:
            _stop_all(pctx.processes, grace_s)
            first = _first_failure(rdv)
            if first is not None:
                raise RankFailed(first["rank"], first["cause"], first["traceback"]) from None
            how = f"killed by {exc.signal_name}" if exc.signal_name else f"exited with code {exc.exit_code}"
            raise RankFailed(exc.error_index, f"process {how}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(rdv, ignore_errors=True)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "unknown error"


def _stop_all(processes: list, grace_s: float) -> None:
    """SIGTERM every live rank, SIGKILL what is left after ``grace_s``."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join(1.0)
