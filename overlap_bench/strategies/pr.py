"""``pr``: the seed pull request (sgl-project/sglang #6923) exactly as described, with its fixed numbers:
below 16384 tokens the baseline path; from 16384 on, chunks of ``M // 3`` rows (three chunks, plus a
fourth with the remainder when M is not a multiple of 3), each chunk's all-reduce on a dedicated
communication stream ordered by CUDA events, the main stream waiting at the end."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from overlap_bench.strategies import register
from overlap_bench.strategies.baseline import baseline_into
from overlap_bench.strategies.pipeline import RowSplit, all_reduce_bounds, gloo_note

PR_THRESHOLD = 16384
"""Token count from which the PR chunks (hard-coded there)."""


@dataclass(frozen=True)
class PRSettings:
    """No settings: the PR's numbers are fixed."""


def pr_bounds(m: int) -> list[tuple[int, int]]:
    """The PR's row ranges: one range below the threshold, else ``M // 3`` rows each plus a remainder."""
    if m < PR_THRESHOLD:
        return [(0, m)]
    size = m // 3
    bounds = [(i * size, (i + 1) * size) for i in range(3)]
    if 3 * size < m:
        bounds.append((3 * size, m))
    return bounds


def pr_split(m: int, settings: PRSettings | None = None) -> RowSplit:
    """The PR's ranges, on the side-stream path when there is more than one."""
    bounds = tuple(pr_bounds(m))
    return RowSplit(bounds, "stream" if len(bounds) > 1 else None)


@register("pr", PRSettings, "sglang #6923: M//3 chunks from 16384 tokens, all-reduce on a side stream",
          note=lambda backend, s: gloo_note("stream", backend), split=pr_split, peer=True)
def pr(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
       group: dist.ProcessGroup | None, settings: PRSettings) -> torch.Tensor:
    """The seed PR's chunked overlap."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    sp = pr_split(x.shape[0])
    if sp.comm is None:
        return baseline_into(out, x, weight, bias, group)
    return all_reduce_bounds(out, x, weight, bias, group, sp.bounds, sp.comm)
