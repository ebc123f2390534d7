"""Start a torch.distributed job: one process per rank on this machine, or join a running ``torchrun`` job.

Local ranks are spawned by ``torch.multiprocessing.start_processes`` and meet at a TCPStore the launcher
holds on a free localhost port. The first rank to fail ends the job: its peers get ``grace_s`` to fail on
their own and report why, then every rank left is stopped, and :class:`RankFailed` names the rank that
caused it and the cause in one line. A rank dies with the launcher, however the launcher ends.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from overlap_bench.world import LaunchError, in_torchrun, resolve  # noqa: F401  (re-exported)

# NVLink multicast stays off in every process we start: a program using it can take a shared host's GPUs
# out of service. Kept when already set, set when missing.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
STOP = {signal.SIGINT, signal.SIGTERM}


class RankFailed(RuntimeError):
    """A rank of the job failed; ``str()`` is a one-line message with the rank and the cause."""

    def __init__(self, rank: int, cause: str):
        super().__init__(f"rank {rank} failed: {cause}")
        self.rank, self.cause = rank, cause


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

    @property
    def device_name(self) -> str:
        """The GPU's name, or ``cpu`` (as records name their device)."""
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"


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


def _rank(rank: int, launcher: int, port: int, fn: Callable[..., Any], args: tuple, cfg: JobConfig) -> None:
    """One local rank, as ``start_processes`` calls it: run ``fn``; on any failure report it and exit 1."""
    # start_processes asks for SIGINT when the launcher dies, which a rank inside a collective never acts on.
    mp._prctl_pr_set_pdeathsig(signal.SIGKILL)
    if os.getppid() != launcher:  # the launcher died before that took effect: run nothing
        os._exit(70)
    store, code = None, 1
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False)  # its own timeout: 300 s
        # All ranks up before the collective timeout counts: one slower to import torch is not a hang.
        store.set(f"up/{rank}", "1")
        store.wait([f"up/{i}" for i in range(cfg.nproc)])
        fn(_init(rank, cfg.nproc, rank, cfg, store), *args)
        dist.destroy_process_group()
        code = 0
    except BaseException as exc:  # noqa: BLE001  (every failure reaches the launcher with its rank)
        # Reported before the group is torn down (at exit), which makes the peers fail: the cause comes first.
        cause = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
        if store is not None:
            store.set(f"failure/{rank}", json.dumps({"rank": rank, "order": store.add("failures", 1),
                                                     "cause": cause}))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown: a broken process group can hang in it


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
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # port 0: a free one
    saved = {k: os.environ.get(k) for k in cfg.env}
    procs: list[Any] = []
    try:
        # A rank's environment is the launcher's when it starts (before anything in it reads a variable);
        # Ctrl-C / SIGTERM wait until every started rank is in procs, so that all of them are stopped.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP)
        os.environ.update(cfg.env)
        try:
            procs = mp.start_processes(_rank, (os.getpid(), store.port, fn, args, cfg), cfg.nproc,
                                       join=False, start_method="spawn").processes
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
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
    failures = {i: json.loads(store.get(f"failure/{i}")) for i in range(cfg.nproc) if store.check([f"failure/{i}"])}
    raise _cause(failures, first, ended, cfg.nproc) from None


def _first_failure(procs: list) -> int | None:
    """Wait until every rank has exited (None) or one has exited with a non-zero code (its index)."""
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
    """SIGTERM every live rank, SIGKILL what is left after ``grace_s``; however many there are, this takes
    at most ``grace_s`` plus the moment SIGKILL needs."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    _join_all(procs, grace_s)
    for p in procs:
        if p.is_alive():
            p.kill()
    _join_all(procs, 2.0)


def _how(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"process killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"process killed by signal {-exitcode}"
    return f"process exited with code {exitcode}"


def _cause(failures: dict[int, dict], first: int, ended: dict[int, int], nproc: int) -> RankFailed:
    """The failure that ended the job, from what had ``ended`` (rank -> exit code) before any rank was signalled.

    A rank that ended abnormally without reporting why (killed by a signal, a crash in C++) is the cause: its
    peers' errors (a closed connection, a timed-out collective) follow from it and are added as context.
    Otherwise the first reported failure is the cause; ranks still running then (one hung outside the
    collective its peers timed out in) are named too.
    """
    earliest = min(failures.values(), key=lambda f: f["order"], default=None)
    silent = sorted((i for i, code in ended.items() if code != 0 and i not in failures), key=lambda i: i != first)
    if silent:
        then = f" (then rank {earliest['rank']}: {earliest['cause']})" if earliest else ""
        return RankFailed(silent[0], _how(ended[silent[0]]) + then)
    if earliest:
        running = [str(i) for i in range(nproc) if i not in ended]
        still = f" (rank {', '.join(running)} was still running)" if running else ""
        return RankFailed(earliest["rank"], earliest["cause"] + still)
    return RankFailed(first, _how(ended.get(first, 1)))  # it could not start (its stderr says why)
