"""Start a torch.distributed job: ranks spawned here (meeting at the launcher's TCPStore), or join ``torchrun``.
What torch's multiprocessing lacks: the first failure ends the job and :class:`RankFailed` names the rank that
caused it in one line; a job environment Python cannot start in is found first; ranks die with the launcher."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from overlap_bench.envinfo import environ
from overlap_bench.world import LaunchError, in_torchrun, resolve  # noqa: F401  (re-exported)

# NVLink multicast off in every process we start (set when missing): it can take a shared host's GPUs out of service.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
_TORCHRUN_JOBS = itertools.count()  # jobs this process joined under torchrun (every rank counts alike)


class RankFailed(RuntimeError):
    """A rank of the job failed; ``str()`` is one line with the rank and the cause."""

    def __init__(self, rank: int, cause: str):
        super().__init__(f"rank {rank} failed: {cause}")
        self.rank, self.cause = rank, cause


@dataclass
class JobConfig:
    """How to start the job."""

    nproc: int  # ranks to start on this machine (under torchrun, WORLD_SIZE decides)
    backend: str  # nccl or gloo
    timeout_s: float = 300.0  # collective timeout: a rank stuck in one fails after this long, ending the job
    env: dict[str, str] = field(default_factory=dict)  # extra environment of every rank, from its start


@dataclass(frozen=True)
class RankContext:
    """What a rank's function gets."""

    rank: int
    world: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def device_name(self) -> str:
        """The GPU's name, or ``cpu`` (as records name their device)."""
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"


def _init(rank: int, world: int, local_rank: int, cfg: JobConfig, store: dist.Store | None) -> RankContext:
    device = torch.device("cuda", local_rank) if cfg.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # ranks share this machine's cores: without this each one starts a thread per core and they thrash
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, cfg.nproc)))
    timeout = timedelta(seconds=cfg.timeout_s)
    if store is None:  # torchrun's store outlives a group: a new group of the same name would read the last one's keys
        store = dist.PrefixStore(f"job{next(_TORCHRUN_JOBS)}", next(dist.rendezvous("env://", timeout=timeout))[0])
    # device_id binds the rank to its GPU (barriers and object collectives use it).
    dist.init_process_group(cfg.backend, timeout=timeout, device_id=device if device.type == "cuda" else None,
                            store=store, rank=rank, world_size=world)
    return RankContext(rank, world, local_rank, cfg.backend, device)


def _rank(rank: int, launcher: int, port: int, fn: Callable[..., Any], args: tuple, cfg: JobConfig) -> None:
    """One local rank: run ``fn``, then exit 0, or report the failure and exit 1 (no interpreter teardown)."""
    # start_processes asks for SIGINT when the launcher dies, which a rank inside a collective never acts on.
    mp._prctl_pr_set_pdeathsig(signal.SIGKILL)
    if os.getppid() != launcher:  # the launcher died before that took effect: run nothing
        os._exit(70)
    store, code = None, 0
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False)  # its own timeout: 300 s
        # All ranks up before the collective timeout counts: one slower to import torch is not a hang.
        store.set(f"up/{rank}", "1")
        store.wait([f"up/{i}" for i in range(cfg.nproc)])
        fn(_init(rank, cfg.nproc, rank, cfg, store), *args)
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001  (every failure reaches the launcher with its rank)
        # Reported before the group is torn down (at exit), which makes the peers fail: the cause comes first.
        cause = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
        if store is not None:  # with its place in the order of failures
            store.set(f"failure/{rank}", f"{store.add('failures', 1)} {cause}")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no teardown: a broken process group can hang in it, and torch's takes a second or more


