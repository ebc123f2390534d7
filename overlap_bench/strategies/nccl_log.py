"""Which path NCCL took for one call (symmetric kernel, copy engine, SM kernel), from its own INFO log.

:func:`capture` switches the log on for one call only (NCCL re-reads ``NCCL_DEBUG*`` after
``ncclResetDebugInit``); :func:`classify` turns the lines into one verdict per collective. Benchmarks use it
through :func:`overlap_bench.strategies.diagnose`; a production call never logs.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable

KEEP = ("NCCL INFO",)
"""Only NCCL's INFO lines are kept; of those, :data:`_RELEVANT` picks the ones about the path taken."""

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
    """Run ``fn`` once with NCCL's INFO log on and return the relevant lines; ``sync`` waits for the GPU
    (the copy-engine set-up is logged at the end of the call's group). ``NCCL_DEBUG*`` are restored after."""
    lib = _libnccl()
    if lib is None:
        fn()
        return Captured((), "NCCL log not captured: no libnccl with ncclResetDebugInit is loaded in this process")
    tmp = tempfile.mkdtemp(prefix="ob-nccl-")
    on = {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,COLL,TUNING,P2P",
          "NCCL_DEBUG_FILE": os.path.join(tmp, "nccl.%p.log")}
    saved = {k: os.environ.get(k) for k in on}
    try:
        os.environ.update(on)
        lib.ncclResetDebugInit()
        fn()
        sync()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        lib.ncclResetDebugInit()  # NCCL re-reads the restored environment at its next log call
    lines: list[str] = []
    for name in sorted(os.listdir(tmp)):
        with open(os.path.join(tmp, name), encoding="utf-8", errors="replace") as fh:
            lines += [ln.rstrip("\n") for ln in fh if any(k in ln for k in KEEP) and _RELEVANT.search(ln)]
    shutil.rmtree(tmp, ignore_errors=True)
    return Captured(tuple(lines))


def classify(lines: tuple[str, ...] | list[str]) -> list[str]:
    """One verdict per collective in ``lines``, in order, e.g. ``"AllReduce count=3145728: symmetric kernel
    AllReduce_RSxLD_AGxST on 16 CTAs"``, ``"... SM kernel RING/SIMPLE on 24 channels"``, ``"... copy engine"``,
    ``"... one-rank local copy"`` or ``"... no path line"``. A collective's lines run from its ``opCount``
    line to the next; a copy-engine call logs no kernel line, only the first one on a communicator ``Init CE``.
    """
    calls: list[tuple[str, int, int, list[str]]] = []
    for ln in lines:
        m = _COLL.search(ln)
        if m:
            calls.append((m.group(1), int(m.group(2)), int(m.group(3)), []))
        elif calls:
            calls[-1][3].append(ln)
    out = []
    for name, count, nranks, rest in calls:
        verdict = None
        for ln in rest:
            if (m := _SYM.search(ln)) and m.group(1) == name:
                verdict = f"symmetric kernel {m.group(3)} on {m.group(4)} CTAs"
                break
            if (m := _ALGO.search(ln)) and m.group(1) == name:
                lo, hi = int(m.group(5)), int(m.group(6))
                verdict = f"SM kernel {m.group(3)}/{m.group(4)} on {hi - lo + 1} channels"
                break
        if verdict is None:
            if nranks == 1:
                verdict = "one-rank local copy"
            elif any(_CE.search(ln) for ln in rest):
                verdict = "copy engine"
            elif any(_P2P.search(ln) for ln in rest):
                verdict = "SM kernels (send/recv)"
            else:
                verdict = "no path line"
        out.append(f"{name} count={count}: {verdict}")
    return out


def summary(verdicts: list[str]) -> str:
    """The distinct verdicts, joined (a chunked call repeats the same collective per chunk)."""
    seen: list[str] = []
    for v in verdicts:
        path = v.split(": ", 1)[-1]
        name = v.split(" ", 1)[0]
        item = f"{name}: {path}"
        if item not in seen:
            seen.append(item)
    return "; ".join(seen) if seen else "no NCCL collective logged"
