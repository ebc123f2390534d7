"""NCCL symmetric-memory windows (``comm=symm``) and the copy-engine all-reduce (``comm=ce``: all-to-all, local sum,
all-gather, zero-CTA policy); both need torch's ``NCCL`` symmetric-memory backend (its own env variant)."""

from __future__ import annotations

import torch
import torch.distributed as dist

SYMM_NCCL = (2, 27, 0)  # first NCCL with symmetric windows and kernels
CE_NCCL = (2, 28, 0)  # first NCCL with copy-engine collectives (zero-CTA policy)
BACKEND_ENV = "TORCH_SYMMMEM"  # torch reads the symmetric-memory backend from this variable


def nccl_version() -> tuple[int, ...] | None:
    """The NCCL version torch runs with, or None without CUDA/NCCL."""
    try:
        return tuple(torch.cuda.nccl.version()) if torch.cuda.is_available() else None
    except (AttributeError, RuntimeError):
        return None


def symm_backend() -> str | None:
    """torch's symmetric-memory backend for the current CUDA device (``CUDA``, ``NCCL``, ...), or None."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch.distributed import _symmetric_memory as sm

        return sm.get_backend(torch.device("cuda", torch.cuda.current_device()))
    except (ImportError, AttributeError, RuntimeError):
        return None


def torch_symm_mem_reason(who: str, ops: tuple[str, ...], nccl_for: str) -> str | None:
    """Why torch's CUDA symmetric memory (with ``torch.ops.symm_mem`` ``ops``) cannot serve ``who`` here, or None;
    ``nccl_for``: what a job with the ``NCCL`` backend is for."""
    try:  # importing it registers the ops
        from torch.distributed import _symmetric_memory as sm
    except ImportError:
        return f"{who} needs torch.distributed._symmetric_memory, which this torch lacks"
    lacks = [f"{sm.__name__}.{f}" for f in ("empty", "rendezvous") if not hasattr(sm, f)]
    lacks += [f"torch.ops.symm_mem.{op}" for op in ops if not hasattr(torch.ops.symm_mem, op)]
    if lacks:
        return f"{who} needs {', '.join(lacks)}, which this torch lacks"
    if symm_backend() == "NCCL":
        return (f"{who} needs torch's CUDA symmetric-memory backend, and this job's is NCCL "
                f"({BACKEND_ENV}=NCCL, for {nccl_for}); it runs in the jobs without that variable")
    return None


def window_reason(comm: str, backend: str) -> str | None:
    """Why ``comm`` (``symm`` or ``ce``) cannot run in this process, or None."""
    if backend != "nccl":
        return f"comm={comm} needs NCCL symmetric-memory windows (GPUs, backend nccl); {backend} has none"
    need = SYMM_NCCL if comm == "symm" else CE_NCCL
    have = nccl_version()
    if have is None or have < need:
        got = ".".join(map(str, have)) if have else "none"
        return f"comm={comm} needs NCCL >= {'.'.join(map(str, need))}; this torch runs NCCL {got}"
    if comm == "ce" and not hasattr(dist.ProcessGroupNCCL, "NCCL_CTA_POLICY_ZERO"):
        return "comm=ce needs ProcessGroupNCCL.NCCL_CTA_POLICY_ZERO (zero-CTA policy), which this torch lacks"
    got_backend = symm_backend()
    if got_backend != "NCCL":
        return (f"comm={comm} needs torch's NCCL symmetric-memory backend, and this job's is {got_backend}; "
                f"run it with {BACKEND_ENV}=NCCL in the environment (a spec env variant)")
    return None


def world_note(comm: str) -> str | None:
    """Record text at world size 1, where NCCL does not run the path under test."""
    if dist.is_initialized() and dist.get_world_size() == 1:
        what = "symmetric kernel" if comm == "symm" else "copy-engine transfers"
        return (f"world 1: NCCL short-cuts a one-rank collective to a local copy, so no {what} ran; this checks "
                f"the window allocation, registration and numerics only")
    return None


_READY: set[int] = set()


def ensure_comm(group: dist.ProcessGroup, device: torch.device) -> None:
    """Create ``group``'s NCCL communicator (registration needs it) by a one-element all-reduce, once."""
    if id(group) not in _READY:
        dist.all_reduce(torch.zeros(1, device=device), group=group)
        _READY.add(id(group))


def window_empty(rows: int, cols: int, dtype: torch.dtype, device: torch.device,
                 group: dist.ProcessGroup) -> torch.Tensor:
    """A ``[rows, cols]`` tensor in an NCCL symmetric window on ``group``; all ranks allocate alike, in order."""
    from torch.distributed import _symmetric_memory as sm

    ensure_comm(group, device)
    with torch.cuda.use_mem_pool(sm.get_mem_pool(device)):
        t = torch.empty(rows, cols, dtype=dtype, device=device)
    sm.rendezvous(t, group)
    return t


def slice_len(numel: int, world: int) -> int:
    """Elements of each rank's slice of a chunk; a ``ValueError`` when it does not split into equal slices."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if numel % world:
        raise ValueError(f"comm=ce: a chunk of {numel} elements does not split into {world} equal slices; "
                         f"use token counts (or align) that make rows x N a multiple of {world}")
    return numel // world


def check_chunks(bounds: list[tuple[int, int]], n: int, world: int) -> None:
    """Raise (before any collective, on every rank alike) if a chunk cannot be split into equal slices."""
    for s, e in bounds:
        slice_len((e - s) * n, world)


def ce_all_reduce(chunk: torch.Tensor, group: dist.ProcessGroup, scratch: torch.Tensor) -> None:
    """Sum the contiguous ``chunk`` over ``group`` in place: all-to-all into ``scratch``, local sum, all-gather."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    flat = chunk.view(-1)
    size = slice_len(flat.numel(), world)
    recv = scratch.view(-1)[: flat.numel()]
    dist.all_to_all_single(recv, flat, group=group)     # recv[j*size:(j+1)*size] = rank j's slice `rank`
    mine = flat[rank * size:(rank + 1) * size]
    torch.sum(recv.view(world, size), dim=0, out=mine)
    dist.all_gather_into_tensor(flat, mine, group=group)  # in place: `mine` already sits at its offset

