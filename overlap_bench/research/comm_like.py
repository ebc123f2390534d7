"""Work placed beside a GEMM on one GPU to imitate what an all-reduce costs it (CUDA and Triton only).

:func:`launch_ctas`: ``k`` CTAs of 512 threads (one NCCL ring channel each) that each copy their own slice of a
large buffer in 64 KiB chunks at ``rate`` bytes/s, spinning on ``%globaltimer`` between chunks (holding the SM
slot, as a channel does while it polls), and stamp their start, end, SM id and chunks moved.
:func:`stamp`: one thread writes ``%globaltimer`` into a slot, a marker between kernels on a stream.
"""

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
    """Launch the communication-like kernel with ``k`` CTAs on the current stream: ``src``/``dst`` float32
    buffers of ``n_slices * slice_elems``, ``stamps`` int64 ``[k, 4]``, ``rate_gbps`` per CTA (0: full speed)."""
    kernel, _ = _kernels()
    n_slices = src.numel() // slice_elems
    kernel[(k,)](src, dst, stamps, n_slices, slice_elems, int(duration_ns), period_ns(rate_gbps),
                 CHUNK=CHUNK_ELEMS, BLOCK=CHUNK_ELEMS, num_warps=THREADS_PER_CTA // 32)


def period_ns(rate_gbps: float) -> int:
    """Nanoseconds from one chunk's start to the next's for ``rate_gbps`` GB/s (10^9 bytes/s) per CTA; 0 (no
    wait) for 0, full speed."""
    return 0 if rate_gbps <= 0 else max(1, round(CHUNK_BYTES / rate_gbps))  # bytes / (GB/s) = ns


def achieved_gbps(chunks: int, start_ns: int, end_ns: int) -> float:
    """GB/s one CTA moved: ``chunks`` chunks between its start and end stamps (ns)."""
    return chunks * CHUNK_BYTES / max(end_ns - start_ns, 1)


def stamp(out: Any, idx: int) -> None:
    """Write the GPU's ``%globaltimer`` (ns) into ``out[idx]`` (int64) when the current stream gets here."""
    _, kernel = _kernels()
    kernel[(1,)](out, idx, num_warps=1)
