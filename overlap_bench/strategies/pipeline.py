"""The chunk pipeline shared by ``pr`` and ``chunked``: row bounds, the product into one preallocated
output, and the per-chunk all-reduce on a side stream (CUDA events) or through async work handles."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

COMM_PATHS = ("stream", "async", "symm", "ce")

PATHS: Counter = Counter()
"""How often each path ran in this process: ``"baseline"`` (one product, one all-reduce) or ``"chunks=N"`` (the
chunk pipeline over N row ranges). Tests read it to see which path ran where outputs agree either way (M equal to
a threshold); one dict increment per call, bounded keys."""


def rank_bias(bias: torch.Tensor | None, group: dist.ProcessGroup | None) -> torch.Tensor | None:
    """Bias only on the group's rank 0, before the reduction, so it is counted exactly once (as sglang)."""
    if bias is None or dist.get_rank(group) != 0:
        return None
    return bias


def matmul_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``out = x @ weight.T (+ bias)`` written in place (no temporary, no concatenation later)."""
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


SPLITS = ("even", "edges", "geo")


def even_bounds(m: int, chunks: int, align: int = 1, split: str = "even", ratio: float = 1.0) -> list[tuple[int, int]]:
    """Split ``m`` rows into ``chunks`` ``(start, end)`` ranges whose inner edges are multiples of ``align``
    (GEMM tile alignment); empty ranges are dropped, so fewer chunks may come back.

    ``split="even"``: near-equal chunks. ``split="edges"``: the first and last chunk half the size of the
    others, to shorten the pipeline's fill (the first product runs with nothing to hide it) and its drain
    (the last all-reduce runs with nothing to hide behind). ``split="geo"``: each chunk ``ratio`` times the
    one before. With ``ratio ~ t_comm / t_gemm`` each product lasts as long as the previous chunk's
    all-reduce: growing chunks (ratio > 1) suit a communication-bound layer (small fill), shrinking ones
    (ratio < 1) a GEMM-bound layer (small drain).
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    if chunks > m:
        raise ValueError(f"chunks={chunks} is more than the {m} token rows; use chunks <= tokens")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    weights = [1.0] * chunks
    if split == "edges" and chunks >= 3:
        weights[0] = weights[-1] = 0.5
    elif split == "geo":
        if ratio <= 0:
            raise ValueError(f"ratio must be > 0, got {ratio}")
        # Relative to the largest chunk, so no power overflows whatever the ratio and the chunk count.
        top = chunks - 1 if ratio > 1 else 0
        weights = [ratio ** (i - top) for i in range(chunks)]
    cum = [sum(weights[:i]) / sum(weights) for i in range(chunks + 1)]
    edges = [0]
    for i in range(1, chunks):
        edge = int(m * cum[i] + 1e-9)
        if align > 1:
            edge = min(m, round(edge / align) * align)
        edges.append(max(edge, edges[-1]))
    edges.append(m)
    return [(s, e) for s, e in zip(edges, edges[1:]) if e > s]


@dataclass(frozen=True)
class RowSplit:
    """How a strategy splits ``M`` rows for one call: the row ranges, each all-reduced on its own, and the
    communication path. Schedules that issue a layer's all-reduces and wait for them later (the model's
    nano-batches) use it to run a strategy's split without its final wait."""

    bounds: tuple[tuple[int, int], ...]
    """``(start, end)`` row ranges covering ``[0, M)`` once, in order."""
    comm: str | None = None
    """``stream`` or ``async``; None when the strategy has no path of its own (one range, the baseline path):
    the caller's path is used."""
    priority: bool = False
    """All-reduce on the high-priority process group (:func:`high_priority_group`)."""


class PendingAllReduce:
    """All-reduces issued by :func:`start_bounds` and not yet waited for. ``wait()`` orders the caller's
    stream after exactly these all-reduces (not after later ones issued on the same stream)."""

    def __init__(self, out: torch.Tensor, done: "torch.cuda.Event | None", works: list) -> None:
        self.out = out  # kept alive until the wait: the side stream still writes it
        self._done = done
        self._works = works

    def wait(self) -> torch.Tensor:
        """Make the current stream (GPU) or the caller (gloo) wait; returns the reduced output."""
        if self._done is not None:
            torch.cuda.current_stream(self.out.device).wait_event(self._done)
        for w in self._works:
            w.wait()
        self._done, self._works = None, []
        return self.out


