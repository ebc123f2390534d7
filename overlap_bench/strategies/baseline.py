"""``baseline``: the product, then one all-reduce of the whole output (the reference)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from overlap_bench.strategies import NoSettings, register
from overlap_bench.strategies.pipeline import PATHS, RowSplit, matmul_into, rank_bias


def baseline_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  group: dist.ProcessGroup | None) -> torch.Tensor:
    """Product into ``out``, then all-reduce it in place."""
    PATHS["baseline"] += 1
    matmul_into(out, x, weight, rank_bias(bias, group))
    dist.all_reduce(out, group=group)
    return out


@register("baseline", NoSettings, "product, then one all-reduce of the whole [M, N] output",
          split=lambda m, s: RowSplit(((0, m),)))
def baseline(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             group: dist.ProcessGroup | None, settings: NoSettings) -> torch.Tensor:
    """Row-parallel linear the plain way: ``all_reduce(x @ W^T + b)``."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    return baseline_into(out, x, weight, bias, group)