def launch(fn: Callable[..., Any], args: tuple, cfg: JobConfig, grace_s: float = 5.0) -> None:
    """Run ``fn(ctx, *args)`` on every rank, or raise :class:`RankFailed`. Under torchrun this process is one rank
    and runs ``fn`` itself (``cfg.env`` must then already be set: CUDA may have started)."""
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
    broken = _start_failure(cfg.env) if cfg.env else None
    if broken:  # every rank would die so, before it could report, its start data unread (a hang if large)
        raise RankFailed(0, broken)
    # Held by the launcher on a port the kernel picks: no port to race for, nothing left on disk.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    procs: list[Any] = []
    try:
        # A rank's environment is the launcher's when it starts (before anything in it reads a variable);
        # Ctrl-C / SIGTERM wait until every started rank is in procs, so that all of them are stopped.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            with environ(cfg.env):
                procs = mp.start_processes(_rank, (os.getpid(), store.port, fn, args, cfg), cfg.nproc,
                                           join=False, start_method="spawn").processes
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        first = _first_failure(procs)
        if first is None:
            return
        _join_all(procs, grace_s)  # peers usually fail within moments (a broken connection) and report why
        ended = {i: p.exitcode for i, p in enumerate(procs) if p.exitcode is not None}
    except BaseException:  # Ctrl-C, SIGTERM (cli.Terminated), a failed start: no rank is left running
        _stop_all(procs, grace_s)
        raise
    _stop_all(procs, grace_s)
    failures = {i: store.get(f"failure/{i}").decode().split(" ", 1) for i in range(cfg.nproc)
                if store.check([f"failure/{i}"])}
    up = {i for i in range(cfg.nproc) if store.check([f"up/{i}"])}
    raise _cause(failures, first, ended, cfg.nproc, up) from None


def _start_failure(env: dict[str, str]) -> str | None:
    """How Python fails to start with the job's ``env``, in one line (its last error line); None when it starts."""
    try:
        res = subprocess.run([sys.executable, "-c", "import multiprocessing.spawn"], env={**os.environ, **env},
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode == 0:
        return None
    lines = [line.strip() for line in res.stderr.splitlines() if line.strip()]
    said = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "no message")
    job = " ".join(f"{k}={v}" for k, v in env.items())
    return f"process exited with code {res.returncode} before it started: {said} (the job's environment: {job})"


def _first_failure(procs: list) -> int | None:
    """Wait until all ranks exited (None) or one failed (its index; ProcessContext.join blames the first exit)."""
    left = {p.sentinel: i for i, p in enumerate(procs)}
    while left:
        for s in wait(list(left)):
            i = left.pop(s)
            procs[i].join()
            if procs[i].exitcode:
                return i
    return None


def _join_all(procs: list, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))


def _stop_all(procs: list, grace_s: float) -> None:
    """SIGTERM every live rank, SIGKILL what is left after ``grace_s``: at most ``grace_s`` + 2 s in all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    _join_all(procs, grace_s)
    for p in procs:
        if p.is_alive():
            p.kill()
    _join_all(procs, 2.0)


def _how(code: int) -> str:
    if code >= 0:
        return f"process exited with code {code}"
    return f"process killed by {next((s.name for s in signal.Signals if s == -code), f'signal {-code}')}"


def _cause(failures: dict[int, list[str]], first: int, ended: dict[int, int], nproc: int,
           up: set[int]) -> RankFailed:
    """The failure that ended the job, from the exit codes ``ended`` before any rank was signalled: a rank that
    died silently (signal, C++ crash) caused its peers' errors, which follow; else the first reported failure."""
    earliest = min(failures, key=lambda i: int(failures[i][0]), default=None)  # rank -> [order, cause]
    silent = sorted((i for i, code in ended.items() if code != 0 and i not in failures), key=lambda i: i != first)
    if silent:
        then = f" (then rank {earliest}: {failures[earliest][1]})" if earliest is not None else ""
        early = "" if silent[0] in up else " before it started (its stderr says why)"
        return RankFailed(silent[0], _how(ended[silent[0]]) + early + then)
    if earliest is not None:
        running = [str(i) for i in range(nproc) if i not in ended]
        still = f" (rank {', '.join(running)} was still running)" if running else ""
        return RankFailed(earliest, failures[earliest][1] + still)
    return RankFailed(first, _how(ended.get(first, 1)))  # it could not start (its stderr says why)
