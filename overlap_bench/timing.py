"""The timing harness: CUDA events or ``perf_counter``; per-rank median and IQR, the max over ranks (the slowest)."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

# The one default for specs, run, compare and the ranks: untimed calls, then timed calls per region.
WARMUP = 5
REPS = 20


@dataclass(frozen=True)
class Timing:
    """One measured region, in ms: the max over ranks of each rank's median and interquartile range."""

    median_ms: float
    iqr_ms: float
    reps: int


def allreduce_max(values: list[float], group: dist.ProcessGroup | None, device: torch.device) -> list[float]:
    """Element-wise max over ranks (agreed counts, slowest time, largest ``rel_err``); NaN if any rank's is NaN."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    # A MAX all-reduce drops NaN (gloo keeps max(0, nan) = 0), so NaN flags travel beside the values.
    both = torch.cat([t, torch.isnan(t).to(torch.float64)])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    n = len(values)
    return both[:n].masked_fill(both[n:] > 0, math.nan).tolist()


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iqr(samples: list[float]) -> float:
    """Interquartile range (inclusive quartiles) of ``samples``; 0 for fewer than two."""
    if len(samples) < 2:
        return 0.0
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[2] - q[0]


def time_region(fn: Callable[[], object], *, warmup: int, reps: int, group: dist.ProcessGroup | None,
                device: torch.device, clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Time ``fn`` ``reps`` times after ``warmup`` calls on every rank (counts agreed, one barrier first); on GPU,
    events bracket each call of a back-to-back loop, so waits for the slowest rank count. ``clock``: CPU seconds."""
    warmup, reps = (int(v) for v in allreduce_max([warmup, reps], group, device))
    for _ in range(warmup):
        fn()
    sync(device)
    dist.barrier(group=group)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        sync(device)
        samples = [start.elapsed_time(end) for start, end in events]
    else:
        samples = []
        for _ in range(reps):
            t0 = clock()
            fn()
            samples.append((clock() - t0) * 1e3)
    med, spread = allreduce_max([statistics.median(samples), iqr(samples)], group, device)
    return Timing(med, spread, reps)
