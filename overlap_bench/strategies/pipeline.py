"""The chunk pipeline of ``pr`` and ``chunked``: row bounds, products into one output, each chunk's all-reduce."""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

COMM_PATHS = ("stream", "async", "symm", "ce")

PATHS: Counter = Counter()  # calls per path (baseline or chunks=N): tests see which path ran at a threshold


def rank_bias(bias: torch.Tensor | None, group: dist.ProcessGroup | None) -> torch.Tensor | None:
    """Bias only on the group's rank 0, before the reduction, so it is counted exactly once."""
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
    """``m`` rows in ``chunks`` non-empty ``(start, end)`` ranges, inner edges on multiples of ``align``. ``even``:
    near-equal; ``edges``: first and last half size (shorter fill and drain); ``geo``: each ``ratio`` times the
    one before (``ratio ~ t_comm / t_gemm`` balances the stages)."""
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
        # Relative to the largest chunk, so no power overflows.
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
    """How a strategy splits ``M`` rows, each range all-reduced on its own (for schedules that wait later)."""

    bounds: tuple[tuple[int, int], ...]  # (start, end) row ranges covering [0, M) once, in order
    comm: str | None = None  # stream or async; None for the baseline path (one range): the caller's path
    priority: bool = False  # all-reduce on the high-priority process group (nccl_group)


@dataclass
class PendingAllReduce:
    """All-reduces issued by :func:`start_bounds`; ``wait()`` orders the caller after exactly these."""

    out: torch.Tensor  # kept alive until the wait: the side stream still writes it
    _done: torch.cuda.Event | None
    _works: list

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
    """Multiply each row range into ``out`` and issue its all-reduce at once, to run while the next computes:
    ``stream`` (``symm``/``ce``) on a side stream after a CUDA event, ``async`` (and gloo) by work handles (a
    ``reduce_chunk(chunk, group)`` blocks on gloo). ``gemm_stream``: where the products run instead."""
    PATHS[f"chunks={len(bounds)}"] += 1
    b = rank_bias(bias, group)
    comm_group = comm_group if comm_group is not None else group
    if out.is_cuda:
        main = torch.cuda.current_stream(out.device)
        prod = gemm_stream if gemm_stream is not None else main
        if prod is not main:
            prod.wait_stream(main)  # the inputs were written on the caller's stream
        if comm != "async":
            reduce = reduce_chunk or (lambda chunk, g: dist.all_reduce(chunk, group=g))
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
    works = []
    for s, e in bounds:
        matmul_into(out[s:e], x[s:e], weight, b)
        if reduce_chunk is not None:
            reduce_chunk(out[s:e], comm_group)
        else:
            works.append(dist.all_reduce(out[s:e], group=comm_group, async_op=True))
    return PendingAllReduce(out, None, works)


def all_reduce_bounds(*args: Any, **kw: Any) -> torch.Tensor:
    """:func:`start_bounds` (same arguments), then wait for its all-reduces."""
    return start_bounds(*args, **kw).wait()


@functools.cache
def comm_stream(device: torch.device) -> torch.cuda.Stream:
    """One communication stream per device, reused across calls (creating streams per call costs time)."""
    return torch.cuda.Stream(device=device)


_NCCL_GROUPS: dict[tuple[int, bool, bool], dist.ProcessGroup] = {}


def nccl_group(group: dist.ProcessGroup | None, high_priority: bool = True,
               zero_cta: bool = False) -> dist.ProcessGroup:
    """The ranks' group with a high-priority NCCL stream and/or zero-CTA policy; created once, collectively."""
    key = (id(group), high_priority, zero_cta)
    if key not in _NCCL_GROUPS:
        opts = dist.ProcessGroupNCCL.Options()
        if zero_cta:
            opts.config.cta_policy = dist.ProcessGroupNCCL.NCCL_CTA_POLICY_ZERO
        opts.is_high_priority_stream = high_priority
        ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        _NCCL_GROUPS[key] = dist.new_group(ranks, backend="nccl", pg_options=opts)
    return _NCCL_GROUPS[key]


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
