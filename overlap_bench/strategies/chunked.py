"""``chunked``: the general chunked overlap, every number a setting the sweep can tune."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
import torch.distributed as dist
from pydantic import Field

from overlap_bench import strategies
from overlap_bench.strategies import StrategyUnavailable, greenctx, nccl_log, register, symm
from overlap_bench.strategies.baseline import baseline_into
from overlap_bench.strategies.pipeline import (COMM_PATHS, SPLITS, RowSplit, all_reduce_bounds, even_bounds,
                                               gloo_note, nccl_group, priority_reason)


@dataclass(frozen=True)
class ChunkedSettings:
    """Settings of the chunked overlap; the types bound the values."""

    # Row chunks; chunk i's all-reduce runs while chunk i+1 multiplies.
    chunks: Annotated[int, Field(ge=1)] = field(default=4, metadata={"show": True})
    threshold: Annotated[int, Field(ge=0)] = 0  # token count below which the baseline path runs instead
    # stream (side stream), async (work handles), symm (NCCL symmetric window) or ce (copy engines).
    comm: Literal[COMM_PATHS] = field(default="stream", metadata={"show": True})
    priority: bool = False  # all-reduce on a high-priority NCCL stream (a process group created for it)
    align: Annotated[int, Field(ge=1)] = 1  # chunk edges round to multiples of this many rows (GEMM tiles)
    split: Literal[SPLITS] = "even"  # even, edges (first and last half size) or geo (each ratio times the last)
    ratio: Annotated[float, Field(gt=0)] = 1.0  # size ratio of consecutive chunks for split=geo (~t_comm / t_gemm)
    gemm_sms: Annotated[int, Field(ge=0)] = 0  # chunk products on this many SMs (green context; 0: all)


def _check(backend: str, s: ChunkedSettings) -> str | None:
    return (priority_reason(s.priority, backend)
            or (symm.window_reason(s.comm, backend) if s.comm in WINDOW_PATHS else None)
            or (greenctx.green_reason(s.gemm_sms, backend) if s.gemm_sms else None))


def _note(backend: str, s: ChunkedSettings) -> str | None:
    return gloo_note(s.comm, backend) or (symm.world_note(s.comm) if s.comm in WINDOW_PATHS else None)


def chunked_split(m: int, s: ChunkedSettings) -> RowSplit:
    """One range below the threshold, else the chunk ranges on the chosen path (SM-light settings have none)."""
    bounds = _bounds(m, s)
    if bounds is None:
        return RowSplit(((0, m),))
    if s.comm in WINDOW_PATHS or s.gemm_sms:
        raise StrategyUnavailable(f"chunked with comm={s.comm}, gemm_sms={s.gemm_sms} has no plain row split "
                                  "(its buffers live in NCCL windows or its products in a green context)")
    return RowSplit(tuple(bounds), s.comm, s.priority)


def _bounds(m: int, s: ChunkedSettings) -> list[tuple[int, int]] | None:
    """The chunk row ranges for ``m`` rows, or None below the threshold (the baseline path)."""
    if m < s.threshold:
        return None
    return even_bounds(m, s.chunks, s.align, s.split, s.ratio)


@register("chunked", ChunkedSettings, "row chunks, each all-reduced while the next multiplies",
          check=_check, note=_note, split=chunked_split)
def chunked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            group: dist.ProcessGroup | None, settings: ChunkedSettings) -> torch.Tensor:
    """Chunked GEMM + all-reduce overlap."""
    m = x.shape[0]
    bounds = _bounds(m, settings)
    if bounds is None:
        return baseline_into(torch.empty(m, weight.shape[0], dtype=x.dtype, device=x.device), x, weight, bias, group)
    gemm_stream = greenctx.green_stream(settings.gemm_sms) if settings.gemm_sms else None
    if settings.comm in WINDOW_PATHS:
        return window_chunks(x, weight, bias, group, settings, bounds, gemm_stream)
    out = torch.empty(m, weight.shape[0], dtype=x.dtype, device=x.device)
    comm_group = nccl_group(group) if settings.priority else group
    return all_reduce_bounds(out, x, weight, bias, group, bounds, settings.comm, comm_group, gemm_stream=gemm_stream)


WINDOW_PATHS = ("symm", "ce")  # the ``comm`` paths whose buffers live in NCCL symmetric windows
_LOGGED: set[tuple] = set()
_FIRST_ON_COMM: dict[int, str] = {}


def window_chunks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: dist.ProcessGroup | None,
                  settings: ChunkedSettings, bounds: list[tuple[int, int]],
                  gemm_stream: torch.cuda.Stream | None) -> torch.Tensor:
    """``comm=symm`` / ``ce``: the chunk pipeline on buffers in NCCL symmetric windows; under ``diagnose`` the
    first call per (settings, shape) reports the path NCCL's log shows."""
    m, n = x.shape[0], weight.shape[0]
    if settings.comm == "ce":
        symm.check_chunks(bounds, n, dist.get_world_size(group))  # before any collective, alike on every rank
        comm_group = nccl_group(group, settings.priority, zero_cta=True)
    else:
        comm_group = nccl_group(group) if settings.priority else (group or dist.group.WORLD)
    rows = max(e - s for s, e in bounds)

    def call() -> torch.Tensor:
        out = symm.window_empty(m, n, x.dtype, x.device, comm_group)
        reduce_chunk = None
        if settings.comm == "ce":
            scratch = symm.window_empty(rows, n, x.dtype, x.device, comm_group)
            reduce_chunk = lambda chunk, g: symm.ce_all_reduce(chunk, g, scratch)  # noqa: E731
        return all_reduce_bounds(out, x, weight, bias, group, bounds, settings.comm, comm_group,
                                 reduce_chunk=reduce_chunk, gemm_stream=gemm_stream)

    symm.ensure_comm(comm_group, x.device)  # outside the logged call: only the path's own collectives are logged
    key = (settings, m, n, x.dtype, id(comm_group))
    if not strategies.diagnosing() or key in _LOGGED:
        return call()
    _LOGGED.add(key)
    box: list[torch.Tensor] = []
    got = nccl_log.capture(lambda: box.append(call()), lambda: torch.cuda.synchronize(x.device))
    path = got.why or nccl_log.summary(nccl_log.classify(got.lines))
    # Only a communicator's first copy-engine call logs its path: keep that verdict beside later ones.
    first = _FIRST_ON_COMM.setdefault(id(comm_group), path)
    strategies.report(nccl_path=path, nccl_first_call_on_comm=first, nccl_lines=list(got.lines[:24]),
                      nccl_sym_ctas=os.environ.get("NCCL_SYM_CTAS", "unset (NCCL chooses)"))
    return box[0]