def start_bounds(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 group: dist.ProcessGroup | None, bounds, comm: str,
                 comm_group: dist.ProcessGroup | None = None, *,
                 reduce_chunk: Callable[[torch.Tensor, dist.ProcessGroup | None], None] | None = None,
                 gemm_stream: torch.cuda.Stream | None = None) -> PendingAllReduce:
    """Multiply each row range into ``out`` and issue its all-reduce at once, so that it runs while the next
    range (or whatever the caller launches next) computes; the caller waits on the returned handle.

    ``comm="stream"`` (and ``symm``/``ce``, which differ in where ``out`` lives and in ``reduce_chunk``): each
    range's reduction is issued on a dedicated communication stream after a CUDA event recorded behind its
    product (the seed PR's scheme); an event recorded on that stream after the last one is what ``wait()``
    waits for. ``comm="async"``: the all-reduce is issued from the product stream with ``async_op=True`` and
    ``wait()`` waits on the work handles. Without CUDA (gloo) there are no streams: the all-reduce runs
    through work handles, whose async work runs on gloo's own thread, which gives the overlap; a custom
    ``reduce_chunk`` runs blocking after each product there.

    ``reduce_chunk(chunk, group)`` replaces ``dist.all_reduce`` (e.g. the copy-engine exchange).
    ``gemm_stream``: the products run there (a green context's stream) instead of the caller's stream; every
    reduction waits for its product, so waiting for the reductions also waits for the products.
    """
    PATHS[f"chunks={len(bounds)}"] += 1
    b = rank_bias(bias, group)
    comm_group = comm_group if comm_group is not None else group
    if out.is_cuda:
        main = torch.cuda.current_stream(out.device)
        prod = gemm_stream if gemm_stream is not None else main
        if prod is not main:
            prod.wait_stream(main)  # the inputs were written on the caller's stream
        if comm != "async":
            reduce = reduce_chunk or _all_reduce
            side = comm_stream(out.device)
            for s, e in bounds:
                with torch.cuda.stream(prod):
                    matmul_into(out[s:e], x[s:e], weight, b)
                ready = torch.cuda.Event()
                ready.record(prod)
                side.wait_event(ready)
                with torch.cuda.stream(side):
                    reduce(out[s:e], comm_group)
            done = torch.cuda.Event()
            done.record(side)
            return PendingAllReduce(out, done, [])
        works = []
        with torch.cuda.stream(prod):  # NCCL's stream waits for the current (product) stream
            for s, e in bounds:
                matmul_into(out[s:e], x[s:e], weight, b)
                works.append(dist.all_reduce(out[s:e], group=comm_group, async_op=True))
        return PendingAllReduce(out, None, works)
    if reduce_chunk is not None:
        for s, e in bounds:
            matmul_into(out[s:e], x[s:e], weight, b)
            reduce_chunk(out[s:e], comm_group)
        return PendingAllReduce(out, None, [])
    works = []
    for s, e in bounds:
        matmul_into(out[s:e], x[s:e], weight, b)
        works.append(dist.all_reduce(out[s:e], group=comm_group, async_op=True))
    return PendingAllReduce(out, None, works)


def _all_reduce(chunk: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    dist.all_reduce(chunk, group=group)


def all_reduce_bounds(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      group: dist.ProcessGroup | None, bounds, comm: str,
                      comm_group: dist.ProcessGroup | None = None, *,
                      reduce_chunk: Callable[[torch.Tensor, dist.ProcessGroup | None], None] | None = None,
                      gemm_stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """:func:`start_bounds`, then wait: each range's all-reduce runs while the next range multiplies."""
    return start_bounds(out, x, weight, bias, group, bounds, comm, comm_group, reduce_chunk=reduce_chunk,
                        gemm_stream=gemm_stream).wait()


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def comm_stream(device: torch.device) -> torch.cuda.Stream:
    """One communication stream per device, reused across calls (creating streams per call costs time)."""
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device=device)
    return _STREAMS[device]


_HIGH_PRIORITY: dict[int, dist.ProcessGroup] = {}


def high_priority_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """A process group over the same ranks whose NCCL stream has high priority.

    NCCL kernels run on the process group's internal stream, not on the caller's stream, so the priority
    has to be set there. Created once per group; every rank must reach the first call (it is collective).
    """
    key = id(group)
    if key not in _HIGH_PRIORITY:
        opts = dist.ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = True
        ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        _HIGH_PRIORITY[key] = dist.new_group(ranks, backend="nccl", pg_options=opts)
    return _HIGH_PRIORITY[key]


def priority_reason(priority: bool, backend: str) -> str | None:
    """Why a high-priority all-reduce stream cannot be had on ``backend``, or None."""
    if priority and backend != "nccl":
        return "priority=true needs NCCL (a high-priority CUDA stream); gloo has no stream priorities"
    return None


def gloo_note(comm: str, backend: str) -> str | None:
    """Record text for the gloo stand-in of the stream path."""
    if backend == "gloo" and comm == "stream":
        return "gloo has no CUDA streams: the stream path ran as async work handles"
    return None
