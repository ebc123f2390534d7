"""``pr``: the seed PR's fixed numbers: baseline below 16384 tokens, else ``M // 3``-row chunks on a side stream."""

from __future__ import annotations

import torch
import torch.distributed as dist

from overlap_bench.strategies import NoSettings, register
from overlap_bench.strategies.baseline import baseline_into
from overlap_bench.strategies.pipeline import RowSplit, all_reduce_bounds, gloo_note

PR_THRESHOLD = 16384  # token count from which the PR chunks


def pr_bounds(m: int) -> list[tuple[int, int]]:
    """One range below the threshold, else ``M // 3`` rows each plus a remainder."""
    if m < PR_THRESHOLD:
        return [(0, m)]
    size = m // 3
    bounds = [(i * size, (i + 1) * size) for i in range(3)]
    if 3 * size < m:
        bounds.append((3 * size, m))
    return bounds


def pr_split(m: int, settings: NoSettings | None = None) -> RowSplit:
    """The PR's ranges, on the side-stream path when there is more than one."""
    bounds = tuple(pr_bounds(m))
    return RowSplit(bounds, "stream" if len(bounds) > 1 else None)


@register("pr", NoSettings, "sglang #6923: M//3 chunks from 16384 tokens, all-reduce on a side stream",
          note=lambda backend, s: gloo_note("stream", backend), split=pr_split, peer=True)
def pr(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
       group: dist.ProcessGroup | None, settings: NoSettings) -> torch.Tensor:
    """The seed PR's chunked overlap."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    sp = pr_split(x.shape[0])
    if sp.comm is None:
        return baseline_into(out, x, weight, bias, group)
    return all_reduce_bounds(out, x, weight, bias, group, sp.bounds, sp.comm)
