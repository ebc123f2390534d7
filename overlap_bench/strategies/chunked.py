"""``chunked``: the general chunked overlap, every number a setting the sweep can tune."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from overlap_bench.strategies import register
from overlap_bench.strategies.baseline import baseline_into
from overlap_bench.strategies.pipeline import (COMM_PATHS, SPLITS, RowSplit, all_reduce_bounds, even_bounds,
                                               gloo_note, high_priority_group)


@dataclass(frozen=True)
class ChunkedSettings:
    """Settings of the chunked overlap."""

    chunks: int = field(default=4, metadata={"show": True})
    """Number of row chunks (>= 1); chunk ``i``'s all-reduce runs while chunk ``i+1`` multiplies."""
    threshold: int = 0
    """Token count below which the baseline path runs instead (>= 0)."""
    comm: str = field(default="stream", metadata={"show": True})
    """``stream``: all-reduce on a side stream after a CUDA event; ``async``: async work handles."""
    priority: bool = False
    """Run the all-reduce on a high-priority NCCL stream (a process group created for it)."""
    align: int = 1
    """Chunk edges are rounded to multiples of this many rows (GEMM tile alignment, >= 1)."""
    split: str = "even"
    """``even`` chunks; ``edges``: first and last chunk half size (shorter pipeline fill and drain);
    ``geo``: each chunk ``ratio`` times the previous one."""
    ratio: float = 1.0
    """Size ratio of consecutive chunks for ``split=geo`` (> 0; about t_comm / t_gemm is the aim)."""

    def __post_init__(self) -> None:
        if self.chunks < 1:
            raise ValueError(f"setting 'chunks' must be >= 1, got {self.chunks}")
        if self.threshold < 0:
            raise ValueError(f"setting 'threshold' must be >= 0 tokens, got {self.threshold}")
        if self.comm not in COMM_PATHS:
            raise ValueError(f"setting 'comm' must be one of {', '.join(COMM_PATHS)}, got {self.comm!r}")
        if self.align < 1:
            raise ValueError(f"setting 'align' must be >= 1, got {self.align}")
        if not self.ratio > 0:
            raise ValueError(f"setting 'ratio' must be > 0, got {self.ratio}")
        if self.split not in SPLITS:
            raise ValueError(f"setting 'split' must be one of {', '.join(SPLITS)}, got {self.split!r}")


def _check(backend: str, s: ChunkedSettings) -> str | None:
    if s.priority and backend != "nccl":
        return "priority=true needs NCCL (a high-priority CUDA stream); gloo has no stream priorities"
    return None


def chunked_split(m: int, s: ChunkedSettings) -> RowSplit:
    """One range below the threshold (the baseline path), else the chunk ranges on the chosen path."""
    if m < s.threshold:
        return RowSplit(((0, m),))
    return RowSplit(tuple(even_bounds(m, s.chunks, s.align, s.split, s.ratio)), s.comm, s.priority)


@register("chunked", ChunkedSettings, "row chunks, each all-reduced while the next multiplies",
          check=_check, note=lambda backend, s: gloo_note(s.comm, backend), split=chunked_split)
def chunked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            group: dist.ProcessGroup | None, settings: ChunkedSettings) -> torch.Tensor:
    """Chunked GEMM + all-reduce overlap."""
    m = x.shape[0]
    out = torch.empty(m, weight.shape[0], dtype=x.dtype, device=x.device)
    sp = chunked_split(m, settings)
    if sp.comm is None:
        return baseline_into(out, x, weight, bias, group)
    comm_group = high_priority_group(group) if sp.priority else group
    return all_reduce_bounds(out, x, weight, bias, group, sp.bounds, sp.comm, comm_group)
