"""``baseline``: the product, then one all-reduce of the whole output. ``comm=nccl`` (NCCL's default) is THE
reference; the other ``comm`` values are faster plain all-reduces that engines pick by size, also references."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from overlap_bench import strategies
from overlap_bench.strategies import StrategyUnavailable, nccl_log, register, symm
from overlap_bench.strategies.pipeline import PATHS, RowSplit, matmul_into, rank_bias

# torch's symmetric-memory all-reduce per comm (no multicast: never the multimem ops).
SYMM_MEM_OPS = {"oneshot": "one_shot_all_reduce", "twoshot": "two_shot_all_reduce_"}
TWO_SHOT_OUT_WORLDS = (2, 4, 8)  # where torch's out-of-place two-shot kernel runs (else in-place, then a copy)
SYMM_MEM_DTYPES = (torch.bfloat16, torch.float32)  # what torch's one-shot and two-shot kernels are built for


@dataclass(frozen=True)
class BaselineSettings:
    """Which plain all-reduce follows the product (no overlap)."""

    # nccl (NCCL's default: the reference), symm (NCCL's symmetric kernel on a registered window), oneshot /
    # twoshot (torch's symmetric-memory all-reduces, without multicast).
    comm: Literal["nccl", "symm", "oneshot", "twoshot"] = "nccl"


def baseline_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  group: dist.ProcessGroup | None) -> torch.Tensor:
    """Product into ``out``, then all-reduce it in place."""
    PATHS["baseline"] += 1
    matmul_into(out, x, weight, rank_bias(bias, group))
    dist.all_reduce(out, group=group)
    return out


def _check(backend: str, s: BaselineSettings) -> str | None:
    if s.comm == "nccl":
        return None
    if s.comm == "symm":
        return symm.window_reason("symm", backend)
    if backend != "nccl":
        return f"comm={s.comm} needs torch's CUDA symmetric memory (GPUs, backend nccl); {backend} has none"
    return symm.torch_symm_mem_reason(f"comm={s.comm}", (SYMM_MEM_OPS[s.comm],), "comm=symm")


def _note(backend: str, s: BaselineSettings) -> str | None:
    if s.comm == "symm":
        return symm.world_note("symm")
    if s.comm == "nccl" or backend != "nccl" or not dist.is_initialized():
        return None
    world = dist.get_world_size()
    if world == 1:
        return f"world 1: comm={s.comm} reduces one buffer (no peer); this checks the allocation and numerics only"
    if s.comm == "twoshot" and not _two_shot_out(world):
        return f"world {world}: torch's in-place two-shot kernel ran, then a copy to the output"
    return None


def _two_shot_out(world: int) -> bool:
    """Whether torch's out-of-place two-shot kernel runs at ``world`` (else the in-place one, then a copy)."""
    return world in TWO_SHOT_OUT_WORLDS and hasattr(torch.ops.symm_mem, "two_shot_all_reduce_out")


def _split(m: int, s: BaselineSettings) -> RowSplit:
    if s.comm != "nccl":
        raise StrategyUnavailable(f"baseline:comm={s.comm} has no plain row split (its output lives in "
                                  "symmetric memory)")
    return RowSplit(((0, m),))


@register("baseline", BaselineSettings, "product, then one all-reduce of the whole [M, N] output (comm: which)",
          check=_check, note=_note, split=_split)
def baseline(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             group: dist.ProcessGroup | None, settings: BaselineSettings) -> torch.Tensor:
    """Row-parallel linear the plain way: ``all_reduce(x @ W^T + b)``."""
    m, n = x.shape[0], weight.shape[0]
    if settings.comm == "nccl":
        return baseline_into(torch.empty(m, n, dtype=x.dtype, device=x.device), x, weight, bias, group)
    g = group if group is not None else dist.group.WORLD
    if settings.comm == "symm":
        return _symm(x, weight, bias, g)
    return _symm_mem(settings.comm, x, weight, bias, g)


def _symm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, g: dist.ProcessGroup) -> torch.Tensor:
    """The product into an NCCL symmetric window, all-reduced there; under ``diagnose`` NCCL's path is reported."""
    symm.ensure_comm(g, x.device)  # outside the logged call: only the path's own collective is logged

    def call() -> torch.Tensor:
        out = symm.window_empty(x.shape[0], weight.shape[0], x.dtype, x.device, g)
        matmul_into(out, x, weight, rank_bias(bias, g))
        dist.all_reduce(out, group=g)
        return out

    if not strategies.diagnosing():
        return call()
    box: list[torch.Tensor] = []
    got = nccl_log.capture(lambda: box.append(call()), lambda: torch.cuda.synchronize(x.device))
    strategies.report(nccl_path=got.why or nccl_log.summary(nccl_log.classify(got.lines)),
                      nccl_lines=list(got.lines[:24]))
    return box[0]


def symm_mem_reason(comm: str, m: int, n: int, dtype: torch.dtype) -> str | None:
    """Why torch's ``comm`` kernel cannot reduce an ``[m, n]`` output of ``dtype`` (None when it can)."""
    if dtype not in SYMM_MEM_DTYPES:
        return f"comm={comm}: torch's {SYMM_MEM_OPS[comm]} takes bfloat16 or float32, not {str(dtype)[6:]}"
    if m * n * dtype.itemsize % 4:
        return f"comm={comm}: an {m}x{n} {str(dtype)[6:]} output is not a multiple of 4 bytes, as torch's kernel needs"
    return None


_BUFFERS: dict[tuple, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


def symm_mem_buffer(numel: int, dtype: torch.dtype, device: torch.device, g: dist.ProcessGroup) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements in torch's symmetric memory on ``g``, one per (group, dtype,
    device), grown (on every rank alike) when too small; an outgrown one stays allocated: peers map it."""
    from torch.distributed import _symmetric_memory as sm

    key = (g.group_name, dtype, device)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _RETIRED.append(buf)
        buf = sm.empty(max(numel, 2 * buf.numel() if buf is not None else 0), dtype=dtype, device=device)
        sm.rendezvous(buf, g)
        _BUFFERS[key] = buf
    return buf


def _symm_mem(comm: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              g: dist.ProcessGroup) -> torch.Tensor:
    """The product into a symmetric-memory buffer, reduced by torch's one-shot or two-shot kernel into a new output."""
    m, n = x.shape[0], weight.shape[0]
    why = symm_mem_reason(comm, m, n, x.dtype)
    if why:
        raise StrategyUnavailable(why)  # before any collective, alike on every rank
    try:
        buf = symm_mem_buffer(m * n, x.dtype, x.device, g)[: m * n].view(m, n)
    except RuntimeError as exc:  # e.g. no peer access between the GPUs; running out of memory stays an error
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        raise StrategyUnavailable(f"comm={comm}: torch's symmetric memory cannot be set up here: "
                                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    matmul_into(buf, x, weight, rank_bias(bias, g))
    ops = torch.ops.symm_mem
    if comm == "oneshot":
        return ops.one_shot_all_reduce(buf, "sum", g.group_name)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if _two_shot_out(dist.get_world_size(g)):
        return ops.two_shot_all_reduce_out(buf, "sum", g.group_name, out)
    ops.two_shot_all_reduce_(buf, "sum", g.group_name)
    return out.copy_(buf)
