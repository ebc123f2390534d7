"""``asynctp``: torch's async-TP op as a peer: ``fused_matmul_reduce_scatter``, then an all-gather of the rows."""

from __future__ import annotations

import torch
import torch.distributed as dist

from overlap_bench.strategies import NoSettings, register, symm


def _check(backend: str, s: NoSettings) -> str | None:
    if backend != "nccl":
        return f"asynctp needs NCCL and torch's CUDA symmetric memory (torch.ops.symm_mem); {backend} has neither"
    # torch's NCCL symmetric-memory allocator refuses the op's workspace: the CUDA backend is needed.
    return symm.torch_symm_mem_reason("asynctp", ("fused_matmul_reduce_scatter",), "comm=symm/ce")


def rows_per_rank(m: int, world: int) -> int:
    """Rows each rank owns after the reduce-scatter; a ``ValueError`` when ``m`` does not split evenly."""
    if m % world:
        raise ValueError(f"asynctp needs the token count M={m} to be a multiple of the world size {world} "
                         f"(the reduce-scatter splits rows evenly)")
    return m // world


@register("asynctp", NoSettings, "torch async-TP: fused_matmul_reduce_scatter, then all-gather (as vLLM)",
          check=_check)
def asynctp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            group: dist.ProcessGroup | None, settings: NoSettings) -> torch.Tensor:
    """Row-parallel linear through torch's fused matmul + reduce-scatter, then an all-gather."""
    g = group if group is not None else dist.group.WORLD
    rows_per_rank(x.shape[0], dist.get_world_size(g))
    part = torch.ops.symm_mem.fused_matmul_reduce_scatter(x, weight.t(), "sum", 0, g.group_name)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, part, group=g)
    if bias is not None:
        out += bias  # after the reduction, on every rank: counted once, as rank 0's bias is elsewhere
    return out
