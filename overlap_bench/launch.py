"""Start a torch.distributed job: one process per rank on this machine, or join a running ``torchrun`` job.

Local jobs rendezvous through a ``FileStore`` in a fresh temp directory (no TCP port to race for). A rank
that raises or dies ends the whole job: the others are terminated, and :class:`RankFailed` names the rank
that caused it and its error in one line.

Why our own spawn and not ``torch.distributed.elastic`` (torchrun's agent) for local jobs: elastic runs a
script or entry point, not a Python function with arguments; it is built to restart failed workers, where
here the first failing rank must end the job at once with its rank and cause in one line; and its failure
reports (error files, ``ChildFailedError``) would still need this module's translation. Multi-node jobs
use torchrun itself: under it the same commands join its job (:func:`in_torchrun`).

No rank outlives the launcher: each rank is a plain ``python -c`` process whose first statements (before any
import beyond the standard library) ask the kernel to SIGKILL it when the launcher dies and check that the
launcher is still its parent; the job's inputs are unpickled only after that. A small reaper process,
independent of the ranks, removes the rendezvous folder (and kills any rank still there) when the launcher
ends, however it ends (SIGKILL included).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import shutil
import subprocess
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

    @property
    def device_name(self) -> str:
        """The GPU's name, or ``cpu`` (as records name their device)."""
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"


# The first statements of every rank: standard library only (importing torch takes seconds, during which a
# killed launcher would otherwise leave the rank running). PR_SET_PDEATHSIG = 1; SIGINT and SIGTERM unblocked
# (the launcher blocks them while it starts a rank, see launch()); then the launcher's pid is checked, since it
# may have died before the setting took effect. No job to read means the launcher ended while starting it.
RANK_BOOT = """
import ctypes, os, signal, sys
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
if os.getppid() != int(sys.argv[1]):
    os._exit(70)
import pickle
try:
    path, blob = pickle.loads(sys.stdin.buffer.read())
except Exception:
    os._exit(70)
sys.stdin.close()
sys.path[:] = path
from overlap_bench.launch import _rank_main
_rank_main(blob)
"""

# The reaper: waits for the launcher to end (its stdin closes, however the launcher ends), then kills the ranks
# it was told about that are still the same processes (pid and start time) and removes the rendezvous folder.
REAPER = """
import os, shutil, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
ranks = []
for line in sys.stdin:
    pid, start = line.split()
    ranks.append((int(pid), start))
def start_of(pid):
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
for pid, start in ranks:
    if start_of(pid) == start:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
for _ in range(20):
    shutil.rmtree(sys.argv[1], ignore_errors=True)
    if not os.path.exists(sys.argv[1]):
        break
    time.sleep(0.05)
"""


def _start_time(pid: int) -> str:
    """A process's start time (clock ticks since boot) from /proc: with the pid, it names one process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _rank_main(blob: bytes) -> None:
    """A rank, after ``RANK_BOOT``: unpickle the job and run :func:`_entry`; exit 0 or 1."""
    rank, fn, args, cfg, rdv = None, None, (), None, ""
    try:
        rank, fn, args, cfg, rdv = pickle.loads(blob)
        _entry(rank, fn, args, cfg, rdv)
    except BaseException as exc:  # noqa: BLE001  (_entry wrote the failure; a failed unpickle writes it here)
        if rdv and rank is not None and not Path(rdv, f"failure.{rank}.json").exists():
            _write_failure(rdv, rank, exc)
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


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
    os.environ.update(cfg.env)  # started children inherit the environment at start
    procs: list[subprocess.Popen] = []
    reaper = None
    try:
        reaper = subprocess.Popen([sys.executable, "-S", "-c", REAPER, rdv], stdin=subprocess.PIPE,
                                  start_new_session=True)  # a terminal's Ctrl-C must not reach it
        try:
            for rank in range(cfg.nproc):
                blob = pickle.dumps((rank, fn, args, cfg, rdv))
                # Ctrl-C / SIGTERM held back while the rank starts, so every started rank is in procs (and
                # stopped below); the rank unblocks them first thing (RANK_BOOT).
                held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
                try:
                    procs.append(subprocess.Popen([sys.executable, "-c", RANK_BOOT, str(os.getpid())],
                                                  stdin=subprocess.PIPE))
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, held)
                p = procs[-1]
                reaper.stdin.write(f"{p.pid} {_start_time(p.pid)}\n".encode())
                reaper.stdin.flush()
                p.stdin.write(pickle.dumps((list(sys.path), blob)))
                p.stdin.close()
            first = _wait_first_failure(procs)
            if first is None:
                return
            # Let the others end on their own first (they usually fail within moments, from the broken
            # connection, and write why); what had ended before anything was signalled tells the cause.
            _join_all(procs, grace_s)
        except BaseException:  # Ctrl-C, SIGTERM (cli.Terminated), a failed start: no rank is left running
            _stop_all(procs, grace_s)
            raise
        ended = {i: p.returncode for i, p in enumerate(procs) if p.returncode is not None}
        _stop_all(procs, grace_s)
        raise _cause(rdv, first, ended, len(procs)) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(rdv, ignore_errors=True)
        if reaper is not None:
            reaper.stdin.close()  # the reaper finds every rank ended and the folder gone, and exits
            try:
                reaper.wait(5)
            except subprocess.TimeoutExpired:
                pass


def _wait_first_failure(procs: list[subprocess.Popen]) -> int | None:
    """Wait until every rank has exited (None) or one has exited with a non-zero code (its index)."""
    left = set(range(len(procs)))
    while left:
        for i in sorted(left):
            code = procs[i].poll()
            if code is not None:
                left.discard(i)
                if code != 0:
                    return i
        if left:
            time.sleep(0.05)
    return None


def _join_all(procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _how(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"process killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"process killed by signal {-exitcode}"
    return f"process exited with code {exitcode}"


def _cause(rdv: str, first: int, ended: dict[int, int], nproc: int) -> RankFailed:
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
    # No failure file: the process could not start (its stderr says why).
    return RankFailed(first, _how(ended.get(first, 1)))


def _stop_all(processes: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every live rank, SIGKILL what is left after ``grace_s``; however many there are, this takes
    at most ``grace_s`` plus the moment SIGKILL needs."""
    for p in processes:
        if p.poll() is None:
            _signal(p, signal.SIGTERM)
    _join_all(processes, grace_s)
    for p in processes:
        if p.poll() is None:
            _signal(p, signal.SIGKILL)
    _join_all(processes, 2.0)


def _signal(p: subprocess.Popen, sig: int) -> None:
    try:
        p.send_signal(sig)
    except OSError:
        pass
