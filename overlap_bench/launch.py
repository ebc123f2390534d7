"""Start a torch.distributed job: one process per rank on this machine, or join a running ``torchrun`` job.

Local jobs rendezvous through a ``FileStore`` in a fresh temp directory (no TCP port to race for). A rank
that raises or dies ends the whole job: the others are terminated, and :class:`RankFailed` names the rank
that caused it and its error in one line.

Why our own spawn and not ``torch.distributed.elastic`` (torchrun's agent) for local jobs: elastic runs a
script or entry point, not a Python function with arguments; it is built to restart failed workers, where
here the first failing rank must end the job at once with its rank and cause in one line; and its failure
reports (error files, ``ChildFailedError``) would still need this module's translation. Multi-node jobs
use torchrun itself: under it the same commands join its job (:func:`in_torchrun`).
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing.connection
import os
import pickle
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

from overlap_bench.world import LaunchError, in_torchrun, resolve  # noqa: F401  (re-exported)

# NVLink multicast stays off in every process we start: a program using it can take a shared host's GPUs
# out of service. Kept when already set, set when missing.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


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
    pctx = None
    try:
        pctx = mp.start_processes(_entry, args=(fn, args, cfg, rdv), nprocs=cfg.nproc, join=False,
                                  start_method="spawn")
        procs = pctx.processes
        try:
            first = _wait_first_failure(procs)
            if first is None:
                return
            # Let the others end on their own first (they usually fail within moments, from the broken
            # connection, and write why); what had ended before anything was signalled tells the cause.
            _join_all(procs, grace_s)
        except KeyboardInterrupt:
            _stop_all(procs, grace_s)
            raise
        ended = {i: p.exitcode for i, p in enumerate(procs) if p.exitcode is not None}
        _stop_all(procs, grace_s)
        raise _cause(rdv, first, ended, len(procs), pctx.error_files) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(rdv, ignore_errors=True)
        for path in pctx.error_files if pctx else []:  # torch's per-rank traceback files, left in /tmp
            if path and os.path.exists(path):
                os.unlink(path)


def _wait_first_failure(procs: list) -> int | None:
    """Wait until every rank has exited (None) or one has exited with a non-zero code (its index)."""
    left = {p.sentinel: i for i, p in enumerate(procs)}
    while left:
        for sentinel in multiprocessing.connection.wait(list(left), timeout=0.5):
            i = left.pop(sentinel)
            procs[i].join()
            if procs[i].exitcode != 0:
                return i
    return None


def _join_all(procs: list, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))


def _how(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"process killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"process killed by signal {-exitcode}"
    return f"process exited with code {exitcode}"


def _cause(rdv: str, first: int, ended: dict[int, int], nproc: int, error_files: list) -> RankFailed:
    """The failure that ended the job, from what had ``ended`` (rank -> exit code) before any rank was signalled.

    A rank that ended abnormally without writing why (killed by a signal, ``os._exit``, a crash in C++) is
    the cause: its peers' errors (a closed connection, a timed-out collective) follow from it and are added as
    context. Otherwise the earliest written failure is the cause; ranks that were still running then (one
    hung outside the collective its peers timed out in) are named too.
    """
    failures = {}
    for p in Path(rdv).glob("failure.*.json"):
        try:
            f = json.loads(p.read_text())
            failures[int(f["rank"])] = f
        except (OSError, ValueError, KeyError, TypeError):
            continue
    silent = sorted((i for i, code in ended.items() if code != 0 and i not in failures), key=lambda i: i != first)
    if silent:
        rank = silent[0]
        cause = _how(ended[rank])
        if failures:
            then = min(failures.values(), key=lambda f: f["time"])
            cause += f" (then rank {then['rank']}: {then['cause']})"
        return RankFailed(rank, cause)
    if failures:
        f = min(failures.values(), key=lambda f: f["time"])
        running = [str(i) for i in range(nproc) if i not in ended]
        still = f" (rank {', '.join(running)} was still running)" if running else ""
        return RankFailed(f["rank"], f["cause"] + still, f["traceback"])
    # No failure file (e.g. the spawned process could not start): torch's own error file, if any.
    try:
        with open(error_files[first], "rb") as fh:
            trace = pickle.load(fh)
        return RankFailed(first, _last_line(trace), trace)
    except (OSError, EOFError, pickle.UnpicklingError, TypeError):
        return RankFailed(first, _how(ended.get(first, 1)))


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
