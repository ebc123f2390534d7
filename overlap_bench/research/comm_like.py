"""Work placed beside a GEMM on one GPU to imitate what an all-reduce costs it (CUDA and Triton only): CTAs that
copy 64 KiB chunks at a set rate and spin between them, holding their SM slot as a polling NCCL channel does."""

from __future__ import annotations

from typing import Any

THREADS_PER_CTA = 512
CHUNK_ELEMS = 16384
CHUNK_BYTES = CHUNK_ELEMS * 4
"""float32 elements (bytes) per chunk, 64 KiB: what a CTA reads (and writes) between two rate checks."""
STAMP_FIELDS = 4
"""Per CTA: start ns, end ns, SM id, chunks copied."""


def _kernels() -> tuple[Any, Any]:
    from overlap_bench.research import _triton_kernels as k  # imports triton, present on GPU hosts only

    return k.ctas_kernel, k.stamp_kernel


def launch_ctas(k: int, src: Any, dst: Any, stamps: Any, *, slice_elems: int, duration_ns: int,
                rate_gbps: float) -> None:
    """``k`` CTAs on the current stream, each copying its slice of float32 ``src`` to ``dst`` at ``rate_gbps``
    (0: full speed) and stamping ``[start ns, end ns, SM id, chunks]`` into int64 ``stamps [k, 4]``."""
    kernel, _ = _kernels()
    n_slices = src.numel() // slice_elems
    kernel[(k,)](src, dst, stamps, n_slices, slice_elems, int(duration_ns), period_ns(rate_gbps),
                 CHUNK=CHUNK_ELEMS, BLOCK=CHUNK_ELEMS, num_warps=THREADS_PER_CTA // 32)


def period_ns(rate_gbps: float) -> int:
    """Nanoseconds from one chunk's start to the next's at ``rate_gbps`` GB/s per CTA (0: full speed, no wait)."""
    return 0 if rate_gbps <= 0 else max(1, round(CHUNK_BYTES / rate_gbps))  # bytes / (GB/s) = ns


def achieved_gbps(chunks: int, start_ns: int, end_ns: int) -> float:
    """GB/s one CTA moved: ``chunks`` chunks between its start and end stamps (ns)."""
    return chunks * CHUNK_BYTES / max(end_ns - start_ns, 1)


def stamp(out: Any, idx: int) -> None:
    """Write the GPU's ``%globaltimer`` (ns) into ``out[idx]`` (int64) when the current stream gets here."""
    _, kernel = _kernels()
    kernel[(1,)](out, idx, num_warps=1)
