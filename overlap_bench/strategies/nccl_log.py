"""Which path NCCL took for one call, from its INFO log switched on for that call only (under ``diagnose``)."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable

from overlap_bench.envinfo import environ

_RELEVANT = re.compile(r"opCount|Bytes -> |Init CE|via P2P|via SHM|via NET")
_COLL = re.compile(r"NCCL INFO (\w+): opCount \w+ sendbuff \S+ recvbuff \S+ count (\d+) .*\[nranks=(\d+)\]")
_SYM = re.compile(r"NCCL INFO (\w+) \[Symmetric\]: (\d+) Bytes -> Kernel (\S+) nchannels (\d+)")
_ALGO = re.compile(r"NCCL INFO (\w+): (\d+) Bytes -> Algo (\S+) proto (\S+) channel\{Lo\.\.Hi\}=\{(\d+)\.\.(\d+)\}")
_CE = re.compile(r"NCCL INFO Init CE")
_P2P = re.compile(r"via (P2P|SHM|NET)")


def _libnccl() -> ctypes.CDLL | None:
    """The libnccl this process has loaded (torch loads it as a shared library), or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "libnccl" in ln.rsplit("/", 1)[-1]})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            lib.ncclResetDebugInit  # noqa: B018  (raises AttributeError when the symbol is missing)
            return lib
        except (OSError, AttributeError):
            continue
    return None


@dataclass(frozen=True)
class Captured:
    """NCCL's INFO lines about one call (empty and with ``why`` set when they could not be captured)."""

    lines: tuple[str, ...]
    why: str | None = None


def capture(fn: Callable[[], object], sync: Callable[[], None]) -> Captured:
    """Run ``fn`` once with NCCL's INFO log on and return the lines about its path; ``sync`` waits for the GPU."""
    lib = _libnccl()
    if lib is None:
        fn()
        return Captured((), "NCCL log not captured: no libnccl with ncclResetDebugInit is loaded in this process")
    tmp = tempfile.mkdtemp(prefix="ob-nccl-")
    on = {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,COLL,TUNING,P2P",
          "NCCL_DEBUG_FILE": os.path.join(tmp, "nccl.%p.log")}
    try:
        with environ(on):
            lib.ncclResetDebugInit()
            fn()
            sync()
    finally:
        lib.ncclResetDebugInit()  # NCCL re-reads the restored environment at its next log call
    lines: list[str] = []
    for name in sorted(os.listdir(tmp)):
        with open(os.path.join(tmp, name), encoding="utf-8", errors="replace") as fh:
            lines += [ln.rstrip("\n") for ln in fh if "NCCL INFO" in ln and _RELEVANT.search(ln)]
    shutil.rmtree(tmp, ignore_errors=True)
    return Captured(tuple(lines))


def classify(lines: tuple[str, ...] | list[str]) -> list[str]:
    """One verdict per collective (from its ``opCount`` line to the next), e.g. ``"AllReduce count=3145728:
    symmetric kernel AllReduce_RSxLD_AGxST on 16 CTAs"``."""
    calls: list[tuple[str, int, int, list[str]]] = []
    for ln in lines:
        m = _COLL.search(ln)
        if m:
            calls.append((m.group(1), int(m.group(2)), int(m.group(3)), []))
        elif calls:
            calls[-1][3].append(ln)
    return [f"{name} count={count}: {_verdict(name, nranks, rest)}" for name, count, nranks, rest in calls]


def _verdict(name: str, nranks: int, rest: list[str]) -> str:
    for ln in rest:
        if (m := _SYM.search(ln)) and m.group(1) == name:
            return f"symmetric kernel {m.group(3)} on {m.group(4)} CTAs"
        if (m := _ALGO.search(ln)) and m.group(1) == name:
            lo, hi = int(m.group(5)), int(m.group(6))
            return f"SM kernel {m.group(3)}/{m.group(4)} on {hi - lo + 1} channels"
    if nranks == 1:
        return "one-rank local copy"
    if any(_CE.search(ln) for ln in rest):
        return "copy engine"
    if any(_P2P.search(ln) for ln in rest):
        return "SM kernels (send/recv)"
    return "no path line"


def summary(verdicts: list[str]) -> str:
    """The distinct verdicts, joined (a chunked call repeats the same collective per chunk)."""
    seen = dict.fromkeys(f"{v.split(' ', 1)[0]}: {v.split(': ', 1)[-1]}" for v in verdicts)
    return "; ".join(seen) or "no NCCL collective logged"
